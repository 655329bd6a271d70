"""Speculative decoding: drafts propose tokens, the target checks them all in one forward.

Verification (Leviathan et al. 2023, Chen et al. 2023): draft token d_j, drawn from the draft's distribution q_j,
is accepted with probability min(1, p_j(d_j) / q_j(d_j)) where p_j is the target's (processed) distribution at
that position; at the first rejection the replacement is drawn from norm(max(p_j - q_j, 0)), and when every draft
is accepted a bonus token comes from p_{k}. The emitted tokens are then distributed exactly as target sampling.
Under greedy decoding this reduces to "accept while the draft equals the target's argmax", so the output is
identical to plain greedy. Prompt lookup has no distribution: it is a point mass (q = one-hot).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from mmr1.backbone import R1Model
from mmr1.config import R1Config
from mmr1.engine.block_manager import BlockAllocator, blocks_for
from mmr1.engine.config import SamplingParams, SpeculativeConfig
from mmr1.engine.paged_cache import PagedKVPool
from mmr1.engine.packed import packable
from mmr1.engine.runner import forward_packed, forward_paged
from mmr1.engine.sampling import plain_greedy, processed_probs, sample_row
from mmr1.engine.scheduler import ScheduledRow, Scheduler
from mmr1.engine.sequence import Sequence
from mmr1.engine.solo import SoloCache, solo_eligible, solo_forward
from mmr1.engine.stopping import end_ids


def ngram_propose(tokens: list[int], k: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the longest suffix n-gram, propose what followed it."""
    for n in range(min(ngram_max, len(tokens) - 1), ngram_min - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def cut_after_end(drafts: list[int], ends: tuple[int, ...]) -> list[int]:
    """Drafts up to and including the first end token: verification never commits anything after one."""
    cut = next((j + 1 for j, token in enumerate(drafts) if token in ends), len(drafts))
    return drafts[:cut]


@dataclasses.dataclass
class DraftLength:
    """One request's draft length when it adapts to acceptance (SpeculativeConfig.adaptive).

    A round whose drafts were all accepted lengthens the next by one (up to `longest`); a rejected round, partly or
    wholly, shortens it by one, as transformers' heuristic schedule does (halving after a wholly rejected round,
    this rule's earlier form, made the next rounds too short for the easy tokens after one hard one, often an
    answer's first: the demo draft gave 1.63-1.64x plain with it, 1.75-1.82x without, in an A/B); when even a
    one-token draft is rejected, drafting pauses for `pause` steps -- 4 at first, doubled while the probe after
    each pause is rejected too, at most MAX_PAUSE -- and any accepted draft ends the back-off. Only past rounds
    decide a length, never the draft being verified, so rejection sampling still yields the target distribution."""

    longest: int
    current: int = 0
    rest: int = 0  # steps left in the pause
    pause: int = 0  # length of the last pause (0: none since the last accepted draft)

    FIRST_PAUSE = 4
    MAX_PAUSE = 64

    def __post_init__(self) -> None:
        self.current = self.current or self.longest

    def next_length(self) -> int:
        """Tokens to draft this step (0 while pausing); call once per decoding step."""
        if self.rest:
            self.rest -= 1
            return 0
        return self.current

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.current, self.pause = min(self.longest, self.current + 1), 0
        elif accepted:
            self.current, self.pause = max(1, self.current - 1), 0
        elif drafted > 1:
            self.current = max(1, self.current - 1)
        else:
            self.pause = min(self.MAX_PAUSE, 2 * self.pause if self.pause else self.FIRST_PAUSE)
            self.rest, self.current = self.pause, 1


def verify(logits: torch.Tensor, drafts: list[int], params: SamplingParams, seen: list[int],
           generator: torch.Generator, draft_probs: list[torch.Tensor] | None = None, num_prompt: int = 0,
           end_ids: tuple[int, ...] = ()) -> tuple[list[int], int]:
    """logits (len(drafts) + 1, V): the target's logits after the last committed token and after each draft;
    `seen` the committed tokens (the first num_prompt are the prompt: penalties and min_tokens as sample_row).

    Returns (tokens to commit: the accepted drafts + one target token, number of drafts accepted)."""
    if plain_greedy(params, len(seen) - num_prompt):  # every position is a plain argmax: one kernel, one copy
        best = logits.argmax(dim=-1).tolist()
        j = next((j for j, d in enumerate(drafts) if best[j] != d), len(drafts))
        return drafts[:j] + [best[j]], j
    out: list[int] = []
    for j, d in enumerate(drafts):
        context = seen + out
        if params.greedy:
            best = sample_row(logits[j], params, context, generator, num_prompt, end_ids)
            if best != d:
                return out + [best], j
            out.append(d)
            continue
        p = processed_probs(logits[j], params, context, num_prompt, end_ids)
        q = draft_probs[j] if draft_probs is not None else None
        q_d = 1.0 if q is None else float(q[d])
        accept = float(p[d]) / q_d if q_d > 0 else 0.0
        if torch.rand((), generator=generator).item() < min(1.0, accept):
            out.append(d)
            continue
        residual = (p - (torch.nn.functional.one_hot(torch.tensor(d), p.shape[0]).float() if q is None else q))
        residual = residual.clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: rejection is impossible in exact arithmetic; fall back to p
            residual = p
        return out + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))], j
    return out + [sample_row(logits[len(drafts)], params, seen + out, generator, num_prompt, end_ids)], len(drafts)


