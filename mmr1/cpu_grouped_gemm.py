"""fp32 grouped GEMM on the CPU through MKL's variable-size batched GEMM (`cblas_sgemm_batch`).

PyTorch's CPU `torch._grouped_mm` runs one `mm` per group, each split across the cores. At the seed geometry an
expert multiplies ~64 rows, too few for a split GEMM to reach the machine's speed: on the 2-core development
machine it ran at ~170-205 GFLOP/s where the same FLOPs in one `bmm` ran at ~270. MKL's batched GEMM takes one
size per group, so it multiplies each expert's own rows (no padding) near the batched rate (benchmarks/moe.py).
MKL ships inside x86-64 PyTorch wheels (`libtorch_cpu.so` exports the CBLAS symbols); where it is missing -- other
CPUs, builds without MKL -- `available()` is False and callers keep `torch._grouped_mm`.

Given differently sized GEMMs, MKL still runs each of them on all the cores in turn. Where there are enough GEMMs
to share, `_run` hands the batch to mmr1.cpu_threaded_batch instead: one slice of GEMMs per OpenMP thread, each
GEMM single-threaded, measured 4-12 % faster per product and 5-8 % per fp32 layer (fwd+bwd).

The functions take rows sorted by group, `a` (M, K), and a `GroupPlan` of the rows per group (made once per
layer call from counts (G,), sum == M), and return new tensors; neither tracks autograd
(moe_kernels.GroupedSwiGLU writes the backward with them).
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import torch

from mmr1 import cpu_threaded_batch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values
_FLOAT_BYTES = 4
WEIGHT_GRAD_ROW_BLOCK = 128  # output rows per GEMM of a weight gradient (grouped_weight_gemm)


@functools.cache
def _libtorch_cpu() -> ctypes.CDLL | None:
    """The libtorch_cpu this process runs (x86-64 wheels link MKL into it), or None."""
    try:
        return ctypes.CDLL(os.path.join(cpu_threaded_batch.torch_lib(), "libtorch_cpu.so"))
    except OSError:
        return None


@functools.cache
def _sgemm_batch():
    """MKL's cblas_sgemm_batch from the libtorch this process runs, or None. Only where the library also exports
    MKL's `_64`-suffixed (ILP64) entry points: there the plain symbols are the LP64 ones (32-bit MKL_INT, the arrays
    built here); a library with only plain symbols could be either, and is not used. A small product is checked
    against torch.mm before the function is handed out."""
    lib = _libtorch_cpu()
    if not torch.backends.mkl.is_available() or lib is None:
        return None
    try:
        fn, _ = lib.cblas_sgemm_batch, lib.sgemm_batch_64
    except AttributeError:
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
    return fn if _self_test(fn) else None


def _self_test(fn) -> bool:
    """Two groups of different sizes through `fn` (grouped_gemm's own path), against torch.mm."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(2, 3, 4, generator=g)
    out = torch.zeros(5, 4)  # accumulated into (beta = 1): left at zero if the call does nothing
    grouped_gemm(a, b, GroupPlan(torch.tensor([2, 3])), out=out, sgemm_batch=fn)
    return bool(torch.allclose(out, torch.cat([a[:2] @ b[0], a[2:] @ b[1]]), atol=1e-5))


@functools.cache
def _set_local_threads():
    """Address of MKL's per-thread thread-count setter (`MKL_Set_Num_Threads_Local`, the C entry point: the
    lower-case symbol is the Fortran one, which takes a pointer), or None."""
    fn = getattr(_libtorch_cpu(), "MKL_Set_Num_Threads_Local", None)
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


MIN_GEMMS_PER_THREAD = 4  # fewer, and one large GEMM could leave a thread idle: MKL's own threading then


def thread_slices():
    """(the compiled slice loop, MKL's thread setter) where both exist, else None."""
    loop, set_local = cpu_threaded_batch.function(), _set_local_threads()
    return (loop, set_local) if loop is not None and set_local is not None else None


@torch.compiler.disable  # loads a shared library on first use: not something for dynamo to trace
def available(*tensors: torch.Tensor) -> bool:
    """Whether the MKL grouped GEMM can run on these tensors: plain fp32 CPU tensors (not a tensor subclass such as
    a sharded DTensor, whose data pointer is not the whole tensor), unit stride along their rows, and rows at least
    their width apart (MKL's leading dimension; it refuses anything else with a printed error and no result, so such
    tensors must never reach it)."""
    return _sgemm_batch() is not None and all(
        type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
        and t.stride(-1) == 1
        and (t.dim() < 2 or t.stride(-2) >= max(t.shape[-1], 1)) for t in tensors)


class GroupPlan:
    """The per-group sizes and first rows of one `counts` (G,) rows per group, in the arrays MKL reads, made once
    per layer call and shared by its GEMMs (host-side numpy: a few microseconds, where torch ops on such small
    arrays cost tens)."""

    def __init__(self, counts: torch.Tensor):
        sizes = counts.detach().cpu().numpy().astype(np.int64)
        self.num_groups = sizes.shape[0]
        self.used = np.flatnonzero(sizes)  # groups with rows
        self.rows = sizes[self.used].astype(np.int32)  # (U,) their row counts
        self.first = (np.cumsum(sizes) - sizes)[self.used]  # (U,) their first row
        self.empty = np.flatnonzero(sizes == 0)
        self._constants: dict[tuple[str, float, int], np.ndarray] = {}

    def constant(self, value: float, dtype=np.int32, count: int | None = None) -> np.ndarray:
        """(count,) copies of value (count: one per used group unless given), cached for the plan's lifetime."""
        count = self.used.shape[0] if count is None else count
        key = (np.dtype(dtype).str, value, count)
        if key not in self._constants:
            self._constants[key] = np.full(count, value, dtype=dtype)
        return self._constants[key]


def _address(t: torch.Tensor, index: np.ndarray) -> np.ndarray:
    """(U,) uint64 addresses of t's entries `index` along its first dim (rows of a matrix, matrices of a stack)."""
    return np.uint64(t.data_ptr()) + index.astype(np.uint64) * np.uint64(t.stride(0) * _FLOAT_BYTES)


def _run(plan: GroupPlan, trans_a: bool, trans_b: bool, m: np.ndarray, n: np.ndarray, k: np.ndarray,
         a_ptr: np.ndarray, lda: int, b_ptr: np.ndarray, ldb: int, c_ptr: np.ndarray, ldc: int,
         beta: float | np.ndarray, sgemm_batch=None, cut_multiple: int = 1) -> None:
    """One GEMM per entry of the pointer arrays (one per used group, or more): C = op(A) op(B) + beta C, as one
    cblas_sgemm_batch call or one slice per thread (mmr1.cpu_threaded_batch). Every array stays referenced
    (arguments, `arrays`, `cuts`, the plan's constants) while MKL reads it. `beta`: one for all, or one per GEMM;
    `cut_multiple`: runs of this many GEMMs accumulate into one output in order, so a slice holds whole runs (one
    MKL thread goes through its slice in order) and without slices each position of the runs is its own call."""
    count = a_ptr.shape[0]
    if count == 0:
        return
    c = functools.partial(plan.constant, count=count)
    arrays = (c(_TRANS if trans_a else _NO_TRANS), c(_TRANS if trans_b else _NO_TRANS), m, n, k,
              c(1.0, np.float32), a_ptr, c(lda), b_ptr, c(ldb),
              beta if isinstance(beta, np.ndarray) else c(beta, np.float32), c_ptr, c(ldc), c(1))
    fn = sgemm_batch or _sgemm_batch()
    threads = torch.get_num_threads()
    slices = thread_slices() if threads > 1 and count >= MIN_GEMMS_PER_THREAD * threads else None
    if slices is None:
        # MKL may run a batch's GEMMs at the same time: GEMMs that accumulate into one output go in successive calls.
        for j in range(cut_multiple):
            part = arrays if cut_multiple == 1 else tuple(np.ascontiguousarray(arr[j::cut_multiple]) for arr in arrays)
            fn(_ROW_MAJOR, *(arr.ctypes.data for arr in part[:-1]), part[0].shape[0], part[-1].ctypes.data)
        return
    # One consecutive slice per thread, cut where the work (m * n * k) passes each thread's share.
    work = np.cumsum(m.astype(np.float64) * n * k)
    cuts = np.searchsorted(work, work[-1] * np.arange(1, threads) / threads, side="right")
    cuts = np.minimum(-(-cuts // cut_multiple) * cut_multiple, count)
    cuts = np.concatenate([[0], cuts, [count]]).astype(np.int32)
    loop, set_local = slices
    loop(ctypes.cast(fn, ctypes.c_void_p).value, set_local, threads, cuts.ctypes.data, _ROW_MAJOR,
         *(arr.ctypes.data for arr in arrays))


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, plan: GroupPlan, *, transpose_b: bool = False,
                 out: torch.Tensor | None = None, sgemm_batch=None) -> torch.Tensor:
    """a (M, K) rows sorted by group, b (G, K, N) -- or (G, N, K) used transposed with transpose_b -- -> (M, N),
    the rows of group g times b[g]. With `out` given, the products are added to it (beta = 1) and it is returned.
    `sgemm_batch`: the MKL function to call (the loader's self-test passes the one it is checking)."""
    N = b.shape[1] if transpose_b else b.shape[2]
    accumulate = out is not None
    if out is None:
        out = a.new_empty(a.shape[0], N)
    c = plan.constant
    _run(plan, False, transpose_b, plan.rows, c(N), c(a.shape[1]), _address(a, plan.first), a.stride(0),
         _address(b, plan.used), b.stride(1), _address(out, plan.first), out.stride(0), 1.0 if accumulate else 0.0,
         sgemm_batch)
    return out


def grouped_gemm_two(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, plan: GroupPlan, *,
                     transpose_b: bool = False, sum_products: bool = False):
    """Two grouped_gemm products of equally shaped operands in one batch, group g's two GEMMs next to each other:
    (a1 b1, a2 b2), or with sum_products the one tensor a1 b1 + a2 b2 (the second GEMM accumulates into the first's
    output while it is still in cache). One batch instead of two: an expert's rows (forward: a1 is a2, the tokens)
    or its output rows (sum) are read from memory once. Measured at the seed geometry, top-4: 5-7 % less time
    than two batches for the forward gate/up pair and for the backward's input gradient."""
    same = (a1.shape == a2.shape and b1.shape == b2.shape and a1.stride(0) == a2.stride(0)
            and b1.stride(1) == b2.stride(1))
    if not same:
        if sum_products:
            return grouped_gemm(a2, b2, plan, transpose_b=transpose_b,
                                out=grouped_gemm(a1, b1, plan, transpose_b=transpose_b))
        return grouped_gemm(a1, b1, plan, transpose_b=transpose_b), grouped_gemm(a2, b2, plan, transpose_b=transpose_b)
    N = b1.shape[1] if transpose_b else b1.shape[2]
    outs = [a1.new_empty(a1.shape[0], N)] if sum_products else [a1.new_empty(a1.shape[0], N) for _ in range(2)]
    used = plan.used.shape[0]

    def pairwise(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return np.stack([first, second], axis=1).ravel()  # (2U,) group-major: g's first GEMM, then its second

    c_ptr = _address(outs[0], plan.first)
    c_ptr = np.repeat(c_ptr, 2) if sum_products else pairwise(c_ptr, _address(outs[1], plan.first))
    beta = np.tile(np.array([0.0, 1.0 if sum_products else 0.0], dtype=np.float32), used)
    m, c = np.repeat(plan.rows, 2), functools.partial(plan.constant, count=2 * used)
    a_ptr = pairwise(_address(a1, plan.first), _address(a2, plan.first))
    b_ptr = pairwise(_address(b1, plan.used), _address(b2, plan.used))
    _run(plan, False, transpose_b, m, c(N), c(a1.shape[1]), a_ptr, a1.stride(0), b_ptr, b1.stride(1), c_ptr,
         outs[0].stride(0), beta, cut_multiple=2 if sum_products else 1)
    return outs[0] if sum_products else tuple(outs)


def grouped_weight_gemm(a: torch.Tensor, b: torch.Tensor, plan: GroupPlan,
                        row_block: int = WEIGHT_GRAD_ROW_BLOCK) -> torch.Tensor:
    """a (M, K), b (M, N) rows sorted by group -> (G, K, N): a_gᵀ b_g per group (a weight gradient), zero for
    groups without rows.

    Each group's product is cut into blocks of `row_block` output rows (columns of a_g), all in one call: at the
    seed geometry (64-128 rows per group, K = 256 or 512) MKL ran these at ~270-285 GFLOP/s where whole products
    ran at ~160-240, the (H, D) gradient of a down projection gaining most (benchmarks/moe.py)."""
    K, N = a.shape[1], b.shape[1]
    out = a.new_empty(plan.num_groups, K, N)
    if plan.empty.size:
        out[torch.from_numpy(plan.empty)] = 0.0
    starts = np.arange(0, K, max(row_block, 1), dtype=np.uint64)  # (S,) first output row of each block
    heights = np.minimum(np.uint64(max(row_block, 1)), np.uint64(K) - starts).astype(np.int32)  # (S,)
    blocks = starts.shape[0]
    # One GEMM per (group, block), group-major: block s of group g reads a_g's columns from starts[s] on.
    a_ptr = (_address(a, plan.first)[:, None] + starts[None] * np.uint64(_FLOAT_BYTES)).ravel()
    c_ptr = (_address(out, plan.used)[:, None] + starts[None] * np.uint64(out.stride(1) * _FLOAT_BYTES)).ravel()
    b_ptr = np.repeat(_address(b, plan.first), blocks)
    m, k = np.tile(heights, plan.used.shape[0]), np.repeat(plan.rows, blocks)
    _run(plan, True, False, m, plan.constant(N, count=m.shape[0]), k, a_ptr, a.stride(0), b_ptr, b.stride(0), c_ptr,
         out.stride(1), 0.0)
    return out
