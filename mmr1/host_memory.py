"""Keep freed host memory inside the process, so large CPU tensors stop paying page faults on every step.

glibc's malloc serves a request above its mmap threshold (it adapts up to 32 MB) with a fresh `mmap()` and hands
it back to the kernel on `free()`. A CPU training step at the seed geometry allocates and frees buffers above that
size every step -- the expert weight gradients alone are 32 MB (bf16) to 64 MB (fp32) each -- so the kernel zeroes
and maps them in again, a 4 KB page at a time. On the 2-core development machine, 30 steps of
`configs/r1-moe-128x16.yaml` took 100 s, 57 s of them in the kernel; with this callback 76 s and 27 s
(`benchmarks/host_memory.py`). `benchmarks/moe.py` spent 196 s of its 371 s in the kernel before, 4-6 s after.

`keep_freed_memory()` raises the mmap threshold and the trim threshold so freed blocks stay in the heap for the
next step's allocations -- what jemalloc or tcmalloc (PyTorch's CPU tuning advice) give through `LD_PRELOAD`, here
without an extra library. The price: the process keeps its peak (plus heap fragmentation) until it exits; the
seed-geometry run above peaked at 13.7 GB instead of 8.6 GB. It is process-wide and cannot be undone, so it is opt-in:
`KeepFreedHostMemory` applies it from a Lightning config when the trainer runs on the CPU.
"""
from __future__ import annotations

import ctypes
import platform
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_info

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> mallopt parameters
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 1 << 30  # requests below 1 GiB come from the heap and are reused after free
DEFAULT_TRIM_THRESHOLD = 2**31 - 1  # hand the heap's free top back only beyond 2 GiB (mallopt takes a C int)


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def check_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < value < 2**31:
            raise ValueError(f"keep_freed_memory: {name} must be bytes in [1, 2**31 - 1] (mallopt takes a C int), "
                             f"got {value}")


def keep_freed_memory(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                      trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Tell glibc to serve requests below `mmap_threshold` bytes from its heap and to keep up to `trim_threshold`
    free bytes there. Returns True when applied, False where the process's C library is not glibc (macOS, musl,
    Windows), where there is nothing to change this way."""
    check_thresholds(mmap_threshold, trim_threshold)
    if not is_glibc():
        return False
    libc = ctypes.CDLL(None)
    for name, param, value in (("mmap threshold", _M_MMAP_THRESHOLD, mmap_threshold),
                               ("trim threshold", _M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(param, ctypes.c_int(value)) != 1:
            raise RuntimeError(f"keep_freed_memory: glibc refused mallopt({name}={value})")
    return True


class KeepFreedHostMemory(Callback):
    """Applies `keep_freed_memory()` when the trainer runs on the CPU (a GPU run's host allocations are small, so
    it leaves the process alone there). Add it to a config's `trainer.callbacks`:

        - class_path: mmr1.host_memory.KeepFreedHostMemory
    """

    def __init__(self, mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                 trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> None:
        check_thresholds(mmap_threshold, trim_threshold)  # a bad config fails when it is parsed, not at fit time
        self.mmap_threshold = mmap_threshold
        self.trim_threshold = trim_threshold
        self.applied = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.applied or not isinstance(trainer.accelerator, CPUAccelerator):
            return
        self.applied = keep_freed_memory(self.mmap_threshold, self.trim_threshold)
        if self.applied:
            rank_zero_info("KeepFreedHostMemory: glibc keeps freed memory for reuse (fewer page faults, higher RSS)")
