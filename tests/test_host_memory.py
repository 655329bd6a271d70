"""mmr1.host_memory: with freed memory kept, a large CPU tensor allocated again after free() is not faulted in
page by page. Each case runs in its own interpreter: the setting is process-wide and cannot be undone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmr1.host_memory import KeepFreedHostMemory, is_glibc, keep_freed_memory

# The fault probes need glibc's malloc; elsewhere keep_freed_memory returns False (test_elsewhere_it_is_a_no_op).
glibc_only = pytest.mark.skipif(not is_glibc(), reason="probes glibc's malloc")

# Allocate, touch and free a 64 MB tensor (above glibc's largest adaptive mmap threshold, 32 MB) again and again;
# print the minor page faults per allocation after the first.
PROBE = """
import json, resource, sys, torch
setup = sys.argv[1]
if setup == "function":
    from mmr1.host_memory import keep_freed_memory
    applied = keep_freed_memory()
elif setup == "callback":
    import lightning
    from mmr1.host_memory import KeepFreedHostMemory
    callback = KeepFreedHostMemory()
    trainer = lightning.Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    callback.setup(trainer, None, "fit")
    applied = callback.applied
else:
    applied = False
def touch():
    x = torch.empty(64 << 20, dtype=torch.uint8)
    x.fill_(1)
    del x
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"applied": applied, "faults_per_alloc": faults}))
"""
PAGES = (64 << 20) // 4096


def probe(setup: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, setup], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_faults() -> float:
    """glibc's default: every allocation faults the tensor in again (every 4 KB page of it; fewer, larger faults
    where transparent huge pages are set to "always")."""
    faults = probe("none")["faults_per_alloc"]
    assert faults > 0
    return faults


@glibc_only
@pytest.mark.parametrize("setup", ["function", "callback"])
def test_kept_memory_is_reused_without_faults(setup, default_faults):
    result = probe(setup)
    assert result["applied"] is True
    # at most a heap extension now and then, not the whole tensor every time
    assert result["faults_per_alloc"] < 0.25 * min(default_faults, PAGES)


def test_elsewhere_it_is_a_no_op(monkeypatch):
    import mmr1.host_memory as host_memory
    monkeypatch.setattr(host_memory, "is_glibc", lambda: False)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *a: pytest.fail("no C library call off glibc"))
    assert host_memory.keep_freed_memory() is False


def test_bad_thresholds_are_refused_before_touching_malloc():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=2**31)
    with pytest.raises(ValueError, match="mmap_threshold"):
        KeepFreedHostMemory(mmap_threshold=-1)


def test_benchmark_variants_toggle_only_the_callback_and_write_outside_runs(tmp_path):
    import yaml
    from pathlib import Path

    from benchmarks.host_memory import CALLBACK, variant
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "r1-moe-128x16.yaml").read_text())
    assert CALLBACK in [c["class_path"] for c in shipped["trainer"]["callbacks"]]
    keep, default = variant(shipped, True, tmp_path), variant(shipped, False, tmp_path)
    names = lambda cfg: [c["class_path"] for c in cfg["trainer"]["callbacks"]]  # noqa: E731
    assert names(keep).count(CALLBACK) == 1 and CALLBACK not in names(default)
    assert [n for n in names(keep) if n != CALLBACK] == names(default)
    for cfg in (keep, default):
        assert cfg["model"] == shipped["model"] and cfg["data"] == shipped["data"]
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path)
        checkpoint = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
        assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "checkpoints")
    assert "runs/" in shipped["trainer"]["logger"]["init_args"]["save_dir"]  # the shipped config is untouched
