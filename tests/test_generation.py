"""generate(): batched left-padded decoding with the KV cache against per-prompt and no-cache references."""
from __future__ import annotations

import pytest
import torch

from mmr1.backbone import R1Model
from mmr1.config import MoEConfig, R1Config
from mmr1.generation import generate, left_pad, sample_next_token

PROMPTS = [[5, 9, 2, 33], [7], [12, 40, 3, 3, 18, 60, 1], [21, 22]]


def tiny_model(cross_attn_layers=(1,), seed=0) -> R1Model:
    torch.manual_seed(seed)
    cfg = R1Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=40,
                   moe=MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=16),
                   cross_attn_layers=list(cross_attn_layers), cross_attn_heads=2, tie_embeddings=False)
    model = R1Model(cfg)
    model.init_weights(std=0.3)  # peaked, varied logits: greedy paths don't just repeat a token
    with torch.no_grad():
        for block in model.layers:
            if block.cross_attn is not None:
                block.cross_attn.gate.fill_(0.8)
    return model.eval()


def modality_tokens(seed=3):
    g = torch.Generator().manual_seed(seed)
    cross_states = torch.randn(len(PROMPTS), 6, 32, generator=g)
    cross_mask = torch.ones(len(PROMPTS), 6, dtype=torch.bool)
    cross_mask[1, 2:] = False
    cross_mask[3, 4:] = False
    return cross_states, cross_mask


@torch.no_grad()
def recompute_greedy(model, prompts, max_new_tokens, cross_states=None, cross_mask=None, eos_id=None):
    """Reference: no cache; every step runs the whole left-padded batch again and takes the argmax."""
    seqs = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        input_ids, mask = left_pad(seqs, 0, torch.device("cpu"))
        logits = model(input_ids, attention_mask=mask, cross_states=cross_states, cross_mask=cross_mask).logits
        for seq, token in zip(seqs, logits[:, -1].argmax(-1).tolist()):
            seq.append(token)
    out = [s[len(p):] for s, p in zip(seqs, prompts)]
    return [o[:o.index(eos_id)] if eos_id in o else o for o in out]


@pytest.mark.parametrize("with_cross", [False, True])
def test_greedy_generation_equals_no_cache_recompute(with_cross):
    model = tiny_model()
    cross = dict(zip(("cross_states", "cross_mask"), modality_tokens())) if with_cross else {}
    generated = generate(model, PROMPTS, max_new_tokens=8, **cross)
    assert generated == recompute_greedy(model, PROMPTS, 8, **cross)
    assert all(len(g) == 8 for g in generated)
    assert len({tuple(g) for g in generated}) > 1 and any(len(set(g)) > 2 for g in generated)


def test_batched_left_padded_greedy_equals_per_prompt_greedy():
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    batched = generate(model, PROMPTS, cross_states=cross_states, cross_mask=cross_mask, max_new_tokens=8)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], cross_states=cross_states[i:i + 1, cross_mask[i]], max_new_tokens=8)
        assert batched[i] == alone[0]


def test_eos_stops_each_sequence_and_is_excluded():
    model = tiny_model(cross_attn_layers=())
    free = generate(model, PROMPTS, max_new_tokens=8)
    eos = free[0][3]  # the 4th token prompt 0 generates
    stopped = generate(model, PROMPTS, max_new_tokens=8, eos_id=eos)
    for full, cut in zip(free, stopped):
        assert cut == (full[:full.index(eos)] if eos in full else full)
    assert stopped[0] == free[0][:3]
    assert stopped == recompute_greedy(model, PROMPTS, 8, eos_id=eos)


def count_forward_calls(model, fn):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = fn()
    finally:
        handle.remove()
    return result, len(calls)


def test_stops_early_once_every_sequence_has_finished():
    model = tiny_model(cross_attn_layers=())
    prompts = PROMPTS[:2]
    free = generate(model, prompts, max_new_tokens=6)
    _, calls = count_forward_calls(model, lambda: generate(model, prompts, max_new_tokens=6))
    assert calls == 6  # prefill + 5 decode steps: the last token needs no forward pass

    eos = free[0][0]
    out, calls = count_forward_calls(model, lambda: generate(model, prompts[:1], max_new_tokens=6, eos_id=eos))
    assert out == [[]] and calls == 1  # finished at the first token: prefill only

    # Prompt 0 stops at once; the batch keeps decoding until prompt 1 emits eos too (or runs out).
    out, calls = count_forward_calls(model, lambda: generate(model, prompts, max_new_tokens=6, eos_id=eos))
    assert out[0] == []
    assert calls == (free[1].index(eos) + 1 if eos in free[1] else 6)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    kwargs = dict(cross_states=cross_states, cross_mask=cross_mask, max_new_tokens=8, temperature=1.5, top_p=0.95)
    first = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    again = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    other = generate(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kwargs)
    assert first == again
    assert first != other
    assert first != generate(model, PROMPTS, cross_states=cross_states, cross_mask=cross_mask, max_new_tokens=8)


def test_top_k_1_and_tiny_top_p_reduce_sampling_to_greedy():
    model = tiny_model(cross_attn_layers=())
    greedy = generate(model, PROMPTS, max_new_tokens=6)
    g = torch.Generator().manual_seed(0)
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=2.0, top_k=1, generator=g) == greedy
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=2.0, top_p=1e-6, generator=g) == greedy


def test_sample_next_token_respects_top_k_and_top_p_support():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().expand(2000, 4)
    top_p = sample_next_token(logits, temperature=1.0, top_p=0.7, generator=g)  # keeps {1, 3}
    assert set(top_p.tolist()) == {1, 3}
    top_k = sample_next_token(logits, temperature=1.0, top_k=3, generator=g)  # keeps {1, 3, 2}
    assert set(top_k.tolist()) == {1, 2, 3}
    free = sample_next_token(logits, temperature=1.0, generator=g)
    assert set(free.tolist()) == {0, 1, 2, 3}
    # Token 1 has probability 0.5 / 0.8 among {1, 3}: 1250 of 2000 expected, sd ~22.
    assert abs((top_p == 1).sum().item() - 1250) < 110
    assert sample_next_token(logits[:3], temperature=0.0).tolist() == [1, 1, 1]


def test_generate_restores_training_mode_and_checks_inputs():
    model = tiny_model(cross_attn_layers=()).train()
    generate(model, [[1, 2]], max_new_tokens=2)
    assert model.training
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 30], max_new_tokens=11)
    assert generate(model, []) == []
