"""A third-party encoder for a new modality ("depth"), found only through its `mmr1.encoders` entry point."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipelines import InputError
from encoders import ModalityEncoder, create_encoder, list_encoders


def test_depth_encoder_appears_only_with_its_distribution(request):
    assert "depth_cnn" not in list_encoders()
    with pytest.raises(ValueError, match="unknown encoder 'depth_cnn'"):
        create_encoder("depth_cnn")
    assert "mmr1_depth_plugin" not in sys.modules  # `import encoders` never imports the plug-in itself

    name = request.getfixturevalue("depth_plugin")
    assert name == "depth_cnn" and "depth_cnn" in list_encoders()
    assert "mmr1_depth_plugin" not in sys.modules  # listed from metadata, imported only when asked for
    encoder = create_encoder("depth_cnn", size=16, patch_size=4, width=24)
    assert isinstance(encoder, ModalityEncoder) and type(encoder).__module__ == "mmr1_depth_plugin"
    assert encoder.modality == "depth" and encoder.output_dim == 24


def test_depth_encoder_end_to_end(depth_plugin, tmp_path):
    encoder = create_encoder(depth_plugin, size=16, patch_size=4, width=24)
    processor = pickle.loads(pickle.dumps(encoder.processor))  # weight-free, travels to data-loader workers
    rng = np.random.default_rng(0)
    np.save(tmp_path / "wide.npy", rng.uniform(0.5, 10.0, size=(12, 40)).astype(np.float32))
    np.save(tmp_path / "flat.npy", np.full((64, 48), 3.0))  # float64, constant 3 m
    items = [processor(tmp_path / "wide.npy"), processor(str(tmp_path / "flat.npy")),
             processor(rng.integers(0, 5000, size=(20, 20), dtype=np.uint16))]  # in-memory, millimetres
    assert all(item.shape == (1, 16, 16) and item.dtype == torch.float32 for item in items)
    torch.testing.assert_close(items[1], torch.full((1, 16, 16), 3.0), rtol=0, atol=1e-6)  # resize keeps levels

    batch = processor.collate(items)
    assert batch["values"].shape == (3, 1, 16, 16) and batch["mask"] is None
    tokens, mask = encoder(**batch)
    assert tokens.shape == (3, 16, 24) and mask.shape == (3, 16) and bool(mask.all())
    assert torch.isfinite(tokens).all()

    tokens.square().mean().backward()  # every weight takes part in the forward pass
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_depth_processor_rejects_bad_files(depth_plugin, tmp_path):
    processor = create_encoder(depth_plugin).processor
    bad = {
        "missing.npy": None,
        "objects.npy": np.array([{"a": 1}], dtype=object),  # needs pickle to load
        "volume.npy": np.zeros((2, 3, 4), dtype=np.float32),
        "labels.npy": np.array([["a", "b"]]),
        "holes.npy": np.array([[1.0, np.nan]]),
        "empty.npy": np.zeros((0, 5)),
        "text.npy": "not numpy at all",
    }
    for filename, content in bad.items():
        path = tmp_path / filename
        if isinstance(content, np.ndarray):
            np.save(path, content, allow_pickle=True)
        elif isinstance(content, str):
            path.write_text(content)
        with pytest.raises(InputError) as err:
            processor.load(path)
        assert err.value.source == str(path), filename
    np.savez(tmp_path / "archive.npz", depth=np.zeros((4, 4)))
    with pytest.raises(InputError, match="single .npy array, got a NpzFile"):
        processor.load(tmp_path / "archive.npz")
    with pytest.raises(InputError, match="shape \\(2, 3, 4\\)"):
        processor.load(tmp_path / "volume.npy")
    with pytest.raises(InputError, match="expected a .npy path or a numpy array, got list"):
        processor.load([[1.0]])


def test_subprocess_sees_the_plugin(depth_plugin):
    code = ("import encoders; print(encoders.list_encoders()); "
            "print(encoders.create_encoder('depth_cnn', width=8).output_dim)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    listed, width = result.stdout.strip().splitlines()[-2:]
    assert "'depth_cnn'" in listed and "'clip_vit'" in listed
    assert width == "8"