class DraftModel:
    """A smaller R1 backbone with its own paged KV pool; proposes k tokens per sequence, batched.

    When one sequence is drafting, it takes the batch-1 fast path (mmr1.engine.solo) like the target does: a
    contiguous K/V copy, written back to the pool after every proposal so the pool never falls behind."""

    def __init__(self, model: R1Model, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.model = model.eval()
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.pool = PagedKVPool.for_model(model.cfg, num_blocks, block_size, dtype, "model", device)
        self._solo_ok = solo_eligible(model, "model")
        self._solo: SoloCache | None = None
        # EngineConfig.compile_decode: a compiled solo_step for a lone request's feeds of up to compiled_max_tokens
        self.compiled_step, self.compiled_max_tokens = None, 1
        # Rows catch up different numbers of tokens (a new request: its whole prompt): pack them when possible.
        self._packed = packable(model)

    def propose(self, seqs: list[Sequence], ks: list[int], ends: list[tuple[int, ...]]
                ) -> tuple[list[list[int]], list[list[torch.Tensor | None]]]:
        """Draft up to ks[i] tokens for seqs[i] (fewer if its draft KV memory is short): tokens and their q (None
        for a plain greedy request, whose verification compares tokens only). A draft stops at a token of ends[i]
        (the request's end tokens): whether verification accepts or rejects it, nothing drafted after it can become
        output, so drafting on would only cost draft steps and verification positions."""
        live = [i for i, (s, k) in enumerate(zip(seqs, ks))
                if k > 0 and self.allocator.grow(s.id, s.draft_blocks, len(s.tokens) + k - 1, self.block_size)]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor | None]] = [[] for _ in seqs]
        feeds = {i: seqs[i].tokens[seqs[i].draft_cached:] for i in live}
        solo = self._solo_for(seqs[live[0]]) if len(live) == 1 and self._solo_ok else None
        ended: set[int] = set()
        for step in range(max((ks[i] for i in live), default=0)):
            rows = [i for i in live if step < ks[i] and i not in ended]
            if not rows:
                break
            args = ([feeds[i] for i in rows], [seqs[i].draft_cached for i in rows],
                    [seqs[i].draft_blocks for i in rows], [seqs[i].draft_cross_kv for i in rows])
            if solo is not None:  # each row's last-token logits: lasts[r] (V,)
                # compiled: single tokens, and catching up on accepted tokens (not a new request's prompt)
                longest = self.compiled_max_tokens if step or seqs[live[0]].draft_cached else 1
                lasts = solo_forward(self.model, solo, args[0][0], args[3][0], self.compiled_step, tail=1,
                                     compiled_max_tokens=longest)
            elif self._packed:
                lasts = [t[-1] for t in forward_packed(self.model, self.pool, *args, tails=[1] * len(rows))]
            else:  # right-padded (B, L, V)
                padded = forward_paged(self.model, self.pool, *args)
                lasts = [padded[r, len(feeds[i]) - 1] for r, i in enumerate(rows)]
            for r, i in enumerate(rows):
                seq = seqs[i]
                seq.draft_cached += len(feeds[i])
                last = lasts[r]
                if plain_greedy(seq.params, len(seq.output) + len(drafts[i])):
                    token, q = int(last.argmax()), None  # greedy verification never reads q
                else:
                    # q may be any distribution the draft samples from; penalties as the target's make it closer
                    q = processed_probs(last, seq.params, seq.tokens + drafts[i], len(seq.prompt))
                    token = int(q.argmax()) if seq.params.greedy else int(torch.multinomial(q, 1,
                                                                                            generator=seq.generator))
                drafts[i].append(token)
                probs[i].append(q)
                feeds[i] = [token]
                if token in ends[i]:
                    ended.add(i)
        if solo is not None:
            solo.flush(self.pool, seqs[live[0]].draft_blocks)
        return drafts, probs

    def _solo_for(self, seq: Sequence) -> SoloCache:
        """The fast-path copy of seq's draft K/V: kept while the same sequence goes on drafting alone, rebuilt from
        the pool (which every proposal has been flushed into) when another sequence drafts alone."""
        solo = self._solo
        if solo is None or solo.seq_id != seq.id or solo.length != seq.draft_cached:
            solo = self._solo = SoloCache(seq.id, self.model, self.pool, seq.draft_blocks, seq.draft_cached)
        return solo

    def rollback(self, seq: Sequence, num_valid: int) -> None:
        """Keep only the first num_valid cached draft tokens (the ones that agree with the committed tokens)."""
        seq.draft_cached = min(seq.draft_cached, num_valid)
        if self._solo is not None and self._solo.seq_id == seq.id:
            self._solo.truncate(seq.draft_cached)
        keep = blocks_for(seq.draft_cached + 1, self.block_size)
        if len(seq.draft_blocks) > keep:
            self.allocator.free(seq.id, seq.draft_blocks[keep:])
            del seq.draft_blocks[keep:]


