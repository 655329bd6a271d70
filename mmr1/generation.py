"""Batched autoregressive generation with the R1 backbone: left-padded prefill, then KV-cached decoding."""
from __future__ import annotations

import torch

from mmr1.backbone import R1Model
from mmr1.kv_cache import KVCache


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None, min_p: float = 0.0) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Greedy when temperature == 0, else temperature/top-k/top-p/min-p
    sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0) -> torch.Tensor:
    """logits (..., V) -> fp32 logits of the sampling distribution: divided by temperature (> 0), then tokens
    outside the top-k, outside the top-p nucleus, or less likely than min_p x the most likely one set to -inf."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely token always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> input_ids (B, P) padded on the left, so every last prompt token sits in column P - 1, and
    the matching attention mask (B, P), True = real token."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
            mask[row, width - len(prompt):] = True
    return input_ids, mask


@torch.inference_mode()
def generate(model: R1Model, prompts: list[list[int]], *, cross_states: torch.Tensor | None = None,
             cross_mask: torch.Tensor | None = None, max_new_tokens: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: int | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None, min_p: float = 0.0) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens, cut before `eos_id`.

    cross_states (B, T, dim) / cross_mask (B, T) are the modality tokens of each prompt (same order); their
    cross-attention K/V are computed once at prefill. The model runs in eval mode and is restored afterwards.
    """
    if not prompts:
        return []
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"generate: prompts {empty} are empty; each prompt needs at least one token (e.g. <bos>)")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                         f"got {temperature}, {top_p}, {top_k}")
    width = max(len(p) for p in prompts)
    if width + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"generate: longest prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]

    if cross_states is not None and cross_states.shape[0] != len(prompts):
        raise ValueError(f"generate: cross_states has {cross_states.shape[0]} rows for {len(prompts)} prompts")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        input_ids, mask = left_pad(prompts, pad_id, device)
        B = len(prompts)
        positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, P): each prompt starts at 0
        cache = KVCache.for_model(model.cfg, B, max_len=width + max_new_tokens, device=device)
        logits = model(input_ids, attention_mask=mask, position_ids=positions, cross_states=cross_states,
                       cross_mask=cross_mask, cache=cache).logits[:, -1]  # (B, V)
        next_position = positions[:, -1:] + 1  # (B, 1)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, generator, min_p)  # (B,)
            token = token.masked_fill(finished, pad_id)
            new_tokens.append(token)
            if eos_id is not None:
                finished |= token == eos_id
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break  # the last token needs no forward pass
            logits = model(token[:, None], position_ids=next_position, cache=cache).logits[:, -1]
            next_position = next_position + 1
    finally:
        model.train(was_training)

    tokens = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    if eos_id is not None:
        tokens = [row[:row.index(eos_id)] if eos_id in row else row for row in tokens]
    return tokens


def generate_with_inputs(model, prompt: list[int], inputs: dict, max_new_tokens: int = 16, **kwargs) -> list[int]:
    """One request to a MultimodalR1 the simple way (the engine's reference): its raw inputs (`{"image": path or
    array, "audio": ...}`) loaded and encoded alone, then `generate` on the backbone; returns the new tokens."""
    modalities = {}
    for key, source in inputs.items():
        processor = model.encoders[key].processor
        modalities[key] = {**processor.collate([processor(source)]), "present": torch.tensor([True])}
    with torch.no_grad():
        states, mask = model.encode_batch(modalities, 1)
    return generate(model.backbone, [prompt], cross_states=states, cross_mask=mask, max_new_tokens=max_new_tokens,
                    **kwargs)[0]
