"""A third-party encoder for a modality mmr1 does not know: depth maps.

This package stands in for a plug-in installed from elsewhere. It never registers itself: mmr1 finds it only
through the entry point its distribution declares, as a real package would in its pyproject.toml:

    [project.entry-points."mmr1.encoders"]
    depth_cnn = "mmr1_depth_plugin:DepthEncoder"

A depth map is a `.npy` file holding a 2-D `(H, W)` real-valued array (e.g. metres), or such an array in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines import InputError
from encoders import ModalityEncoder, ModalityProcessor


class DepthProcessor(ModalityProcessor):
    """`.npy` depth map -> `(1, size, size)` float tensor (bilinear resize); every map gets the same size."""

    def __init__(self, size: int = 32, modality: str = "depth"):
        self.size = size
        self.modality = modality

    def load(self, source: Any) -> np.ndarray:
        if isinstance(source, np.ndarray):
            return _check_depth(source, f"<numpy array {source.shape} {source.dtype}>")
        if not isinstance(source, (str, Path)):
            raise InputError(f"expected a .npy path or a numpy array, got {type(source).__name__}",
                             source=repr(source)[:80])
        name = str(source)
        if not Path(source).is_file():
            raise InputError("depth file not found", source=name)
        try:
            # allow_pickle=False: a depth file is data, never code to run.
            depth = np.load(source, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"not a readable .npy array ({e}); expected a 2-D float array saved with np.save",
                             source=name) from None
        if not isinstance(depth, np.ndarray):  # np.load returns an NpzFile for .npz archives
            raise InputError(f"expected a single .npy array, got a {type(depth).__name__}", source=name)
        return _check_depth(depth, name)

    def preprocess(self, depth: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(depth.astype(np.float32))[None, None]  # (1, 1, H, W)
        resized = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                antialias=True)
        return resized[0]  # (1, size, size)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"values": torch.stack(items), "mask": None}  # (N, 1, size, size)

    def dummy_input(self) -> torch.Tensor:
        return torch.zeros(1, self.size, self.size)  # a flat depth map


def _check_depth(depth: np.ndarray, name: str) -> np.ndarray:
    if depth.ndim != 2 or min(depth.shape) < 1:
        raise InputError(f"expected a 2-D (H, W) depth map, got shape {depth.shape}", source=name)
    if depth.dtype.kind not in "fiu":
        raise InputError(f"expected a real-valued depth map, got dtype {depth.dtype}", source=name)
    if not np.isfinite(depth).all():
        raise InputError("depth map contains NaN or infinite values", source=name)
    return depth


class DepthEncoder(ModalityEncoder):
    """Patchify a depth map with a strided conv, add positions, one residual MLP: `(B, (size/patch)^2, width)`."""

    def __init__(self, size: int = 32, patch_size: int = 8, width: int = 64, modality: str = "depth",
                 freeze: bool = False):
        super().__init__()
        if size % patch_size:
            raise ValueError(f"size {size} must be a multiple of patch_size {patch_size}")
        num_patches = (size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(1, width, kernel_size=patch_size, stride=patch_size)
        self.embed_norm = nn.LayerNorm(width)  # depth units (m, mm) vary by sensor: normalise the patch features
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches, width))
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.out_norm = nn.LayerNorm(width)
        self.modality = modality
        self.output_dim = width
        self.processor = DepthProcessor(size, modality)
        self.set_frozen(freeze)

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # values: (B, 1, size, size)
        x = self.patch_embed(values.to(self.patch_embed.weight.dtype))  # (B, width, g, g)
        x = self.embed_norm(x.flatten(2).transpose(1, 2)) + self.pos_embed  # (B, g*g, width)
        x = self.out_norm(x + self.mlp(x))
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
