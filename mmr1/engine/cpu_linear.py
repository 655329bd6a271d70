"""fp32 and bf16 linear layers fed a few rows, on the CPU: one AVX-512 loop that streams each weight once.

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

bf16 (CPUs with AVX512_BF16): the same loop on vdpbf16ps, which multiplies 32 bf16 pairs exactly and adds them into
fp32 accumulators; the result is rounded to bf16 once, as torch's bf16 product (oneDNN) does -- only the order of
the fp32 sums differs. oneDNN read the 137 MB bf16 benchmark model's weights at 12-19 GB/s for 1-8 rows; the loop
2.1-2.3x faster for one row from memory, 1.3x for 4 rows, but no faster for 8 (two passes over the weight) -- from
the cache 2.1-2.7x for 1-4 rows. So bf16 products of 1..ROW_LIMITS[bf16] = 4 rows take the loop, single rows of
cached weights included.

bf16 MoE experts are stacked (in, out) weights multiplied as `h @ w[e]`, which torch's bf16 matmul read at 9-11 GB/s
for one row; `rows_times` streams each weight row, widens it exactly to fp32 and adds it into the outputs, about 3x
that. `FewRowLinears` marks bf16 GroupedExperts for the step and the batch-1 path's one-token MoE
(mmr1.engine.solo._moe_one) multiplies through it (compiled: through the operator `torch.ops.mmr1.rows_times`).
fp32 experts keep torch's (MKL reads that layout quickly).

`FewRowLinears` (entered around each engine step, like mmr1.engine.prepack's bf16 packing) gives each fp32 / bf16
CPU nn.Linear of the backbone an instance `forward` that sends products of at most ROW_LIMITS[dtype] rows to the
loop and everything else (more rows, gradients, other dtypes) to F.linear; it takes the forwards away on exit, so
outside the engine's steps the model is the user's own. The loop is a custom op (`torch.ops.mmr1.linear_rows`), so
`compile_decode`'s graph calls it too. Built on first use with the C compiler, like mmr1.engine.decode_attention's
loop, OpenMP over 4-row blocks of the weight on PyTorch's threads; where it cannot be built (no AVX-512, no
compiler, no GNU OpenMP) `available()` is False and the engine keeps torch's products (bf16 ones also on CPUs
without AVX512_BF16: `available(torch.bfloat16)`).
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
from mmr1.moe import GroupedExperts

CACHED_MIN_BYTES = 256 << 10  # below this a cached weight's product costs less than the loop's Python call
MAX_ROWS = 8  # measured faster than torch's sgemm for 1-16 rows here; 1-8 rows read the weight at most twice
# The most rows a product may have to take the loop, by weight dtype. bf16 (against oneDNN's bf16 product): 2.1-2.3x
# for 1 row read from memory, 1.3x for 4, 0.7-1.1x for 8 (two passes over the weight;
# benchmarks/results/cpu_linear.md).
ROW_LIMITS = {torch.float32: MAX_ROWS, torch.bfloat16: 4}

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
#define PASS(TILE, MR)                                                                                          \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                          \
    for (int64_t q = 0; q < out / 4; q++)                                                                       \
        TILE(w + 4 * q * ldw, ldw, x, ldx, in, y + 4 * q, ldy, bias ? bias + 4 * q : 0, 4, MR);                 \
    for (int64_t o = out / 4 * 4; o < out; o++)                                                                 \
        TILE(w + o * ldw, ldw, x, ldx, in, y + o, ldy, bias ? bias + o : 0, 1, MR);

#define ROWS(TILE)                                                                                              \
    for (int64_t j0 = 0; j0 < m; j0 += 4, x += 4 * ldx, y += 4 * ldy) {                                         \
        switch (m - j0 >= 4 ? 4 : m - j0) {                                                                     \
            case 4: { PASS(TILE, 4) break; }                                                                    \
            case 3: { PASS(TILE, 3) break; }                                                                    \
            case 2: { PASS(TILE, 2) break; }                                                                    \
            default: { PASS(TILE, 1) break; }                                                                   \
        }                                                                                                       \
    }

void linear_rows_f32(const float *w, int64_t ldw, const float *x, int64_t ldx, const float *bias, float *y,
                     int64_t ldy, int64_t m, int64_t out, int64_t in, int threads) {
    ROWS(tile)
}

/* x @ w for bf16 weights stored (in, out) -- stacked MoE experts, multiplied as h @ w[e] -- and mr <= 4 fp32 rows:
   each weight row is streamed once, widened exactly to fp32, and added into the outputs y[j, c0:c1] (they stay in
   the cache). The threads split the columns. */
static inline __attribute__((always_inline)) __m512 widen_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static void axpy_columns(const uint16_t *w, int64_t ldw, const float *x, int64_t ldx, float *y, int64_t ldy,
                         int64_t in, int64_t c0, int64_t c1, int mr) {
    const int64_t full = c0 + (c1 - c0) / 16 * 16;
    for (int j = 0; j < mr; j++) for (int64_t c = c0; c < c1; c++) y[j * ldy + c] = 0.0f;
    for (int64_t i = 0; i < in; i++) {
        const uint16_t *row = w + i * ldw;
        __m512 xb[4];
        for (int j = 0; j < mr; j++) xb[j] = _mm512_set1_ps(x[j * ldx + i]);
        for (int64_t c = c0; c < full; c += 16) {
            const __m512 wv = widen_bf16(row + c);
            for (int j = 0; j < mr; j++)
                _mm512_storeu_ps(y + j * ldy + c, _mm512_fmadd_ps(xb[j], wv, _mm512_loadu_ps(y + j * ldy + c)));
        }
        for (int64_t c = full; c < c1; c++) {
            union { uint32_t u; float f; } v = {.u = (uint32_t)row[c] << 16};
            for (int j = 0; j < mr; j++) y[j * ldy + c] += x[j * ldx + i] * v.f;
        }
    }
}

void rows_times_bf16(const uint16_t *w, int64_t ldw, const float *x, int64_t ldx, float *y, int64_t ldy,
                     int64_t m, int64_t out, int64_t in, int threads) {
    const int64_t chunk = ((out + threads - 1) / threads + 15) / 16 * 16;
    for (int64_t j0 = 0; j0 < m; j0 += 4, x += 4 * ldx, y += 4 * ldy) {
        const int mr = m - j0 >= 4 ? 4 : (int)(m - j0);
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c0 = 0; c0 < out; c0 += chunk)
            axpy_columns(w, ldw, x, ldx, y, ldy, in, c0, c0 + chunk < out ? c0 + chunk : out, mr);
    }
}

#ifdef __AVX512BF16__
/* The same for bf16 weights and input rows (raw 16-bit words), fp32 bias and output: vdpbf16ps multiplies 32
   bf16 pairs exactly (subnormal bf16 inputs count as zero) and adds them into 16 fp32 accumulators, so one
   instruction takes 32 weights. */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *w, int64_t ldw, const uint16_t *x,
        int64_t ldx, int64_t in, float *y, int64_t ldy, const float *bias, const int nw, const int mr) {
    __m512 acc[4][4];
    __m512i wv[4], xv[4];
    for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++) acc[r][j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
        for (int r = 0; r < nw; r++) wv[r] = _mm512_loadu_si512(w + r * ldw + i);
        for (int j = 0; j < mr; j++) xv[j] = _mm512_loadu_si512(x + j * ldx + i);
        for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++)
            acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)wv[r], (__m512bh)xv[j]);
    }
    if (i < in) {
        const __mmask32 m = (__mmask32)((1ull << (in - i)) - 1);
        for (int r = 0; r < nw; r++) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * ldw + i);
        for (int j = 0; j < mr; j++) xv[j] = _mm512_maskz_loadu_epi16(m, x + j * ldx + i);
        for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++)
            acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)wv[r], (__m512bh)xv[j]);
    }
    for (int r = 0; r < nw; r++) for (int j = 0; j < mr; j++)
        y[j * ldy + r] = _mm512_reduce_add_ps(acc[r][j]) + (bias ? bias[r] : 0.0f);
}

void linear_rows_bf16(const uint16_t *w, int64_t ldw, const uint16_t *x, int64_t ldx, const float *bias, float *y,
                      int64_t ldy, int64_t m, int64_t out, int64_t in, int threads) {
    ROWS(tile_bf16)
}
#endif
"""

