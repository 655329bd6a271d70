"""Decode attention straight from the paged pool on the CPU: one query token per row, its keys wherever its blocks
are, no gather, no padding, no mask.

In a packed step (mmr1/engine/packed.py) every decoding row attends to its own cached tokens plus the one it
feeds. Through PyTorch that is two `index_select`s of the pool into a padded (G, Hkv, S, Dh) copy, a key mask
and an SDPA call per group of rows: with 16 rows that bookkeeping, not the arithmetic, is most of the attention
time, and its cost grows with every row, which is what separates a continuous-batching step from a nearly empty
static one on a weight-bound model (benchmarks/results/engine.md, item 2).

Here one C loop (`SOURCE`, built on first use like mmr1.cpu_threaded_batch's, AVX-512 intrinsics, OpenMP over
(row, KV head) pairs on PyTorch's threads) reads each row's keys and values in place -- in the model's dtype (fp32
or bf16), or INT8 with one fp16 scale per (token, KV head), which multiplies that key's score and that value's
weight, so nothing is dequantized into a copy -- accumulates in fp32 and writes each row's output into its token
of the step's output. Per (row, KV head) it loads the group's queries once, scores every key against all of them
(grouped-query attention reads each key once), takes an exact softmax (max, exp, sum; no online rescaling), then
sums the values. `function()` is None where the loop cannot be built (a CPU without AVX-512, no C compiler, no
GNU OpenMP in PyTorch's wheel); callers then keep the SDPA path, as they do on other devices.
"""
from __future__ import annotations

import ctypes
import functools
import math

import torch

from mmr1 import cpu_threaded_batch

_KERNEL = r"""
/* One (row, KV head) pair: its `group` query heads (query j at q + j * head_stride, its output likewise) against
   the row's n keys; `chunks` 16-float pieces per head. INT8 pools: one fp16 scale per (slot, KV head) multiplies
   each key's score and each value's weight. */
static inline __attribute__((always_inline)) void attend_{name}(
        const {T} *q, const {K} *keys, const {K} *values, const uint16_t *key_scales, const uint16_t *value_scales,
        const int64_t *slots, int64_t n, int kv_heads, int h, int dim, float scale, {T} *out, int64_t head_stride,
        float *score, const int group, const int chunks) {{
    __m512 query[16 * 16], acc[16 * 16], row[16];  /* group <= 16, chunks <= 16 (head_dim <= 256) */
    float top[16], total[16];
    const __m512 scaled = _mm512_set1_ps(scale);
    for (int j = 0; j < group; j++)
        for (int c = 0; c < chunks; c++)
            query[j * chunks + c] = _mm512_mul_ps({LOAD}(q + j * head_stride + c * 16), scaled);
    for (int j = 0; j < group; j++) top[j] = -INFINITY;
    for (int64_t s = 0; s < n; s++) {{
        const {K} *k = keys + (slots[s] * kv_heads + h) * dim;
        for (int c = 0; c < chunks; c++) row[c] = {LOADK}(k + c * 16);
        for (int j = 0; j < group; j++) {{
            __m512 dot = _mm512_mul_ps(query[j * chunks], row[0]);
            for (int c = 1; c < chunks; c++) dot = _mm512_fmadd_ps(query[j * chunks + c], row[c], dot);
            const float x = _mm512_reduce_add_ps(dot) * {SCALE}(key_scales, slots[s] * kv_heads + h);
            score[(size_t)j * n + s] = x;
            top[j] = x > top[j] ? x : top[j];
        }}
    }}
    for (int j = 0; j < group; j++) {{  /* exact softmax over the row's keys; the sum divides the output */
        float *sj = score + (size_t)j * n, sum = 0.0f;
        for (int64_t s = 0; s < n; s++) {{ sj[s] = expf(sj[s] - top[j]); sum += sj[s]; }}
        total[j] = 1.0f / sum;
    }}
    for (int i = 0; i < group * chunks; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s++) {{
        const {K} *v = values + (slots[s] * kv_heads + h) * dim;
        const float v_scale = {SCALE}(value_scales, slots[s] * kv_heads + h);
        for (int c = 0; c < chunks; c++) row[c] = {LOADK}(v + c * 16);
        for (int j = 0; j < group; j++) {{
            const __m512 p = _mm512_set1_ps(score[(size_t)j * n + s] * v_scale);
            for (int c = 0; c < chunks; c++) acc[j * chunks + c] = _mm512_fmadd_ps(p, row[c], acc[j * chunks + c]);
        }}
    }}
    for (int j = 0; j < group; j++)
        for (int c = 0; c < chunks; c++)
            {STORE}(out + j * head_stride + c * 16, _mm512_mul_ps(acc[j * chunks + c], _mm512_set1_ps(total[j])));
}}

/* Row r's query is token tokens[r] of q, laid out (heads, tokens, dim) with the given strides; its output goes to
   the same place in out (same strides). */
void decode_attention_{name}(const {T} *q, const {K} *keys, const {K} *values, const uint16_t *key_scales,
                             const uint16_t *value_scales, const int64_t *slots, const int64_t *starts,
                             const int64_t *tokens, int rows, int heads, int kv_heads, int dim, int64_t head_stride,
                             int64_t token_stride, float scale, {T} *out, int threads) {{
    const int group = heads / kv_heads, chunks = dim / 16;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int task = 0; task < rows * kv_heads; task++) {{
        const int r = task / kv_heads, h = task % kv_heads;
        const int64_t first = starts[r], n = starts[r + 1] - first;
        const int64_t at = (int64_t)h * group * head_stride + tokens[r] * token_stride;
        float *score = malloc(sizeof(float) * (size_t)(group < 16 ? group : 16) * (size_t)(n > 0 ? n : 1));
        /* The common shapes with constant loop bounds (the compiler keeps queries and sums in registers); more
           than 16 query heads per KV head go 16 at a time. */
        #define ATTEND(G, C) attend_{name}(q + at, keys, values, key_scales, value_scales, slots + first, n, \
                                           kv_heads, h, dim, scale, out + at, head_stride, score, G, C)
        if (group > 16) {{
            for (int j = 0; j < group; j += 16)
                attend_{name}(q + at + j * head_stride, keys, values, key_scales, value_scales, slots + first, n,
                              kv_heads, h, dim, scale, out + at + j * head_stride, head_stride, score,
                              group - j < 16 ? group - j : 16, chunks);
        }} else switch (group * 32 + chunks) {{
            case 1 * 32 + 2: ATTEND(1, 2); break;
            case 2 * 32 + 2: ATTEND(2, 2); break;
            case 4 * 32 + 2: ATTEND(4, 2); break;
            case 1 * 32 + 4: ATTEND(1, 4); break;
            case 2 * 32 + 4: ATTEND(2, 4); break;
            case 4 * 32 + 4: ATTEND(4, 4); break;
            case 8 * 32 + 4: ATTEND(8, 4); break;
            case 1 * 32 + 8: ATTEND(1, 8); break;
            case 2 * 32 + 8: ATTEND(2, 8); break;
            case 4 * 32 + 8: ATTEND(4, 8); break;
            case 8 * 32 + 8: ATTEND(8, 8); break;
            default: ATTEND(group, chunks);
        }}
        #undef ATTEND
        free(score);
    }}
}}
"""

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* AVX-512 only (x86-64 servers since 2017); elsewhere the library is not built and callers keep SDPA. */
#ifndef __AVX512F__
#error "decode_attention needs AVX-512"
#endif

