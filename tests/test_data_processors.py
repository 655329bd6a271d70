"""Small `ModalityProcessor`s used by the data-pipeline tests (image, audio and a plug-in "depth"), and their tests.

The other tests/test_data_*.py files import these; data_pipelines itself knows no modality names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import InputError, load_audio, load_image
from encoders.base import ModalityProcessor


class ImageProcessor(ModalityProcessor):
    """load_image + a fixed resize -> (3, size, size) floats in [0, 1]."""

    modality = "image"

    def __init__(self, size: int = 16):
        self.size = size
        self.loads = 0

    def load(self, source):
        self.loads += 1
        return load_image(source)

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        pixels = np.asarray(raw.resize((self.size, self.size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, S, S)

    def collate(self, items):
        return {"values": torch.stack(items), "mask": None}  # (N, 3, S, S)


class AudioProcessor(ModalityProcessor):
    """load_audio at 8 kHz; collate right-pads with zeros and marks real samples in the mask."""

    modality = "audio"

    def __init__(self, sample_rate: int = 8000, max_seconds: float | None = 2.0):
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.loads = 0

    def load(self, source):
        self.loads += 1
        return load_audio(source, target_sr=self.sample_rate, max_seconds=self.max_seconds)

    def preprocess(self, raw: torch.Tensor) -> torch.Tensor:
        return raw  # (T,)

    def collate(self, items):
        length = max(item.shape[0] for item in items)
        values = torch.zeros(len(items), length)  # (N, S)
        mask = torch.zeros(len(items), length, dtype=torch.bool)  # (N, S)
        for i, item in enumerate(items):
            values[i, : item.shape[0]] = item
            mask[i, : item.shape[0]] = True
        return {"values": values, "mask": mask}


class DepthProcessor(ModalityProcessor):
    """A plug-in modality: a 2-D float depth map stored as .npy (never unpickled)."""

    modality = "depth"

    def load(self, source):
        depth = np.load(Path(source), allow_pickle=False)
        if depth.ndim != 2:
            raise InputError(f"expected a 2-D depth map, got shape {depth.shape}", source=str(source))
        return depth

    def preprocess(self, raw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(raw.astype(np.float32))[None]  # (1, H, W)

    def collate(self, items):
        return {"values": torch.stack(items), "mask": None}  # (N, 1, H, W)


def test_image_processor_resizes_to_fixed_rgb_tensor(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    tensor = ImageProcessor(size=8)(path)
    assert tensor.shape == (3, 8, 8)
    assert torch.equal(tensor[0], torch.ones(8, 8)) and torch.equal(tensor[1:], torch.zeros(2, 8, 8))


def test_audio_processor_pads_right_and_masks_real_samples():
    proc = AudioProcessor()
    batch = proc.collate([torch.ones(3), torch.full((5,), 2.0)])
    assert torch.equal(batch["values"], torch.tensor([[1.0, 1, 1, 0, 0], [2, 2, 2, 2, 2]]))
    assert batch["mask"].sum(dim=1).tolist() == [3, 5]


def test_depth_processor_refuses_pickled_npy(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        DepthProcessor().load(path)
