"""Batching: token sequences are right-padded; each modality is collated over only the items that carry it.

    {"ids": [str] * B,
     "input_ids": (B, L) long, "attention_mask": (B, L) bool, "labels": (B, L) long (IGNORE_INDEX on pad),
     "modalities": {key: {"values": (N, ...), "mask": (N, S) bool | None, "present": (B,) bool}},
     "questions": [...], "answers": [...], "types": [...]}

N = present.sum(); `values[j]` belongs to the j-th batch item whose `present` is True. A modality no item of the
batch carries is absent from "modalities", so the model skips its encoder for that batch.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from data_pipelines.errors import InputError
from mmr1.tokenizer import IGNORE_INDEX


class MultimodalCollator:
    """Callable `list[example] -> batch`; picklable (holds only the pad id and weight-free processors)."""

    def __init__(self, pad_id: int, processors: Mapping[str, Any]):
        self.pad_id = pad_id
        self.processors = dict(processors)

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        input_ids, attention_mask, labels = self._pad_tokens(examples)
        return {
            "ids": [ex["id"] for ex in examples],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "modalities": self._collate_modalities(examples),
            "questions": [ex.get("question") for ex in examples],
            "answers": [ex.get("answer") for ex in examples],
            "types": [ex.get("type") for ex in examples],
        }

    def _pad_tokens(self, examples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length = len(examples), max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)  # (B, L)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((batch, length), dtype=torch.bool)  # (B, L)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            if len(ex["labels"]) != n:
                raise InputError(f"example has {n} input ids but {len(ex['labels'])} labels",
                                 record=ex.get("id"), item=i)
            input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
            attention_mask[i, :n] = True
        return input_ids, attention_mask, labels

    def _collate_modalities(self, examples: Sequence[dict]) -> dict[str, dict[str, torch.Tensor | None]]:
        for i, ex in enumerate(examples):
            unknown = [key for key in ex.get("modalities", {}) if key not in self.processors]
            if unknown:
                raise InputError(f"carries modality {unknown[0]!r} but there is no processor for it "
                                 f"(known modalities: {list(self.processors)})", record=ex.get("id"), item=i)
        out = {}
        for key, processor in self.processors.items():
            present = torch.tensor([key in ex.get("modalities", {}) for ex in examples], dtype=torch.bool)  # (B,)
            if not present.any():
                continue
            items = [ex["modalities"][key] for ex in examples if key in ex.get("modalities", {})]
            try:
                collated = processor.collate(items)
            except Exception as e:
                ids = [ex.get("id") for ex in examples if key in ex.get("modalities", {})]
                raise InputError(f"cannot batch the {key} inputs of records {ids} "
                                 f"({type(e).__name__}: {e})") from e
            out[key] = {"values": collated["values"], "mask": collated.get("mask"), "present": present}
        return out
