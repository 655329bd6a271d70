"""What Engine.add_request refuses before anything is queued: unknown inputs, missing files, stop tokens or prompt
ids outside the vocabulary, an empty prompt, and a request longer than the context or the whole KV pool. Refusing
here (one clear error naming what is wrong) beats failing later in an encoder worker or mid-batch."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence as Seq

from data_pipelines.errors import InputError
from mmr1.engine.block_manager import blocks_for
from mmr1.engine.config import SamplingParams
from mmr1.model import foreign_tokens_hint

if TYPE_CHECKING:
    from mmr1.engine.engine import Engine


def checked_prompt_ids(engine: "Engine", prompt: str | Seq[int], params: SamplingParams, inputs: dict[str, Any],
                       input_item: int | None) -> list[int]:
    """The request's prompt token ids, once every check has passed."""
    modalities = engine.multimodal.modalities if engine.multimodal is not None else []
    unknown = sorted(set(inputs) - set(modalities))
    if unknown:
        source = engine.multimodal.config.token_source if engine.multimodal is not None else None
        raise TypeError(f"Engine.add_request: unknown input(s) {unknown}; this model takes {modalities}"
                        + foreign_tokens_hint(engine.backbone.cfg, modalities, source))
    for modality, source in inputs.items():  # a missing file fails here, not later in an encoder worker
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise InputError(f"{modality} file not found", source=str(source), item=input_item)
    cfg = engine.backbone.cfg
    bad = [t for t in params.stop_token_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"Engine.add_request: stop_token_ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
    ids = _prompt_ids(engine.tokenizer, prompt, [m for m in modalities if m in inputs], cfg.vocab_size)
    total = len(ids) + params.max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"Engine.add_request: prompt ({len(ids)} tokens) + max_new_tokens "
                         f"({params.max_new_tokens}) exceeds max_seq_len={cfg.max_seq_len}")
    pool = engine.allocator.num_blocks
    if blocks_for(total, engine.cfg.block_size) > pool:
        raise ValueError(f"Engine.add_request: {total} tokens need more KV blocks than the pool has "
                         f"({pool} x {engine.cfg.block_size}); raise EngineConfig.num_blocks")
    return ids


def _prompt_ids(tokenizer: Any, prompt: str | Seq[int], present: list[str], vocab: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TypeError("Engine.add_request: a text prompt needs Engine(model, tokenizer)")
        return tokenizer.encode_prompt(prompt, present)
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("Engine.add_request: the prompt is empty; it needs at least one token (e.g. <bos>)")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"Engine.add_request: prompt token ids must be in [0, {vocab})")
    return ids
