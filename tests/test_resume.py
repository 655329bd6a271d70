"""Exact resume: a run SIGKILLed in the middle of an epoch and resumed with `--ckpt_path last` continues with the
losses of the uninterrupted run (data order, RNG streams -- dropout is on --, aux-free router bias, optimizer and
LR schedule restored). Atomic checkpoints: a save that dies half-way leaves the previous checkpoint loadable."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from data_pipelines.synth import synthesize
from e2e_utils import tiny_demo_config
from mmr1.checkpoint import AtomicCheckpointIO, read_checkpoint, remove_path, replace_with_staged
from scale_utils import ROOT, run_fit, scale_config, train_losses

STEPS, KILL_AT = 7, 5  # 3 batches of 8 per epoch (24 records): the kill lands in the middle of epoch 1
MODEL = {"backbone": {"dropout": 0.1, "moe": {"aux_free_bias": True}}}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    synthesize(data, num_train=20, num_val=8, num_test=8, text_records=4, seed=2)
    base = tiny_demo_config(tmp_path, data, max_steps=STEPS)
    callbacks = yaml.safe_load(base.read_text())["trainer"]["callbacks"]
    full = scale_config(base, tmp_path / "full", batch_size=8, model=MODEL)
    run_fit(full)
    expected = train_losses(tmp_path / "full")

    kill = {"class_path": "scale_utils.KillAtStep", "init_args": {"step": KILL_AT}}
    killed = scale_config(base, tmp_path / "run", batch_size=8, model=MODEL,
                          trainer={"callbacks": [*callbacks, kill]})
    assert run_fit(killed, check=False).returncode == -9
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    assert checkpoint["global_step"] == 4 and checkpoint["MultimodalDataModule"]["samples"] == 8  # mid-epoch
    resumed = scale_config(base, tmp_path / "run", batch_size=8, model=MODEL)
    run_fit(resumed, "--ckpt_path", "last")

    versions = sorted((tmp_path / "run" / "logs").iterdir())
    after = train_losses(versions[-1])
    assert sorted(after) == list(range(4, STEPS))
    for step in after:
        assert abs(after[step] - expected[step]) <= 1e-6, (step, after[step], expected[step])
    final = read_checkpoint(last)["state_dict"]
    reference = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    bias = "model.backbone.layers.1.ffn.router.expert_bias"
    assert reference[bias].abs().sum() > 0 and torch.equal(final[bias], reference[bias])


def test_atomic_save_failing_midway_keeps_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    big = torch.zeros(1 << 20)  # written to the temp file before the failure
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "a": big, "b": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_atomic_save_killed_midway_keeps_previous_checkpoint(tmp_path):
    """A process SIGKILLed while writing (here: at the fsync before the rename) leaves the old file intact."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from mmr1.checkpoint import AtomicCheckpointIO
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        AtomicCheckpointIO().save_checkpoint({{"step": 2, "w": torch.zeros(1 << 20)}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9
    assert torch.load(path, weights_only=True)["step"] == 1


def test_replace_with_staged_swaps_in_a_directory_over_whatever_was_there(tmp_path):
    """The last step of a sharded save: the staged directory becomes the checkpoint whether the target is an
    older sharded directory, a single-file checkpoint or absent; nothing but the new checkpoint is left, and a
    `.replaced` left by a crash between the two renames is cleared by the next swap."""
    def staged(step: int):
        directory = tmp_path / ".last.ckpt.partial"
        directory.mkdir()
        (directory / "meta.pt").write_text(str(step))
        return directory

    path = tmp_path / "last.ckpt"
    replace_with_staged(staged(1), path)  # nothing there yet
    assert (path / "meta.pt").read_text() == "1"
    (tmp_path / ".last.ckpt.replaced").mkdir()  # a crash between the renames of an earlier swap
    replace_with_staged(staged(2), path)  # over a directory
    assert (path / "meta.pt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    remove_path(path)
    path.write_text("single-file checkpoint")
    replace_with_staged(staged(3), path)  # over a file
    assert (path / "meta.pt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
