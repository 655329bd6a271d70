"""Per-request sampling on top of mmr1.generation: penalties, min_tokens, per-request generators, logprobs, and
the processed distribution speculative decoding needs for rejection sampling.

Order (as vLLM): repetition / presence / frequency penalties and the min_tokens mask on the raw logits, then
greedy argmax, or temperature -> top-k -> top-p -> min-p and a draw from the request's own generator.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from mmr1.engine.config import SamplingParams
from mmr1.generation import sample_next_token, warp_logits


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """logits (V,): tokens in `seen` get logit / penalty when positive, logit * penalty when negative."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_presence_frequency(logits: torch.Tensor, output: Sequence[int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens: logit -= presence * [count > 0] + frequency * count."""
    if (presence == 0.0 and frequency == 0.0) or not output:
        return logits
    counts = Counter(output)
    ids = torch.tensor(list(counts), device=logits.device)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    logits = logits.clone()
    logits[ids] -= presence + frequency * n
    return logits


def penalized_logits(logits: torch.Tensor, params: SamplingParams, tokens: Sequence[int], num_prompt: int = 0,
                     end_ids: Sequence[int] = ()) -> torch.Tensor:
    """Raw logits (V,) -> fp32 logits after the penalties; `tokens` is prompt + output so far (the first
    `num_prompt` are the prompt). While fewer than `min_tokens` are out, `end_ids` (eos, stop tokens) are -inf."""
    logits = apply_repetition_penalty(logits.float(), tokens, params.repetition_penalty)
    logits = apply_presence_frequency(logits, tokens[num_prompt:], params.presence_penalty, params.frequency_penalty)
    if end_ids and len(tokens) - num_prompt < params.min_tokens:
        logits = logits.clone()
        logits[list(end_ids)] = float("-inf")
    return logits


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()  # nondeterministic, but still private to the request
    else:
        g.manual_seed(seed)
    return g


def plain_greedy(params: SamplingParams, num_output: int) -> bool:
    """Whether sample_row is just the argmax of the raw logits: greedy, no penalty, min_tokens already met."""
    return (params.greedy and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and num_output >= params.min_tokens)


def greedy_tokens(last_logits: Sequence[torch.Tensor]) -> list[int]:
    """Argmax of each row's logits (V,) in one kernel and one device-to-host copy (an argmax per row would wait
    for the device once per row)."""
    return torch.stack(list(last_logits)).argmax(dim=-1).tolist()


def sample_row(logits: torch.Tensor, params: SamplingParams, tokens: Sequence[int], generator: torch.Generator,
               num_prompt: int = 0, end_ids: Sequence[int] = ()) -> int:
    """One request's next token from its last logits (V,)."""
    logits = penalized_logits(logits, params, tokens, num_prompt, end_ids)
    if params.greedy:
        return int(logits.argmax())
    token = sample_next_token(logits[None].cpu(), params.temperature, params.top_k, params.top_p, generator,
                              params.min_p)
    return int(token[0])


def processed_probs(logits: torch.Tensor, params: SamplingParams, tokens: Sequence[int], num_prompt: int = 0,
                    end_ids: Sequence[int] = ()) -> torch.Tensor:
    """The distribution sample_row draws from, (V,) fp32 on the CPU (where the request's generator lives). Greedy
    is the one-hot of the argmax."""
    logits = penalized_logits(logits.cpu(), params, tokens, num_prompt, end_ids)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
    return warp_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict[int, float]:
    """Log-probabilities under the model's raw distribution (log-softmax of the logits, before penalties and
    temperature, as vLLM reports by default): the chosen token's and the `top` most likely tokens'."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = {}
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]))
        out = dict(zip(ids.tolist(), values.tolist()))
    out[token] = float(logp[token])
    return out
