"""Per-request sampling on top of mmr1.generation.sample_next_token: repetition penalty, per-request generators,
and the processed distribution speculative decoding needs for rejection sampling."""
from __future__ import annotations

import torch

from mmr1.engine.config import SamplingParams
from mmr1.generation import sample_next_token


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """logits (V,): tokens in `seen` get logit / penalty when positive, logit * penalty when negative."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()  # nondeterministic, but still private to the request
    else:
        g.manual_seed(seed)
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams, seen: list[int], generator: torch.Generator) -> int:
    """One request's next token from its last logits (V,)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    token = sample_next_token(logits[None].cpu(), params.temperature, params.top_k, params.top_p, generator)
    return int(token[0])


def processed_probs(logits: torch.Tensor, params: SamplingParams, seen: list[int]) -> torch.Tensor:
    """The distribution sample_row draws from, (V,) fp32: penalty, temperature, top-k, top-p (same rules as
    sample_next_token). Greedy is the one-hot of the argmax. On the CPU, where the request's generator lives."""
    logits = apply_repetition_penalty(logits.float().cpu(), seen, params.repetition_penalty)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)
