"""Running the backbone on a paged batch, and the per-request modality memory (encode, fuse, cross K/V)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from fusion.queues import EncodedInput
from mmr1.backbone import R1Model
from mmr1.engine.packed import PackedBatch
from mmr1.engine.paged_cache import PagedBatch, PagedKVPool


@torch.inference_mode()
def forward_paged(model: R1Model, pool: PagedKVPool, feeds: list[list[int]], cached: list[int],
                  tables: list[list[int]], cross: list[dict | None] | None = None) -> torch.Tensor:
    """Row i continues its `cached[i]` cached tokens with the tokens `feeds[i]`; returns logits (B, L, V) with
    row i's in [:len(feeds[i])] (right-padded). The new tokens' K/V are written into the rows' blocks."""
    device = pool.keys[0].device
    view = PagedBatch(pool, tables, cached, [len(f) for f in feeds], cross, device)
    input_ids = torch.zeros(len(feeds), view.new_len, dtype=torch.long)
    for i, f in enumerate(feeds):
        input_ids[i, :len(f)] = torch.tensor(f, dtype=torch.long)
    input_ids = input_ids.to(device)
    positions = view.position_ids(model.cfg.max_seq_len - 1)
    return model(input_ids, attention_mask=view.new_mask, position_ids=positions, cache=view).logits


@torch.inference_mode()
def forward_packed(model: R1Model, pool: PagedKVPool, feeds: list[list[int]], cached: list[int],
                   tables: list[list[int]], cross: list[dict | None] | None = None,
                   tails: list[int] | None = None) -> list[torch.Tensor]:
    """The same as forward_paged for every row in ONE packed sequence (mmr1.engine.packed): returns each row's
    logits (len(feeds[i]), V), or with `tails` only those of its last tails[i] tokens (tails[i], V): the output
    head then runs on the positions that are sampled from, not on every prompt token."""
    device = pool.keys[0].device
    view = PackedBatch(pool, tables, cached, [len(f) for f in feeds], cross, device)
    input_ids = torch.tensor([t for f in feeds for t in f], dtype=torch.long, device=device)[None]  # (1, N)
    positions = view.position_ids(model.cfg.max_seq_len - 1)
    if tails is None:
        logits = model(input_ids, position_ids=positions, cache=view).logits[0]  # (N, V)
        return [logits[o:o + len(f)] for o, f in zip(view.offsets, feeds)]
    keep = [i for o, f, t in zip(view.offsets, feeds, tails) for i in range(o + len(f) - t, o + len(f))]
    logits = model(input_ids, position_ids=positions, cache=view,
                   logits_at=torch.tensor(keep, dtype=torch.long, device=device)).logits[0]  # (sum tails, V)
    return list(logits.split(tails))


@torch.inference_mode()
def cross_kv_for(model: R1Model, cross_states: torch.Tensor | None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """A request's modality tokens (1, T, dim) -> {layer: (k, v) (1, H, T, Dh)}: once, at admission."""
    if cross_states is None or cross_states.shape[1] == 0:
        return {}
    return {i: block.cross_attn.memory_kv(cross_states) for i, block in enumerate(model.layers)
            if block.cross_attn is not None}


def fuse_one(modalities: list[str], encoded: Mapping[str, EncodedInput]) -> torch.Tensor | None:
    """One request's encodings -> its real modality tokens concatenated in the model's modality order (1, T, D)."""
    parts = [encoded[m].tokens[encoded[m].mask] for m in modalities if m in encoded]
    return torch.cat(parts, dim=0)[None] if parts else None


@torch.inference_mode()
def encode_inline(model: Any, inputs: Mapping[str, Any], item: int | None = None) -> dict[str, EncodedInput]:
    """What a ModalityQueues worker does, done in the caller's thread (the engine's inline-encoding mode)."""
    from data_pipelines.errors import InputError
    out = {}
    for key, source in inputs.items():
        processor = model.encoders[key].processor
        try:
            tensor = processor.preprocess(processor.load(source))
        except InputError as err:
            raise err.located(item=item) from None
        collated = processor.collate([tensor])
        tokens, mask = model.encode_modality(key, collated["values"], collated.get("mask"))
        out[key] = EncodedInput(tokens[0], mask[0])
    return out
