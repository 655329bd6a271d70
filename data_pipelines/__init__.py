"""Data pipelines: loaders, JSONL manifests, the multimodal dataset, collation and the Lightning data module.

Loaders and the error type import eagerly (they are light); the dataset / data-module stack loads on first use
so that encoders can `from data_pipelines import load_image` without importing Lightning.
"""
from __future__ import annotations

import importlib

from data_pipelines.audio import load_audio
from data_pipelines.errors import InputError
from data_pipelines.image import load_image

_LAZY = {
    "Record": "data_pipelines.manifest",
    "read_manifest": "data_pipelines.manifest",
    "MultimodalDataset": "data_pipelines.dataset",
    "MultimodalCollator": "data_pipelines.collate",
    "MultimodalDataModule": "data_pipelines.datamodule",
    "synthesize": "data_pipelines.synth",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")


__all__ = ["InputError", "load_audio", "load_image", *sorted(_LAZY)]
