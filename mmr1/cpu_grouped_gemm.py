"""fp32 grouped GEMM on the CPU through MKL's variable-size batched GEMM (`cblas_sgemm_batch`).

PyTorch's CPU `torch._grouped_mm` runs one `mm` per group, each split across the cores. At the seed geometry an
expert multiplies ~64 rows, too few for a split GEMM to reach the machine's speed: on the 2-core development
machine it ran at ~170-205 GFLOP/s where the same FLOPs in one `bmm` ran at ~270. MKL's batched GEMM takes one
size per group and spreads the groups over the cores, so it multiplies each expert's own rows (no padding) at the
batched rate (benchmarks/moe.py). MKL ships inside x86-64 PyTorch wheels (`libtorch_cpu.so` exports the CBLAS
symbols); where it is missing -- other CPUs, builds without MKL -- `available()` is False and callers keep
`torch._grouped_mm`.

Both functions take rows sorted by group: `a` (M, K), `counts` (G,) rows per group (sum == M), and return new
tensors; neither tracks autograd (moe_kernels.GroupedSwiGLU writes the backward with them).
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values
_FLOAT_BYTES = 4


@functools.cache
def _sgemm_batch():
    """MKL's cblas_sgemm_batch (LP64: 32-bit MKL_INT) from the libtorch this process runs, or None."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
    return fn


def available(*tensors: torch.Tensor) -> bool:
    """Whether the MKL grouped GEMM can run on these tensors: fp32, CPU, unit stride along their rows."""
    return _sgemm_batch() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)


def _run(trans_a: bool, trans_b: bool, m: torch.Tensor, n: torch.Tensor, k: torch.Tensor,
         a_ptr: torch.Tensor, lda: int, b_ptr: torch.Tensor, ldb: int, c_ptr: torch.Tensor, ldc: int,
         beta: float) -> None:
    """One cblas_sgemm_batch call, one GEMM per entry of the (G,) size and pointer arrays: C = op(A) op(B) + beta C."""
    groups = m.shape[0]
    if groups == 0:
        return
    ints = lambda values: values.to(torch.int32).contiguous()  # noqa: E731 - MKL_INT arrays
    full = lambda value, dtype: torch.full((groups,), value, dtype=dtype)  # noqa: E731
    arrays = (full(_TRANS if trans_a else _NO_TRANS, torch.int32), full(_TRANS if trans_b else _NO_TRANS, torch.int32),
              ints(m), ints(n), ints(k), full(1.0, torch.float32), a_ptr, full(lda, torch.int32), b_ptr,
              full(ldb, torch.int32), full(beta, torch.float32), c_ptr, full(ldc, torch.int32))
    ones = full(1, torch.int32)  # one GEMM per group
    _sgemm_batch()(_ROW_MAJOR, *(t.data_ptr() for t in arrays), groups, ones.data_ptr())


def _row_pointers(t: torch.Tensor, first_rows: torch.Tensor) -> torch.Tensor:
    return t.data_ptr() + first_rows * (t.stride(0) * _FLOAT_BYTES)  # (G,) int64 addresses


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, *, transpose_b: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) rows sorted by group, b (G, K, N) -- or (G, N, K) used transposed with transpose_b -- -> (M, N),
    the rows of group g times b[g]. With `out` given, the products are added to it (beta = 1) and it is returned."""
    N = b.shape[1] if transpose_b else b.shape[2]
    K = a.shape[1]
    accumulate = out is not None
    if out is None:
        out = a.new_empty(a.shape[0], N)
    starts = counts.cumsum(0) - counts  # (G,) first row of each group
    used = counts.nonzero().squeeze(1)  # groups with rows (one host read, on the CPU)
    groups = used.numel()
    first = starts[used]
    b_ptr = b.data_ptr() + used * (b.stride(0) * _FLOAT_BYTES)
    _run(False, transpose_b, counts[used], torch.full((groups,), N), torch.full((groups,), K),
         _row_pointers(a, first), a.stride(0), b_ptr, b.stride(1), _row_pointers(out, first), out.stride(0),
         1.0 if accumulate else 0.0)
    return out


def grouped_weight_gemm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """a (M, K), b (M, N) rows sorted by group -> (G, K, N): a_gᵀ b_g per group (a weight gradient), zero for
    groups without rows."""
    G, K, N = counts.shape[0], a.shape[1], b.shape[1]
    out = a.new_empty(G, K, N)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        out.index_fill_(0, empty, 0.0)
    starts = counts.cumsum(0) - counts
    used = counts.nonzero().squeeze(1)
    groups = used.numel()
    first = starts[used]
    c_ptr = out.data_ptr() + used * (out.stride(0) * _FLOAT_BYTES)
    _run(True, False, torch.full((groups,), K), torch.full((groups,), N), counts[used],
         _row_pointers(a, first), a.stride(0), _row_pointers(b, first), b.stride(0), c_ptr, out.stride(1), 0.0)
    return out