static inline __m512 f32_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void f32_store(float *p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline __m512 bf16_load(const uint16_t *p) {  /* bfloat16 -> float: the 16 bits become the high half */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void bf16_store(uint16_t *p, __m512 x) {  /* round to nearest even, as PyTorch's float -> bfloat16 */
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);  /* NaN stays NaN (quiet) */
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(rounded));
}
static inline __m512 i8_load(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline float no_scale(const uint16_t *scales, int64_t i) { (void)scales; (void)i; return 1.0f; }
static inline float fp16_scale(const uint16_t *scales, int64_t i) { return _cvtsh_ss(scales[i]); }
"""
for q_name, q_type in (("f32", "float"), ("bf16", "uint16_t")):
    SOURCE += _KERNEL.format(name=q_name, T=q_type, LOAD=f"{q_name}_load", STORE=f"{q_name}_store", K=q_type,
                             LOADK=f"{q_name}_load", SCALE="no_scale")
    SOURCE += _KERNEL.format(name=f"{q_name}_int8", T=q_type, LOAD=f"{q_name}_load", STORE=f"{q_name}_store",
                             K="int8_t", LOADK="i8_load", SCALE="fp16_scale")

_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the model's dtype: queries, outputs, unquantized K/V
# -march=native: the loops vectorize for this CPU (AVX-512 where present); the library is cached per machine.
_FLAGS = ["-O3", "-fopenmp", "-march=native", "-ffast-math"]


@functools.cache
def function() -> dict[tuple[torch.dtype, bool], ctypes._CFuncPtr] | None:
    """The compiled loops by (query dtype, INT8 pool), or None where they cannot be built: silently on CPUs without
    AVX-512 or PyTorch builds without GNU OpenMP, with one warning when the compiler fails."""
    lib = cpu_threaded_batch.avx512_library("decode_attention", SOURCE, _FLAGS, ["-lm"],
                                            "decoding rows attend through SDPA instead (slower with many rows)")
    if lib is None:
        return None
    fns = {}
    for dtype, name in _DTYPES.items():
        for int8 in (False, True):
            fn = getattr(lib, f"decode_attention_{name}_int8" if int8 else f"decode_attention_{name}")
            fn.restype = None
            fn.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int] * 4 + [ctypes.c_int64] * 2
                           + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int])
            fns[dtype, int8] = fn
    return fns


def supported(pool) -> bool:
    """Whether `pool` (a PagedKVPool) can be read by the loop: CPU, an fp32 or bf16 model (K/V in that dtype or
    INT8), head_dim a multiple of 16 up to 256."""
    return (pool.dtype in _DTYPES and pool.keys[0].device.type == "cpu" and pool.head_dim % 16 == 0
            and pool.head_dim <= 256 and function() is not None)


def check_rows(slots: torch.Tensor, starts: torch.Tensor, num_slots: int, tokens: torch.Tensor, num_tokens: int
               ) -> None:
    """Raise IndexError unless every slot is in [0, num_slots), starts run from 0 to len(slots) without going back,
    and every token is in [0, num_tokens)."""
    bad = (slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots)
           or int(starts[0]) != 0 or int(starts[-1]) != slots.numel() or bool((starts[1:] < starts[:-1]).any())
           or tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= num_tokens))
    if bad:
        raise IndexError(f"decode_attention: rows must index the pool's {num_slots} slots (starts from 0 to "
                         f"{slots.numel()}, non-decreasing) and the {num_tokens} query tokens")


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     starts: torch.Tensor, tokens: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None,
                     check_indices: bool = True) -> torch.Tensor:
    """Queries q (H, N, Dh) of N tokens (any strides, Dh contiguous); row r is token tokens[r] (default: token r,
    with R = N rows) and attends to the pool slots slots[starts[r]:starts[r + 1]] of keys/values (a layer's pool
    (..., Hkv, Dh), contiguous, q's dtype), all of them: a decoding row's keys are its cached tokens and itself.
    Writes softmax(q k^T / sqrt(Dh)) v of each row to the row's token in `out` (H, N, Dh) (new when None; the
    other tokens are left alone) and returns it. INT8 keys/values come with their fp16 scales (..., Hkv), one per
    slot and KV head (mmr1.engine.paged_cache.quantize_int8). The C loop reads whatever the indices point at, so
    they are checked against the tensors first; `check_indices=False` skips that for a caller that has checked them
    once for all layers (PackedBatch)."""
    H, N, Dh = q.shape
    Hkv = keys.shape[-2]
    tokens = torch.arange(N) if tokens is None else tokens
    R = tokens.numel()
    int8 = keys.dtype == torch.int8
    if q.dtype not in _DTYPES or keys.dtype not in (q.dtype, torch.int8) or values.dtype != keys.dtype:
        raise TypeError(f"decode_attention: q must be fp32 or bf16 and keys/values q's dtype or int8, got "
                        f"{q.dtype}, {keys.dtype}, {values.dtype}")
    scales = (key_scales, value_scales)
    if int8 != (key_scales is not None) or int8 != (value_scales is not None) or int8 and any(
            t.dtype != torch.float16 or t.shape != keys.shape[:-1] or not t.is_contiguous() for t in scales):
        raise ValueError("decode_attention: int8 keys/values need contiguous fp16 key_scales and value_scales "
                         "(..., Hkv) of the pool's shape; other pools take none")
    if (H % Hkv or keys.shape[-1] != Dh or Dh % 16 or Dh > 256 or values.shape != keys.shape
            or not (keys.is_contiguous() and values.is_contiguous())):
        raise ValueError(f"decode_attention: q ({H}, N, {Dh}) against contiguous keys and values (..., Hkv, {Dh}) "
                         f"with H a multiple of Hkv and Dh a multiple of 16 up to 256; got keys {tuple(keys.shape)}")
    if any(t.dtype != torch.int64 or not t.is_contiguous() for t in (slots, starts, tokens)) or starts.numel() != R + 1:
        raise ValueError("decode_attention: slots, starts and tokens must be contiguous int64, starts holding R + 1 "
                         "offsets")
    if any(t is not None and t.device.type != "cpu" for t in (q, keys, values, slots, starts, tokens, out, *scales)):
        raise ValueError("decode_attention: every tensor must be on the CPU")
    if check_indices:
        check_rows(slots, starts, keys.numel() // (Hkv * Dh), tokens, N)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride() != q.stride():
        raise ValueError("decode_attention: out must have q's shape, dtype and strides")
    scale_ptrs = [t.data_ptr() if t is not None else None for t in scales]
    function()[q.dtype, int8](q.data_ptr(), keys.data_ptr(), values.data_ptr(), *scale_ptrs, slots.data_ptr(),
                              starts.data_ptr(), tokens.data_ptr(), R, H, Hkv, Dh, q.stride(0), q.stride(1),
                              1.0 / math.sqrt(Dh), out.data_ptr(), torch.get_num_threads())
    return out
