"""fp32 linear layers fed a few rows, on the CPU: one AVX-512 loop that streams each weight once.

At batch 1 a decode step multiplies one row by every weight of the model: its time is the time to read the weights.
torch's CPU linear hands such a product to MKL's sgemm, which on the 2-core AMD EPYC development machine of
2026-12-07 read the Llama-shaped benchmark model's 50 MB of weights at 16-19 GB/s, while a plain loop -- four weight
rows at a time against the input row, AVX-512 FMAs, fp32 accumulators -- read them at 29-38 GB/s on the same single
thread (benchmarks/results/cpu_linear.md). Up to 4 input rows share one pass over the weight; 5-8 rows take two.

Which products it takes depends on where the weights are. Weights that stream from memory at every step (the
models' parameters exceed the last-level cache): every product of up to MAX_ROWS rows. Weights that stay in the
cache between steps: MKL reads them quickly, and for one row the loop's per-call Python cost (a few us) is about
what it saves -- forced on, a 13 MB model decoded 0.70-1.25x as fast at batch 1 (four runs on a noisy machine),
a demo-sized one 0.67-0.76x. But MKL's sgemm of 2-8 rows is slow on this CPU even from the cache: 2-8 rows of a
19.5 MB model's weights were 1.4-1.5x faster through the loop, and speculative verification (5 rows) with prompt
lookup rose from 1.52-1.72x to 2.00-2.15x over plain decoding. So with cached weights the loop takes products of
2..MAX_ROWS rows with weights of CACHED_MIN_BYTES or more; smaller weights stay with torch (the call would cost
more than the product).

`FewRowLinears` (entered around each engine step, like mmr1.engine.prepack's bf16 packing) gives each fp32 CPU
nn.Linear of the backbone an instance `forward` that sends products of at most MAX_ROWS rows to the loop and
everything else (more rows, gradients, other dtypes) to F.linear; it takes the forwards away on exit, so outside
the engine's steps the model is the user's own. The loop is a custom op (`torch.ops.mmr1.linear_rows`), so
`compile_decode`'s graph calls it too. Built on first use with the C compiler, like mmr1.engine.decode_attention's
loop, OpenMP over 4-row blocks of the weight on PyTorch's threads; where it cannot be built (no AVX-512, no
compiler, no GNU OpenMP) `available()` is False and the engine keeps torch's products.
"""
from __future__ import annotations

import ctypes
import functools
import glob
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmr1 import cpu_threaded_batch

CACHED_MIN_BYTES = 256 << 10  # below this a cached weight's product costs less than the loop's Python call
MAX_ROWS = 8  # measured faster than torch's sgemm for 1-16 rows here; 1-8 rows read the weight at most twice

SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>

/* y[j, r] = x[j] . w[r] (+ bias[r]) for nw <= 4 weight rows and mr <= 4 input rows: each weight chunk is loaded
   once for all mr rows; the tail of `in` is a masked load. */
static inline __attribute__((always_inline)) void tile(const float *w, int64_t ldw, const float *x, int64_t ldx,
        int64_t in, float *y, int64_t ldy, const float *bias, const int nw, const int mr) {
    __m512 acc[4][4], wv[4], xv[4];
    for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++) acc[r][j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        for (int r = 0; r < nw; r++) wv[r] = _mm512_loadu_ps(w + r * ldw + i);
        for (int j = 0; j < mr; j++) xv[j] = _mm512_loadu_ps(x + j * ldx + i);
        for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++) acc[r][j] = _mm512_fmadd_ps(wv[r], xv[j], acc[r][j]);
    }
    if (i < in) {
        const __mmask16 m = (__mmask16)((1u << (in - i)) - 1);
        for (int r = 0; r < nw; r++) wv[r] = _mm512_maskz_loadu_ps(m, w + r * ldw + i);
        for (int j = 0; j < mr; j++) xv[j] = _mm512_maskz_loadu_ps(m, x + j * ldx + i);
        for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++) acc[r][j] = _mm512_fmadd_ps(wv[r], xv[j], acc[r][j]);
    }
    for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++)
        y[j * ldy + r] = _mm512_reduce_add_ps(acc[r][j]) + (bias ? bias[r] : 0.0f);
}

/* One pass over the weight for MR input rows: 4-row blocks of w split across the threads, the last out % 4 rows
   one at a time. */
#define PASS(MR)                                                                                                \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                          \
    for (int64_t q = 0; q < out / 4; q++)                                                                       \
        tile(w + 4 * q * ldw, ldw, x, ldx, in, y + 4 * q, ldy, bias ? bias + 4 * q : 0, 4, MR);                 \
    for (int64_t o = out / 4 * 4; o < out; o++)                                                                 \
        tile(w + o * ldw, ldw, x, ldx, in, y + o, ldy, bias ? bias + o : 0, 1, MR);

