"""Committing sampled tokens to a request: eos / stop tokens / stop strings / length, min_tokens, the final text."""
from __future__ import annotations

import time
from typing import Any

from mmr1.engine.config import SamplingParams
from mmr1.engine.sequence import Sequence


def end_ids(params: SamplingParams, eos_id: int | None) -> tuple[int, ...]:
    """The tokens that end a request (eos unless ignored, its stop tokens); sampling masks them before min_tokens."""
    eos = () if params.ignore_eos or eos_id is None else (eos_id,)
    return (*eos, *params.stop_token_ids)


def commit_token(seq: Sequence, token: int, ends: tuple[int, ...], tokenizer: Any) -> bool:
    """Append one sampled token to seq's output, or finish seq on it (`ends`: end_ids); True when done."""
    if seq.first_token_time is None:
        seq.first_token_time = time.perf_counter()
    p = seq.params
    if token in ends:
        seq.finish("stop")
    else:
        seq.output.append(token)
        if p.stop and len(seq.output) >= p.min_tokens and _cut_at_stop_string(seq, tokenizer):
            seq.finish("stop")
        elif len(seq.output) >= p.max_new_tokens:
            seq.finish("length")
    if seq.finished and tokenizer is not None and seq.text is None:
        seq.text = tokenizer.decode(seq.output)
    return seq.finished


def _cut_at_stop_string(seq: Sequence, tokenizer: Any) -> bool:
    """Whether the decoded output holds a stop string ending after its first min_tokens tokens; seq.text is then
    the output cut where the first such string begins."""
    if tokenizer is None:
        raise ValueError("SamplingParams.stop (strings) needs Engine(model, tokenizer)")
    text = tokenizer.decode(seq.output)
    start = len(tokenizer.decode(seq.output[:seq.params.min_tokens])) if seq.params.min_tokens else 0
    cuts = [i for i in (text.find(s, max(0, start - len(s) + 1)) for s in seq.params.stop) if i >= 0]
    if cuts:
        seq.text = text[:min(cuts)]
    return bool(cuts)