_FLAGS = ["-O3", "-fopenmp", "-march=native"]  # no -ffast-math: the sums stay IEEE fp32 (only their order differs)


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """The compiled loops, or None where they cannot be built: silently on CPUs without AVX-512 or PyTorch builds
    without GNU OpenMP, with one warning when the compiler fails."""
    return cpu_threaded_batch.avx512_library("cpu_linear", SOURCE, _FLAGS, [], "linears keep torch's products")


@functools.cache
def functions() -> dict[torch.dtype, ctypes._CFuncPtr]:
    """The nn.Linear loops by weight dtype (fp32, bf16), {} without the library."""
    lib = _library()
    if lib is None:
        return {}
    loops = {}
    for dtype, name in ((torch.float32, "linear_rows_f32"), (torch.bfloat16, "linear_rows_bf16")):
        fn = getattr(lib, name, None)  # bf16: built only for CPUs with AVX512_BF16
        if fn is None:
            continue
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int])
        loops[dtype] = fn
    return loops


@functools.cache
def _rows_times_function() -> Optional[ctypes._CFuncPtr]:
    lib = _library()
    if lib is None:
        return None
    fn = lib.rows_times_bf16
    fn.restype = None
    fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                    ctypes.c_int64] + [ctypes.c_int64] * 3 + [ctypes.c_int])
    return fn


