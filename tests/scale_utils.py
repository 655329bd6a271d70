"""Helpers for the multi-process tests: mixed-modality manifests, `mmr1 fit` in a subprocess, logged losses."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"image": ("image",), "audio": ("audio",), "both": ("image", "audio"), "text": ()}


def kind_of(record: dict) -> str:
    keys = tuple(k for k in ("image", "audio") if k in record)
    return next(kind for kind, ks in KINDS.items() if ks == keys)


def mixed_manifest(data_dir: Path, blocks: list[str], block_size: int, name: str = "mixed.jsonl") -> Path:
    """A train manifest in `data_dir` whose consecutive blocks of `block_size` records all carry the modality
    set `blocks[i]` ("image", "audio", "both", "text"); records are reused (with new ids) as needed."""
    records = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    by_kind = {kind: [r for r in records if kind_of(r) == kind] for kind in KINDS}
    used = {kind: 0 for kind in KINDS}
    lines = []
    for b, kind in enumerate(blocks):
        for i in range(block_size):
            record = dict(by_kind[kind][used[kind] % len(by_kind[kind])], id=f"mixed-{b}-{i}")
            used[kind] += 1
            lines.append(json.dumps(record))
    path = data_dir / name
    path.write_text("\n".join(lines) + "\n")
    return path


def scale_config(base: Path, out: Path, *, batch_size: int, devices: int = 1, strategy: str | dict = "auto",
                 model: dict | None = None, data: dict | None = None, trainer: dict | None = None) -> Path:
    """A copy of the tiny YAML `base` with the given batch size, devices, strategy and overrides."""
    cfg = yaml.safe_load(base.read_text())
    cfg["trainer"].update(devices=devices, strategy=strategy, limit_val_batches=0, num_sanity_val_steps=0,
                          **(trainer or {}))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out)
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"].update(dirpath=str(out / "checkpoints"), monitor=None, filename="step{step}")
            cb["init_args"].pop("mode", None)
    cfg["data"].update(batch_size=batch_size, **(data or {}))
    deep_update(cfg["model"], model or {})
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def deep_update(target: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value
    return target


def run_fit(config: Path, *extra: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m mmr1.cli fit --config config ...` in a subprocess (Lightning launches the other ranks)."""
    proc = run_python("-m", "mmr1.cli", "fit", "--config", config, *extra, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mmr1 fit failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_python(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python args...` (`-m module ...`, `-c code ...`) in a subprocess, offline, one thread per process, with the
    repository and tests/ importable; output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """{step: logged value} from every CSVLogger metrics.csv under run_dir (later versions win)."""
    losses = {}
    for metrics in sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.parent.name):
        with open(metrics) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    losses[int(row["step"])] = float(row[key])
    return losses


class KillAtStep(lightning.Callback):
    """SIGKILL the own process (every rank runs it) right after optimizer step `step`, before any checkpoint of
    that step is written: a crash in the middle of an epoch."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInShardedSave(lightning.Callback):
    """SIGKILL every rank (rank 0 is Lightning's launcher: it kills the ranks it started, then itself) while rank
    0 writes `meta.pt` of the sharded `last.ckpt` at optimizer step `step`: after every rank has written its
    shards of that step, before the save is complete. A crash in the middle of overwriting a checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.global_rank != 0:
            return
        save = torch.save

        def save_or_die(obj, f, *args, **kwargs):
            if str(f).endswith("meta.pt") and "last.ckpt" in str(f) and trainer.global_step == self.step:
                for proc in trainer.strategy.launcher.procs:
                    proc.kill()
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *args, **kwargs)

        torch.save = save_or_die  # ModelParallelStrategy looks torch.save up when it saves
