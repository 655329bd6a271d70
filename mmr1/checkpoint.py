"""Checkpoint I/O: Lightning checkpoints -> exported model directories (safetensors, no pickle)."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from mmr1.model import CONFIG_NAME, MultimodalConfig, MultimodalR1
from mmr1.tokenizer import R1Tokenizer

MODEL_PREFIX = "model."


def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "mmr1" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by `mmr1 fit` (no 'mmr1' section / state_dict)")
    return checkpoint


def model_from_checkpoint(path: str | Path) -> tuple[MultimodalR1, R1Tokenizer]:
    checkpoint = read_checkpoint(path)
    config = MultimodalConfig.from_dict(checkpoint["mmr1"]["config"])
    tokenizer = R1Tokenizer(Tokenizer.from_str(checkpoint["mmr1"]["tokenizer"]))
    model = MultimodalR1(config)
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    output = Path(output)
    if (output / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(f"{output} already holds an exported model; pass --overwrite to replace it")
    model, tokenizer = model_from_checkpoint(checkpoint)
    return model.save_pretrained(output, tokenizer)
