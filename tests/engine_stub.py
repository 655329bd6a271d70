"""Test helpers for the engine: a stub backbone for scheduler tests (its next token is a known function of every
token in its KV cache, so a wrong page, a lost token or a bad recompute after preemption changes the output), and a
driver that feeds rows through paged forwards step by step."""
from __future__ import annotations

import torch

from mmr1.backbone import R1Model, R1Output
from mmr1.config import R1Config

VOCAB = 32


def reference_next(tokens: list[int]) -> int:
    return (sum(tokens) + 3 * len(tokens)) % VOCAB


def reference_generate(prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = reference_next(seq)
        if token == eos_id:
            break
        seq.append(token)
        out.append(token)
    return out


class StubBackbone(R1Model):
    """One layer whose 'keys' are (token id, 1): attention-free sums over the visible cached keys."""

    packed_forward = False  # its forward reads cache.update(): the engine must give it padded batches

    def __init__(self, max_seq_len: int = 64):
        super().__init__(R1Config(vocab_size=VOCAB, dim=2, n_layers=1, n_heads=1, n_kv_heads=1, ffn_hidden=2,
                                  cross_attn_heads=1, max_seq_len=max_seq_len))

    def forward(self, input_ids, *, attention_mask=None, position_ids=None, cross_states=None, cross_mask=None,
                cache=None) -> R1Output:
        B, L = input_ids.shape
        key_mask = cache.append_mask(attention_mask)  # (B, S)
        kv = torch.stack([input_ids.float(), torch.ones(B, L)], dim=-1)[:, None]  # (B, 1, L, 2)
        keys, _ = cache.update(0, kv, kv)  # (B, 1, S, 2)
        S = keys.shape[2]
        causal = torch.arange(S)[None, :] <= torch.arange(S - L, S)[:, None]  # (L, S)
        visible = (causal[None] & key_mask[:, None, :]).float()  # (B, L, S)
        sums = visible @ keys[:, 0]  # (B, L, 2): sum of ids, count
        nxt = (sums[..., 0] + 3 * sums[..., 1]).long() % VOCAB
        logits = torch.nn.functional.one_hot(nxt, VOCAB).float()
        cache.advance(L)
        return R1Output(logits=logits)


def paged_logits(model, pool, seqs: list[list[int]], tables: list[list[int]],
                 schedule: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Feed each row of `seqs` through `forward_paged` by `schedule` (tokens per row per step, 0 = idle), each row
    in its own pool pages `tables`; returns every row's logits (len, V), concatenated over the steps."""
    from mmr1.engine.runner import forward_paged
    done, paged = [0] * len(seqs), [[] for _ in seqs]
    for step in schedule:
        rows = [i for i in range(len(seqs)) if step[i]]
        logits = forward_paged(model, pool, [seqs[i][done[i]:done[i] + step[i]] for i in rows],
                               [done[i] for i in rows], [tables[i] for i in rows])
        for r, i in enumerate(rows):
            paged[i].append(logits[r, :step[i]])
            done[i] += step[i]
    return [torch.cat(parts) for parts in paged]
