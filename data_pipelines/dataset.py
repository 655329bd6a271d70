"""The multimodal dataset: records + one processor per modality + the tokenizer -> training examples.

`validate()` decodes every file once, in the main process, at setup time, so a broken file fails before
training starts (or is skipped and reported) and never inside a data-loader worker mid-epoch. With
`cache=True` the preprocessed tensors from that pass are kept, so training never decodes a file twice.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from data_pipelines.errors import InputError
from data_pipelines.manifest import Record
from mmr1.tokenizer import IGNORE_INDEX

log = logging.getLogger(__name__)


class MultimodalDataset(Dataset):
    """`processors` is ordered: its key order is the order of the modality markers in every prompt."""

    def __init__(self, records: Sequence[Record], processors: Mapping[str, Any], tokenizer: Any, *,
                 manifest: str = "", max_length: int = 256, cache: bool = True):
        self.records = list(records)
        self.processors = dict(processors)
        self.tokenizer = tokenizer
        self.manifest = str(manifest) if manifest else None
        self.max_length = max_length
        self.cache = cache
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}  # record id -> modality key -> tensor

    def __len__(self) -> int:
        return len(self.records)

    # ---- validation -----------------------------------------------------------------------------
    def validate(self, skip_bad: bool = False) -> dict:
        """Decode every file of every record once and check every example's token length.

        Raises the first `InputError` (located with manifest and record id) unless `skip_bad`, in which case
        bad records are dropped and reported: `{"records": n_ok, "skipped": n_bad, "errors": [messages]}`.
        """
        good: list[Record] = []
        errors: list[str] = []
        self._tensors.clear()
        for record in self.records:
            try:
                tensors = self._load_record(record)
                self._encode(record, list(tensors))
            except InputError as e:
                if not skip_bad:
                    raise
                errors.append(str(e))
                continue
            good.append(record)
            if self.cache:
                self._tensors[record.id] = tensors
        self.records = good
        if errors:
            log.warning("skipped %d bad record(s) of %d in %s; first: %s", len(errors), len(good) + len(errors),
                        self.manifest or "<records>", errors[0])
        return {"records": len(good), "skipped": len(errors), "errors": errors}

    def _load_record(self, record: Record) -> dict[str, torch.Tensor]:
        """Every modality of `record`, loaded and preprocessed, in processor order."""
        unknown = [key for key in record.sources if key not in self.processors]
        if unknown:
            raise self._locate(InputError(
                f"uses modality {unknown[0]!r} but the model has no processor for it "
                f"(known modalities: {list(self.processors)})", source=str(record.sources[unknown[0]])), record)
        tensors = {}
        for key, processor in self.processors.items():
            if key in record.sources:
                tensors[key] = self._load_file(record, key, processor)
        return tensors

    def _load_file(self, record: Record, key: str, processor: Any) -> torch.Tensor:
        path = record.sources[key]
        try:
            if not path.is_file():
                # Checked here so every processor, plug-ins included, reports a missing file the same way.
                raise InputError(f"{key} file not found" if not path.exists() else
                                 f"expected a {key} file, found a directory or special file", source=str(path))
            tensor = processor.preprocess(processor.load(path))
            if not isinstance(tensor, torch.Tensor):
                raise InputError(f"the {key} processor returned {type(tensor).__name__}, expected a tensor",
                                 source=str(path))
        except InputError as e:
            raise self._locate(e if e.source else InputError(e.reason, source=str(path), item=e.item), record)
        except Exception as e:  # any processor failure is a bad input as far as the user can tell
            raise self._locate(InputError(f"cannot load {key} ({type(e).__name__}: {e})", source=str(path)),
                               record) from e
        return tensor

    def _locate(self, error: InputError, record: Record) -> InputError:
        return error.located(record=record.id, manifest=self.manifest)

    # ---- examples -------------------------------------------------------------------------------
    def _encode(self, record: Record, modalities: list[str]) -> tuple[list[int], list[int]]:
        """Token ids and labels; `modalities` in processor order. Over-long examples are errors, never cut."""
        tok = self.tokenizer
        if record.is_text:
            input_ids, labels = tok.encode_text(record.text)
        elif record.answer is None:  # prediction record: the prompt only, nothing to learn
            input_ids = tok.encode_prompt(record.question, modalities)
            labels = [IGNORE_INDEX] * len(input_ids)
        else:
            input_ids, labels = tok.encode_example(record.question, record.answer, modalities=modalities)
        if len(input_ids) > self.max_length:
            raise self._locate(InputError(
                f"example is {len(input_ids)} tokens, over max_length={self.max_length}; examples are never "
                "truncated, so shorten the text or raise max_length"), record)
        return input_ids, labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        tensors = self._tensors.get(record.id)
        if tensors is None:
            tensors = self._load_record(record)
        input_ids, labels = self._encode(record, list(tensors))
        return {"id": record.id, "input_ids": input_ids, "labels": labels, "modalities": tensors,
                "question": record.question, "answer": record.answer, "type": record.type,
                "text": record.text}
