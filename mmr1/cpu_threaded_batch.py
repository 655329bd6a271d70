"""Run one MKL `cblas_sgemm_batch` argument set as one slice of GEMMs per OpenMP thread, MKL single-threaded in each.

Given GEMMs of different sizes (one MKL group each, as mmr1.cpu_grouped_gemm passes them), MKL's batched call runs
each GEMM on all the cores in turn. At the seed geometry (64-128 rows per expert) a GEMM is too small to split
well: cut into one consecutive slice per thread by work, each slice one single-threaded MKL call, the same
products ran 4-12 % faster on the 2-core machine, forward, transposed and weight-gradient alike
(benchmarks/results/moe_cpu.md).

The slices must run on PyTorch's own OpenMP threads. Python threads were tried first: between two GEMM calls the
layer runs PyTorch ops, after which OpenMP's idle threads spin for a while, and a third thread competing with them
for two cores made the products up to 13 % slower, not faster. So the loop over slices is a few lines of C with an
OpenMP pragma, built on first use with the C compiler (the one torch.compile's CPU backend uses) against the OpenMP
runtime PyTorch ships and loads, and cached per source and PyTorch build. Where it cannot be built (no compiler,
no libgomp in PyTorch's wheel) `function()` is None, one warning says why, and callers make the plain batched call.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings

import torch

SOURCE = r"""
#include <stdint.h>
typedef void (*sgemm_batch_t)(int, const int*, const int*, const int*, const int*, const int*, const float*,
                              const uint64_t*, const int*, const uint64_t*, const int*, const float*,
                              const uint64_t*, const int*, int, const int*);
typedef int (*set_local_threads_t)(int);

/* GEMMs [cuts[p], cuts[p+1]) of the argument arrays on OpenMP thread p, MKL on one thread there. */
void sgemm_batch_slices(void *batch, void *set_local_threads, int parts, const int *cuts, int layout,
                        const int *ta, const int *tb, const int *m, const int *n, const int *k, const float *alpha,
                        const uint64_t *a, const int *lda, const uint64_t *b, const int *ldb, const float *beta,
                        const uint64_t *c, const int *ldc, const int *sizes) {
    sgemm_batch_t fn = (sgemm_batch_t)batch;
    set_local_threads_t set_local = (set_local_threads_t)set_local_threads;
    #pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int p = 0; p < parts; p++) {
        int lo = cuts[p], hi = cuts[p + 1];
        if (hi > lo) {
            int previous = set_local(1);
            fn(layout, ta + lo, tb + lo, m + lo, n + lo, k + lo, alpha + lo, a + lo, lda + lo, b + lo, ldb + lo,
               beta + lo, c + lo, ldc + lo, hi - lo, sizes + lo);
            set_local(previous);
        }
    }
}
"""


def torch_lib() -> str:
    """The folder of PyTorch's shared libraries (libtorch_cpu, its OpenMP runtime)."""
    return os.path.join(os.path.dirname(torch.__file__), "lib")


def openmp_runtime() -> str | None:
    """The GNU OpenMP library PyTorch's wheel ships (and has loaded), or None."""
    runtimes = sorted(glob.glob(os.path.join(torch_lib(), "libgomp*.so*")))
    return runtimes[0] if runtimes else None


@functools.cache
def machine_key() -> str:
    """What -march=native compiles for: the CPU's model and flags, for the cache keys of libraries built with it (a
    cache folder shared across machines must not hand one CPU's build to another)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def cache_dir() -> str:
    return os.environ.get("MMR1_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mmr1")


def build_library(name: str, source: str, flags: list[str], link: list[str]) -> str:
    """Compile C `source` into the cache as a shared library, once per source, flags, link inputs and PyTorch
    build; returns its path. Written under a temporary name and renamed, so concurrent ranks never load half a
    file. Raises RuntimeError with the compiler's message when a step fails."""
    key = hashlib.sha256("\0".join([source, *flags, *link, torch.__version__]).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), f"{name}_{key}.so")
    if os.path.exists(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        src, obj, lib = (os.path.join(tmp, f"{name}{ext}") for ext in (".c", ".o", ".so"))
        with open(src, "w") as f:
            f.write(source)
        for cmd in ([compiler, *flags, "-fPIC", "-c", src, "-o", obj], [compiler, "-shared", obj, *link, "-o", lib]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:300]}")
        os.replace(lib, target)
    return target


def avx512_library(name: str, source: str, flags: list[str], link: list[str], fallback: str) -> ctypes.CDLL | None:
    """A loop written for AVX-512, built with -march=native for this CPU (its model and flags are part of the cache
    key) against PyTorch's OpenMP runtime, and loaded; None where it cannot be: silently on CPUs without AVX-512
    or PyTorch builds without GNU OpenMP, with one warning (ending in `fallback`, what runs instead) when the
    compiler fails."""
    runtime, machine = openmp_runtime(), machine_key()
    if runtime is None or " avx512f" not in machine:
        return None
    try:
        return ctypes.CDLL(build_library(name, source + f"/* {machine} */", flags, [runtime, *link]))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"mmr1: could not build the CPU {name} loop ({error}); {fallback}", RuntimeWarning,
                      stacklevel=3)
        return None


def _build(openmp: str) -> str:
    # Compiled with -fopenmp but linked to PyTorch's runtime by path (not -fopenmp's -lgomp): the process then
    # holds one OpenMP runtime and one pool of threads.
    return build_library("sgemm_batch_slices", SOURCE, ["-O2", "-fopenmp"], [openmp])


@functools.cache
def function():
    """The compiled `sgemm_batch_slices` (a ctypes function), or None with one warning where it cannot be built."""
    runtime = openmp_runtime()
    if runtime is None:
        return None  # PyTorch without GNU OpenMP (macOS, Intel OpenMP builds): the plain batched call serves
    try:
        fn = ctypes.CDLL(_build(runtime)).sgemm_batch_slices
    except (OSError, RuntimeError, AttributeError) as error:
        warnings.warn(f"mmr1: could not build the threaded MKL batch loop ({error}); MoE fp32 experts on the CPU use "
                      f"MKL's own batched call instead (a few % slower)", RuntimeWarning, stacklevel=2)
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + \
        [ctypes.c_void_p] * 14
    return fn
