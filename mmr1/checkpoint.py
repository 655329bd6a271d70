"""Checkpoint I/O: Lightning checkpoints -> exported model directories (safetensors, no pickle), and atomic writes.

A checkpoint is either one file (`mmr1 fit` with DDP or one device) or, with FSDP's sharded checkpoints, a
directory of torch.distributed.checkpoint shards plus `meta.pt` (everything but the weights and optimizer
states). Both export the same way: `mmr1 export --checkpoint last.ckpt --output DIR`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from mmr1.model import CONFIG_NAME, MultimodalConfig, MultimodalR1
from mmr1.tokenizer import R1Tokenizer

MODEL_PREFIX = "model."
SHARDED_META = "meta.pt"  # Lightning ModelParallelStrategy's name for the non-tensor part of a sharded checkpoint


def is_sharded(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint (file or sharded directory) without unpickling arbitrary objects.

    For a sharded checkpoint the returned dict has everything but "state_dict" (see `model_from_checkpoint`)."""
    path = Path(path)
    if is_sharded(path):
        checkpoint = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
        if "mmr1" not in checkpoint:
            raise ValueError(f"{path} is not a checkpoint written by `mmr1 fit` (no 'mmr1' section in {SHARDED_META})")
        return checkpoint
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory but not a sharded checkpoint (no {SHARDED_META} inside)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "mmr1" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by `mmr1 fit` (no 'mmr1' section / state_dict)")
    return checkpoint


def model_from_checkpoint(path: str | Path, merge: bool = True) -> tuple[MultimodalR1, R1Tokenizer]:
    """The model a checkpoint holds and its tokenizer; LoRA adapters, if any, merged into the weights unless
    `merge=False`."""
    checkpoint = read_checkpoint(path)
    config = MultimodalConfig.from_dict(checkpoint["mmr1"]["config"])
    tokenizer = R1Tokenizer(Tokenizer.from_str(checkpoint["mmr1"]["tokenizer"]))
    model = _model_for(checkpoint, config)
    if is_sharded(path):
        load_sharded_weights(model, path)
    else:
        state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
        model.load_state_dict(state, strict=True)
    return (_merged(model) if merge else model).eval(), tokenizer


def _model_for(checkpoint: dict, config: MultimodalConfig) -> MultimodalR1:
    """The model the checkpoint's weights fit: with LoRA adapters when it was trained with `model.lora`."""
    model = MultimodalR1(config)
    lora = (checkpoint.get("hyper_parameters") or {}).get("lora")
    if lora:
        from mmr1.lora import LoRAConfig, apply_lora
        from mmr1.config import config_from_dict
        model = apply_lora(model, config_from_dict(LoRAConfig, lora))
    return model


def _merged(model: MultimodalR1) -> MultimodalR1:
    from mmr1.lora import has_lora, merge_lora
    return merge_lora(model) if has_lora(model) else model


def load_sharded_weights(model: MultimodalR1, path: str | Path) -> MultimodalR1:
    """Fill `model` from a torch.distributed.checkpoint directory in this one process (no process group):
    each tensor is assembled from the shards every rank wrote."""
    import torch.distributed.checkpoint as dcp

    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    wrapped = {"state_dict": state}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is exactly the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wrapped, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in wrapped["state_dict"].items()}, strict=True)
    return model


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False,
                      merge_lora: bool = False) -> Path:
    """Checkpoint (file or sharded directory) -> `from_pretrained` directory. A LoRA checkpoint needs
    `merge_lora=True`: the export format is a plain model, the adapters folded into its weights."""
    output = Path(output)
    if (output / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(f"{output} already holds an exported model; pass --overwrite to replace it")
    if (read_checkpoint(checkpoint).get("hyper_parameters") or {}).get("lora") and not merge_lora:
        raise ValueError(f"{checkpoint} was trained with LoRA adapters (model.lora); pass --merge-lora to export "
                         "the merged plain model")
    model, tokenizer = model_from_checkpoint(checkpoint)
    return model.save_pretrained(output, tokenizer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose saves are all-or-nothing: the checkpoint is written to a temporary file in
    the target's directory, flushed and fsync'ed, then renamed over the target (`os.replace`, atomic on POSIX),
    and the directory entry is fsync'ed. A crash or kill at any moment leaves either the previous checkpoint or
    the new one, never a truncated file. (Lightning's own TorchCheckpointIO writes the target in place.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint got storage_options={storage_options!r}; it has none")
        if not is_local(path):  # remote filesystems: no rename-over; fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(path.parent)


def replace_with_staged(staged: Path, path: Path) -> None:
    """Make the complete checkpoint directory `staged` (same parent) the checkpoint at `path`, whatever `path`
    holds now (a sharded directory, a file, nothing), and delete what it held.

    A rename cannot replace a non-empty directory, so the old checkpoint first moves aside to `.<name>.replaced`:
    only a crash between the two renames leaves no `path`, with the old checkpoint complete beside it. Everything
    is fsync'ed before the renames, and the directory after them."""
    for file in staged.iterdir():
        _fsync(file)
    _fsync(staged)
    aside = path.with_name(f".{path.name}.replaced")
    remove_path(aside)
    if path.exists() or path.is_symlink():
        os.replace(path, aside)
    os.replace(staged, path)
    _fsync(path.parent)
    remove_path(aside)


def remove_path(path: Path) -> None:
    """Delete a file, link or directory tree if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def is_local(path: str | Path) -> bool:
    return type(get_filesystem(str(path))).__name__ == "LocalFileSystem"


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