def add_drafts(rows: list[ScheduledRow], spec: SpeculativeConfig, draft: DraftModel | None, scheduler: Scheduler,
               eos_id: int | None, max_len: int) -> None:
    """Draft for every row whose tokens are all in after this step: decode rows, and the last chunk of a prompt, so
    a request's first drafts are verified by its prompt's forward (one target forward fewer per request; the demo's
    answers take one or two rounds, benchmarks/results/speculative_demo.md). Each row gets at most what its
    max_new_tokens and the model's context leave room for, and drafts only where free KV blocks hold them."""
    drafting = [r for r in rows if r.completes]
    ks = []
    for r in drafting:
        seq = r.seq
        room = min(seq.params.max_new_tokens - len(seq.output) - 1, max_len - len(seq.tokens) - 1)
        longest = spec.num_draft_tokens
        if spec.adaptive:
            if seq.draft_length is None:
                seq.draft_length = DraftLength(spec.num_draft_tokens)
            longest = seq.draft_length.next_length()
        ks.append(max(0, min(longest, room)))
    ends = [end_ids(r.seq.params, eos_id) for r in drafting]
    if spec.method == "ngram":
        proposals = [cut_after_end(ngram_propose(r.seq.tokens, k, spec.ngram_max, spec.ngram_min), e) if k else []
                     for r, k, e in zip(drafting, ks, ends)]
        probs = [None] * len(drafting)
    else:
        proposals, probs = draft.propose([r.seq for r in drafting], ks, ends)
    for r, drafts, q in zip(drafting, proposals, probs):
        if drafts and scheduler.try_reserve(r.seq, r.seq.num_cached + r.num_new + len(drafts)):
            r.drafts = drafts
            r.draft_probs = q
        elif draft is not None:  # no room for the drafts: keep only the committed tokens' draft K/V
            draft.rollback(r.seq, len(r.seq.tokens))


def check_draft(draft: R1Config, target: R1Config, reads_target_tokens: bool) -> None:
    """Refuse a draft model the target cannot use: another vocabulary, a shorter context, or (one without
    encoders, `reads_target_tokens`) cross-attention that reads another width than the target's modality tokens."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"Engine: draft vocab_size={draft.vocab_size} != target {target.vocab_size}; the draft "
                         f"must share the tokenizer")
    if draft.max_seq_len < target.max_seq_len:
        raise ValueError(f"Engine: draft max_seq_len={draft.max_seq_len} < target {target.max_seq_len}")
    if reads_target_tokens and draft.cross_attn_layers and draft.memory_width != target.dim:
        raise ValueError(f"Engine: a draft without encoders reads the target's modality tokens (width {target.dim}) "
                         f"but its cross-attention reads width {draft.memory_width} (cross_attn_memory_dim); "
                         f"distill it with modality_tokens: teacher from this target, or pass a MultimodalR1 draft "
                         f"with its own encoders")


def check_token_source(draft: Any, target: Any) -> None:
    """Warn when a draft that reads its target's modality tokens (a MultimodalR1 without encoders) recorded a
    teacher (`config.token_source`) whose encoders, projectors and modality embeddings are not this target's: it
    reads tokens it was not trained on, so few of its drafts are accepted. Outputs are still the target's own,
    hence a warning, not an error. `target`: the target's MultimodalR1, or None (a bare backbone)."""
    source = draft.config.token_source
    if source is None or target is None or not target.modalities:
        return
    fingerprint = target.modality_fingerprint()
    if fingerprint != source.fingerprint:
        warnings.warn(f"Engine: the draft was distilled to read the modality tokens of {source.model} (fingerprint "
                      f"{source.fingerprint}), but this target's encoders, projectors and modality embeddings have "
                      f"fingerprint {fingerprint}; the draft reads tokens it was not trained on, so expect few "
                      f"accepted drafts (outputs stay the target's own). Distill a draft from this target.",
                      UserWarning, stacklevel=3)


def truncated_draft(model: R1Model, n_layers: int) -> R1Model:
    """A draft made of the target's first `n_layers` blocks plus its final norm and head (self-speculation,
    as in LayerSkip / Draft&Verify): no training, shares the tokenizer, cheaper per token by the layers dropped."""
    if not 1 <= n_layers < model.cfg.n_layers:
        raise ValueError(f"truncated_draft: n_layers={n_layers} must be in [1, {model.cfg.n_layers})")
    cfg = dataclasses.replace(model.cfg, n_layers=n_layers,
                              cross_attn_layers=[i for i in model.cfg.cross_attn_layers if i < n_layers])
    draft = R1Model(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    draft.load_state_dict(state, strict=True)
    param = next(model.parameters())
    return draft.to(device=param.device, dtype=param.dtype).eval()