def rows_times(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight for bf16 CPU tensors, x (rows, in), weight (in, out) with contiguous rows (a stacked MoE expert's
    w[e]), through the loop: exact bf16 products summed in fp32, rounded to bf16 once. About 3x torch's bf16 matmul
    for one row read from memory (benchmarks/results/cpu_linear.md)."""
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or weight.device.type != "cpu"):
        raise TypeError(f"rows_times: x and weight must be bf16 CPU tensors; got x {x.dtype} on {x.device}, weight "
                        f"{weight.dtype} on {weight.device}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[0] or weight.stride(1) != 1:
        raise ValueError(f"rows_times: x (rows, in) against a weight (in, out) with contiguous rows; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)} with strides {weight.stride()}")
    fn = _rows_times_function()
    if fn is None:
        raise RuntimeError("rows_times: the CPU loop is not available here (it needs AVX-512, a C compiler and "
                           "PyTorch's GNU OpenMP)")
    rows = x.float().contiguous()
    y = torch.empty(rows.shape[0], weight.shape[1])
    if rows.shape[0]:
        fn(weight.data_ptr(), weight.stride(0), rows.data_ptr(), rows.stride(0), y.data_ptr(), y.stride(0),
           rows.shape[0], weight.shape[1], weight.shape[0], torch.get_num_threads())
    return y.bfloat16()


@torch.library.custom_op("mmr1::rows_times", mutates_args=())
def rows_times_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows_times as an operator, for compile_decode's graph."""
    return rows_times(x, weight)


@rows_times_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the loop for `dtype` weights was built here."""
    return dtype in functions()


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for CPU tensors of one dtype, fp32 or bf16, x (..., in), weight (out, in) with
    contiguous rows, through the loop (any number of rows; it is faster than torch's for a few). The result is new
    and contiguous. bf16: exact products of the bf16 inputs, summed in fp32 (the bias too) and rounded to bf16
    once, as torch's bf16 linear does (only the order of the sums differs)."""
    dtype = weight.dtype
    if (dtype not in (torch.float32, torch.bfloat16) or x.dtype != dtype or bias is not None and bias.dtype != dtype
            or x.device.type != "cpu" or weight.device.type != "cpu" or bias is not None and bias.device.type != "cpu"):
        raise TypeError("linear_rows: x, weight and bias must be CPU tensors of one dtype, fp32 or bf16; got "
                        f"x {x.dtype} on {x.device}, weight {dtype} on {weight.device}"
                        + ("" if bias is None else f", bias {bias.dtype} on {bias.device}"))
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features or weight.stride(1) != 1 or bias is not None and bias.shape != (out_features,):
        raise ValueError(f"linear_rows: x (..., {in_features}) against a weight ({out_features}, {in_features}) "
                         f"with contiguous rows and a bias ({out_features},); got x {tuple(x.shape)}, weight strides "
                         f"{weight.stride()}, bias {None if bias is None else tuple(bias.shape)}")
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if bias is not None:
        bias = bias.float().contiguous()
    if not available(dtype):
        raise RuntimeError(f"linear_rows: no {dtype} loop on this machine (bf16 needs a CPU with AVX512_BF16)")
    y = torch.empty(rows.shape[0], out_features)
    if rows.shape[0]:
        functions()[dtype](weight.data_ptr(), weight.stride(0), rows.data_ptr(), rows.stride(0),
                           None if bias is None else bias.data_ptr(), y.data_ptr(), out_features, rows.shape[0],
                           out_features, in_features, torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features).to(dtype)


@torch.library.custom_op("mmr1::linear_rows", mutates_args=())
def linear_rows_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """linear_rows as an operator, so a torch.compile graph calls it instead of tracing into ctypes."""
    return linear_rows(x, weight, bias)


@linear_rows_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def takes_loop(x: torch.Tensor, weight: torch.Tensor, min_rows: int, max_rows: int) -> bool:
    """Whether F.linear(x, weight) is an inference product the loop should take: min_rows..max_rows rows of x, no
    gradients, x of the weight's dtype on the CPU, weight rows contiguous. (The loop for that dtype must exist: the
    callers only route weights for which `available(weight.dtype)`.)"""
    in_features = weight.shape[1]
    return (min_rows * in_features <= x.numel() <= max_rows * in_features  # first: cheapest
            and not torch.is_grad_enabled() and x.dtype == weight.dtype and x.device.type == "cpu" and x.dim() > 0
            and weight.stride(1) == 1)


def _few_row_forward(layer: nn.Linear, min_rows: int, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if not takes_loop(x, w, min_rows, max_rows):
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


def serving_backbones(*models: nn.Module | None) -> list[nn.Module]:
    """The backbones an engine step runs for these models (target, draft; None skipped): a MultimodalR1's encoders
    run in their own threads, so only its backbone."""
    return [b for b in (getattr(m, "backbone", m) for m in models if m is not None) if b is not None]


def parameter_bytes(backbones: list[nn.Module]) -> int:
    """What the backbones' parameters take; more than last_level_cache_bytes() means a step streams them from
    memory."""
    return sum(p.numel() * p.element_size() for b in backbones for p in b.parameters())


def loop_experts(backbones: list[nn.Module], streams: bool) -> list[GroupedExperts]:
    """The bf16 CPU stacked experts (h @ w[e], (in, out) weights) of `backbones` whose one-token products should run
    on rows_times: all of them when the weights stream from memory (`streams`), else those whose expert weights
    are CACHED_MIN_BYTES or more. torch's bf16 matmul read this layout at 9-11 GB/s here, the loop at about 3x that;
    fp32 experts keep torch's (MKL's one-row product of this layout is already fast)."""
    if _rows_times_function() is None:
        return []
    return [m for b in backbones for m in b.modules() if isinstance(m, GroupedExperts)
            and m.w_gate.dtype == torch.bfloat16 and m.w_gate.device.type == "cpu"
            and (streams or m.w_gate[0].numel() * 2 >= CACHED_MIN_BYTES)]


def mark_experts(experts: list[GroupedExperts]) -> None:
    """While marked, the batch-1 path's one-token MoE (mmr1.engine.solo._moe_one) multiplies these experts through
    rows_times (compiled: its operator)."""
    for m in experts:
        m.__dict__["few_row_matmul"] = rows_times


def unmark_experts(experts: list[GroupedExperts]) -> None:
    for m in experts:
        m.__dict__.pop("few_row_matmul", None)


class FewRowLinears:
    """`with FewRowLinears(model, draft):` runs the plain fp32 / bf16 CPU nn.Linear layers of the given modules'
    backbones on the loop whenever they are fed few rows (ROW_LIMITS); every other call and module runs as it
    would."""

    def __init__(self, *models: nn.Module | None):
        if not available():
            raise RuntimeError("FewRowLinears: the CPU few-row linear loop is not available here (it needs AVX-512, "
                               "a C compiler and PyTorch's GNU OpenMP)")
        self._layers: list[tuple[nn.Linear, Any]] = []
        backbones = serving_backbones(*models)
        layers = [layer for b in backbones for layer in b.modules() if type(layer) is nn.Linear
                  and layer.weight.device.type == "cpu" and available(layer.weight.dtype)]
        # Weights read from memory at every step: every product of up to its dtype's row limit takes the loop;
        # otherwise only those with a weight of CACHED_MIN_BYTES or more, and for fp32 only from 2 rows (see the
        # module's docstring).
        self.model_bytes = parameter_bytes(backbones)
        self.streams = self.model_bytes > last_level_cache_bytes()
        for layer in layers:
            weight = layer.weight
            if self.streams or weight.numel() * weight.element_size() >= CACHED_MIN_BYTES:
                fp32_from_cache = weight.dtype == torch.float32 and not self.streams
                forward = _few_row_forward(layer, 2 if fp32_from_cache else 1, ROW_LIMITS[weight.dtype])
                self._layers.append((layer, forward))
        self._experts = loop_experts(backbones, self.streams)

    def __len__(self) -> int:
        return len(self._layers) + len(self._experts)

    def __enter__(self) -> "FewRowLinears":
        for layer, forward in self._layers:
            layer.__dict__["forward"] = forward  # an instance attribute, found before nn.Linear.forward
        mark_experts(self._experts)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, _ in self._layers:
            layer.__dict__.pop("forward", None)
        unmark_experts(self._experts)