void linear_rows_f32(const float *w, int64_t ldw, const float *x, int64_t ldx, const float *bias, float *y,
                     int64_t ldy, int64_t m, int64_t out, int64_t in, int threads) {
    for (int64_t j0 = 0; j0 < m; j0 += 4, x += 4 * ldx, y += 4 * ldy) {
        switch (m - j0 >= 4 ? 4 : m - j0) {
            case 4: { PASS(4) break; }
            case 3: { PASS(3) break; }
            case 2: { PASS(2) break; }
            default: { PASS(1) break; }
        }
    }
}
"""

_FLAGS = ["-O3", "-fopenmp", "-march=native"]  # no -ffast-math: the sums stay IEEE fp32 (only their order differs)


@functools.cache
def function() -> Optional[ctypes._CFuncPtr]:
    """The compiled loop, or None where it cannot be built: silently on CPUs without AVX-512 or PyTorch builds
    without GNU OpenMP, with one warning when the compiler fails."""
    lib = cpu_threaded_batch.avx512_library("cpu_linear", SOURCE, _FLAGS, [], "fp32 linears keep torch's products")
    if lib is None:
        return None
    fn = lib.linear_rows_f32
    fn.restype = None
    fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                    ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int])
    return fn


def available() -> bool:
    return function() is not None


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for fp32 CPU tensors, x (..., in), weight (out, in) with contiguous rows, through
    the loop (any number of rows; it is faster than torch's for a few). The result is new and contiguous."""
    fp32 = torch.float32
    if (x.dtype != fp32 or weight.dtype != fp32 or bias is not None and bias.dtype != fp32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or bias is not None and bias.device.type != "cpu"):
        raise TypeError("linear_rows: x, weight and bias must be fp32 CPU tensors")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features or weight.stride(1) != 1 or bias is not None and bias.shape != (out_features,):
        raise ValueError(f"linear_rows: x (..., {in_features}) against a weight ({out_features}, {in_features}) "
                         f"with contiguous rows and a bias ({out_features},); got x {tuple(x.shape)}, weight strides "
                         f"{weight.stride()}, bias {None if bias is None else tuple(bias.shape)}")
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    y = torch.empty(rows.shape[0], out_features)
    if rows.shape[0]:
        function()(weight.data_ptr(), weight.stride(0), rows.data_ptr(), rows.stride(0),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), out_features, rows.shape[0],
                   out_features, in_features, torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


@torch.library.custom_op("mmr1::linear_rows", mutates_args=())
def linear_rows_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """linear_rows as an operator, so a torch.compile graph calls it instead of tracing into ctypes."""
    return linear_rows(x, weight, bias)


@linear_rows_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _few_row_forward(layer: nn.Linear, min_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if (not min_rows * layer.in_features <= x.numel() <= MAX_ROWS * layer.in_features  # first: cheapest
                or torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0
                or w.stride(1) != 1):
            return F.linear(x, w, layer.bias)
        if torch.compiler.is_compiling():  # traced: the operator; eagerly the dispatcher's ~5 us are saved
            return torch.ops.mmr1.linear_rows(x, w, layer.bias)
        return linear_rows(x, w, layer.bias)
    return forward


@functools.cache
def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]] if text[-1] in "KMG"
                         else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


class FewRowLinears:
    """`with FewRowLinears(model, draft):` runs the plain fp32 CPU nn.Linear layers of the given modules' backbones
    on the loop whenever they are fed at most MAX_ROWS rows; every other call and module runs as it would."""

    def __init__(self, *models: nn.Module | None):
        if not available():
            raise RuntimeError("FewRowLinears: the CPU few-row linear loop is not available here (it needs AVX-512, "
                               "a C compiler and PyTorch's GNU OpenMP)")
        self._layers: list[tuple[nn.Linear, Any]] = []
        # a MultimodalR1's encoders run in their own threads: its backbone only
        backbones = [b for b in (getattr(m, "backbone", m) for m in models if m is not None) if b is not None]
        self.model_bytes = sum(p.numel() * p.element_size() for b in backbones for p in b.parameters())
        layers = [layer for b in backbones for layer in b.modules() if type(layer) is nn.Linear
                  and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32]
        # Whether a step reads the weights from memory: the models' parameters exceed the last-level cache. Then every
        # product of up to MAX_ROWS rows takes the loop; otherwise only those of 2..MAX_ROWS rows with a weight of
        # CACHED_MIN_BYTES or more (see the module's docstring).
        self.streams = self.model_bytes > last_level_cache_bytes()
        for layer in layers:
            if self.streams or layer.weight.numel() * 4 >= CACHED_MIN_BYTES:
                self._layers.append((layer, _few_row_forward(layer, 1 if self.streams else 2)))

    def __len__(self) -> int:
        return len(self._layers)

    def __enter__(self) -> "FewRowLinears":
        for layer, forward in self._layers:
            layer.__dict__["forward"] = forward  # an instance attribute, found before nn.Linear.forward
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, _ in self._layers:
            layer.__dict__.pop("forward", None)
