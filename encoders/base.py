"""The plug-in interface: a modality encoder and its weight-free processor.

A `ModalityProcessor` turns one raw input (a path or an in-memory object) into a tensor and pads a list of
them into a batch. It holds no weights, so data-loader workers and the async modality queues can pickle it.
A `ModalityEncoder` is the `nn.Module` that maps a padded batch to tokens: `(B, T, output_dim)` + `(B, T)` mask.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ModalityProcessor:
    """Load -> preprocess -> collate for one modality. Subclasses override all three."""

    modality: str = ""

    def load(self, source: Any) -> Any:
        """Read and validate one raw input. `source` is a path (str/Path) or an in-memory object.

        Raises `data_pipelines.InputError` naming the file (or object) and what was expected.
        """
        raise NotImplementedError

    def preprocess(self, raw: Any) -> torch.Tensor:
        """One loaded input -> one tensor (no batch dim), ready for `collate`."""
        raise NotImplementedError

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pad `items` into `{"values": (N, ...), "mask": (N, S) bool or None}`.

        `mask` marks real input positions (e.g. audio samples) and is None when every input has the same size
        (e.g. resized images). The encoder turns it into a token-level mask.
        """
        raise NotImplementedError

    def dummy_input(self) -> torch.Tensor:
        """One preprocessed item (what `preprocess` returns) of the smallest valid size and no content.

        Distributed training runs every encoder on every rank in every step, also where the rank's batch lacks
        the modality (a "zero-contribution pass", see `MultimodalR1.encode_batch(encode_absent=True)`), so that
        all ranks run the same collectives in the same order. Plug-ins that train on several ranks implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} (modality {self.modality!r}) does not implement dummy_input(); distributed "
            "training with batches that lack this modality on some rank needs it: return one preprocessed item "
            "(the output of preprocess) of the smallest valid size")

    def __call__(self, source: Any) -> torch.Tensor:
        return self.preprocess(self.load(source))


class ModalityEncoder(nn.Module):
    """Base class of every encoder. Subclasses set `modality`, `output_dim`, `processor` and `forward`.

    `forward(values, mask)` takes what `processor.collate` returned and gives `(tokens, token_mask)`:
    tokens `(B, T, output_dim)`, token_mask `(B, T)` bool, True where a token is real.
    """

    modality: str = ""
    output_dim: int = 0
    processor: ModalityProcessor

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no grads, eval-mode dropout/norm statistics) or unfreeze every weight of the encoder."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            self.eval()

    def train(self, mode: bool = True) -> "ModalityEncoder":
        # A frozen encoder stays in eval mode even when the surrounding model trains.
        return super().train(mode and not getattr(self, "frozen", False))

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
