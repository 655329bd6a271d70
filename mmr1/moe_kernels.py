"""SwiGLU experts over tokens already sorted by expert: grouped GEMM, a padded-bmm fallback, and the loop reference.

Every function takes the same arguments and returns the same thing:
    x (M, D) rows sorted by expert, counts (E,) rows per expert (sum == M),
    w_gate, w_up (E, D, H), w_down (E, H, D)  ->  (M, D),  row i = w_down[e]ᵀ(silu(x_i w_gate[e]) * x_i w_up[e]).
Autograd flows through all of them (x and the three weights); none runs a Python loop over experts except
`loop_swiglu`, which is kept as the readable reference the fast paths are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmr1 import cpu_grouped_gemm
from mmr1.moe_elementwise import fused_swiglu_backward, fused_swiglu_forward


def loop_swiglu(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert that has rows (host sync on counts)."""
    outputs = []
    for e, rows in enumerate(x.split(counts.tolist())):
        if rows.shape[0] == 0:
            continue
        hidden = F.silu(rows @ w_gate[e]) * (rows @ w_up[e])  # (M_e, H)
        outputs.append(hidden @ w_down[e])  # (M_e, D)
    return torch.cat(outputs) if outputs else x.new_zeros(x.shape)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """(E,) counts -> (E,) int32 end offset of each expert's rows, the layout torch._grouped_mm expects."""
    return counts.cumsum(0).to(torch.int32)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on for x's device, else the weights'."""
    return (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
            else weight.dtype)


def grouped_mm_swiglu(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                      w_down: torch.Tensor) -> torch.Tensor:
    """Three grouped GEMMs (torch._grouped_mm): each expert multiplies only its own contiguous rows.

    grouped_mm is not autocast-aware and wants one dtype, so under autocast everything is cast to the autocast
    dtype here, as autocast would do for a plain matmul.
    """
    dtype = compute_dtype(x, w_gate)
    x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    offs = _offsets(counts)
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # grouped_mm's shape function (which torch.compile traces with) accepts only 16-bit inputs, where the
        # CPU kernel also runs fp32: a compiled model runs these products eagerly.
        return _grouped_products_eager(x, offs, w_gate, w_up, w_down)
    return _grouped_products(x, offs, w_gate, w_up, w_down)


def _grouped_products(x: torch.Tensor, offs: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                      w_down: torch.Tensor) -> torch.Tensor:
    hidden = F.silu(torch._grouped_mm(x, w_gate, offs=offs)) * torch._grouped_mm(x, w_up, offs=offs)  # (M, H)
    return torch._grouped_mm(hidden, w_down, offs=offs)  # (M, D)


_grouped_products_eager = torch.compiler.disable(_grouped_products)


def padded_bmm_swiglu(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                      w_down: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Fallback: scatter each expert's rows into a zero-padded (E, C, D) block (C = the largest count), run
    three batched matmuls, gather the real rows back. Padding rows are zero, so they add nothing to the
    weight gradients; costs one host sync (C) and E * C - M wasted rows."""
    M, D = x.shape
    E = counts.shape[0]
    if capacity is None:
        capacity = int(counts.max()) if M else 0
    slot = _padded_slots(counts, M, capacity)  # (M,) in E*C
    padded = x.new_zeros(E * capacity, D).index_copy(0, slot, x).view(E, capacity, D)  # (E, C, D)
    hidden = F.silu(torch.bmm(padded, w_gate)) * torch.bmm(padded, w_up)  # (E, C, H)
    out = torch.bmm(hidden, w_down)  # (E, C, D)
    return out.reshape(E * capacity, D)[slot]  # (M, D)


def _padded_slots(counts: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
    """(E,) rows per expert of `rows` expert-sorted rows -> (rows,) each row's slot in an (E * capacity) padded
    block: expert e's i-th row goes to e * capacity + i."""
    starts = counts.cumsum(0) - counts  # (E,) first row of each expert
    expert_of_row = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts,
                                            output_size=rows)  # (rows,)
    return expert_of_row * capacity + torch.arange(rows, device=counts.device) - starts[expert_of_row]


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm has a kernel here: CUDA bf16 on SM80+; CPU (a C++ loop of mm) for fp32/bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def grouped_mm_fits(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides and data pointers (e.g. fp32 widths % 4 == 0)."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(t.shape[-1] * size % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


# Measured on CPU (benchmarks/moe.py, 128 experts x ~64 rows, fwd+bwd): in bf16 (oneDNN/AMX bmm) the padded bmm
# beat torch._grouped_mm by ~1.5x while the padding stayed small; in fp32 grouped_mm was ~10% faster. When one
# expert takes far more rows than the rest, padding multiplies the work, so bf16 switches to grouped_mm too: with
# the hand-written padded backward the padded path stays faster up to about 3 padded rows per real row at 4096
# tokens and beyond 4 at 1216 (benchmarks/moe_padding.py). E * C / M is the largest expert's load over the mean.
MAX_PADDING_WASTE = 3.0  # padded rows E * C allowed per real row before the CPU switches to grouped_mm


# MKL's batched GEMM spreads whole experts over the cores, which pays when there are many experts with a few dozen
# rows each (the seed geometry: 128 experts, ~64 rows). With few experts, or a handful of rows per expert (decode
# steps), torch._grouped_mm's per-GEMM split measured as fast or faster on the 2-core CPU (8 experts: 0.93-0.98x
# fwd+bwd; 32 experts x 128 rows: 1.34x; 128 x 16 rows: 0.97x; 128 x 64 rows: 1.2x).
MKL_MIN_EXPERTS = 16
MKL_MIN_ROWS_PER_EXPERT = 32


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """The fastest correct path for x's device and dtype (kernel_choice): grouped GEMM or padded bmm."""
    dtype = compute_dtype(x, w_gate)
    path, capacity = kernel_choice(x.device, dtype, counts, x.shape[0], x, w_gate, w_up, w_down)
    if path == "mkl":
        return _mkl_swiglu(x, counts, x.new_ones(x.shape[0], 1), w_gate, w_up, w_down)
    if path == "grouped":
        return grouped_mm_swiglu(x, counts, w_gate, w_up, w_down)
    return padded_bmm_swiglu(x, counts, w_gate, w_up, w_down, capacity)


def kernel_choice(device: torch.device, dtype: torch.dtype, counts: torch.Tensor, rows: int,
                  *tensors: torch.Tensor) -> tuple[str, int | None]:
    """("mkl" | "grouped" | "padded", the padded capacity): MKL's grouped GEMM for fp32 on the CPU where PyTorch
    ships MKL (mmr1.cpu_grouped_gemm: no padding, and ~1.3x torch._grouped_mm's speed per GEMM at the seed
    geometry), torch._grouped_mm on CUDA and for fp32 CPUs without MKL, padded bmm for bf16 on the CPU while the
    padding is cheap (oneDNN/AMX bmm; 6-11 % faster per layer when fused with the dispatch), padded bmm wherever
    grouped GEMM has no kernel or `tensors` don't fit its alignment."""
    if device.type == "cpu" and dtype == torch.float32 and cpu_grouped_gemm.available(*tensors):
        used = int((counts > 0).sum())
        if used >= MKL_MIN_EXPERTS and rows >= MKL_MIN_ROWS_PER_EXPERT * used:
            return "mkl", None
    grouped_ok = grouped_mm_available(device, dtype) and grouped_mm_fits(dtype, *tensors)
    if grouped_ok and (device.type != "cpu" or dtype == torch.float32):
        return "grouped", None
    capacity = int(counts.max()) if rows else 0  # the one host sync
    if grouped_ok and counts.shape[0] * capacity > MAX_PADDING_WASTE * rows:
        return "grouped", None
    return "padded", capacity


# ---- the whole routed computation: dispatch, experts, weighted combine ----------------------------------------
def routed_swiglu(flat: torch.Tensor, slot_experts: torch.Tensor, slot_weights: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, *, has_unused: bool = False,
                  path: str | None = None) -> torch.Tensor:
    """A MoE layer's routed experts: flat (N, D) tokens, slot_experts (N*k,) the expert of each (token, slot)
    assignment (== num_experts: unused, when has_unused), slot_weights (N*k,) its routing weight ->
    (N, D), each token's weighted sum of its experts' SwiGLU outputs.

    Grouped GEMM sorts the assignments by expert, gathers their rows, multiplies, weights and scatter-adds them
    back (sort_assignments, grouped_mm_swiglu, combine_sorted). The padded path (CPU, bf16) goes straight from tokens to an (E, C, D) block and back:
    one gather in, one index_add out, where sorting first and padding second moves every row twice more, forward
    and backward (6-11 % of a bf16 layer's fwd+bwd at the seed geometry). `path` forces "mkl", "grouped" or "padded"."""
    order, slot_tokens, counts = sort_assignments(slot_experts, w_gate.shape[0], flat.shape[0], has_unused)
    dtype = compute_dtype(flat, w_gate)
    capacity = None
    if path is None:
        path, capacity = _routed_path(flat, counts, dtype, w_gate, w_up, w_down)
    if path == "padded":
        if capacity is None:
            capacity = int(counts.max()) if slot_tokens.numel() else 0
        return _padded_routed(flat, slot_tokens, counts, slot_weights[order], capacity, dtype, w_gate, w_up, w_down)
    if path == "mkl":
        weights = slot_weights[order].to(flat.dtype)[:, None]  # (M, 1), applied H wide inside the experts
        rows = _mkl_swiglu(flat.index_select(0, slot_tokens), counts, weights, w_gate, w_up, w_down)  # (M, D)
        return rows.new_zeros(flat.shape).index_add_(0, slot_tokens, rows)
    # index_select, not flat[slot_tokens]: its backward is an index_add, where advanced indexing's is an
    # accumulating index_put (12 of ~140 ms of an fp32 layer's fwd+bwd at the seed geometry on the CPU).
    rows = grouped_mm_swiglu(flat.index_select(0, slot_tokens), counts, w_gate, w_up, w_down)  # (M, D)
    return combine_sorted(flat.shape[0], rows, slot_tokens, slot_weights[order])


def sort_assignments(slot_experts: torch.Tensor, num_experts: int, num_tokens: int,
                     has_unused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N*k,) experts of the (token, slot) assignments -> the used ones sorted by expert: their positions (M,),
    their tokens (M,), and rows per expert (E,). Unused assignments (expert == num_experts) sort last and are cut
    (one host sync, as the padded path and the expert loop need anyway)."""
    k = slot_experts.numel() // max(num_tokens, 1)
    order = slot_experts.argsort(stable=True)
    counts = torch.bincount(slot_experts, minlength=num_experts + 1)[:num_experts]
    slot_tokens = order // k
    if has_unused:
        used = int(counts.sum())
        order, slot_tokens = order[:used], slot_tokens[:used]
    return order, slot_tokens, counts


def combine_sorted(num_tokens: int, rows: torch.Tensor, slot_tokens: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs (M, D) of sorted assignments -> (N, D): weighted, summed per token."""
    rows = rows * weights[:, None].to(rows.dtype)
    return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, slot_tokens, rows)


def _routed_path(flat: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype,
                 *weights: torch.Tensor) -> tuple[str, int | None]:
    """kernel_choice for the whole routed computation: the gathered rows will be a fresh copy of flat's rows."""
    return kernel_choice(flat.device, dtype, counts, int(counts.sum()), flat, *weights)


def _padded_routed(flat: torch.Tensor, slot_tokens: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor,
                   capacity: int, dtype: torch.dtype, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    N, D = flat.shape
    E, M = counts.shape[0], slot_tokens.shape[0]
    slot = _padded_slots(counts, M, capacity)  # (M,) in E*C
    # Padding slots read a zero row N and carry weight 0, so they add nothing to outputs or gradients.
    token_of_slot = torch.full((E * capacity,), N, dtype=torch.long, device=flat.device).index_copy_(
        0, slot, slot_tokens)  # (E*C,)
    weight_of_slot = weights.new_zeros(E * capacity).index_copy_(0, slot, weights)  # (E*C,)
    padded = torch.cat([flat, flat.new_zeros(1, D)]).index_select(0, token_of_slot).view(E, capacity, D)
    padded, w_gate, w_up, w_down = (t.to(dtype) for t in (padded, w_gate, w_up, w_down))
    # Without autograd the plain ops skip the intermediates PaddedSwiGLU keeps for its backward.
    expert_block = PaddedSwiGLU.apply if torch.is_grad_enabled() else weighted_padded_swiglu_reference
    out = expert_block(padded, w_gate, w_up, w_down, weight_of_slot.view(E, capacity, 1).to(dtype))  # (E, C, D)
    out = out.view(E * capacity, D)
    return out.new_zeros(N + 1, D).index_add_(0, token_of_slot, out)[:N]


def weighted_padded_swiglu_reference(padded: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                                     w_down: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """PaddedSwiGLU's forward as plain ops, differentiated by autograd: the reference its backward is tested
    (tests/test_moe_kernels.py) and timed (benchmarks/moe_backward.py) against."""
    hidden = F.silu(torch.bmm(padded, w_gate)) * torch.bmm(padded, w_up) * weight  # (E, C, H)
    return torch.bmm(hidden, w_down)  # (E, C, D)


class PaddedSwiGLU(torch.autograd.Function):
    """Weighted SwiGLU experts on a padded block with a hand-written backward:
    padded (E, C, D), w_gate/w_up (E, D, H), w_down (E, H, D), weight (E, C, 1) -> (E, C, D), each row
    w_down[e]ᵀ(weight * silu(x w_gate[e]) * x w_up[e]). All inputs share one dtype.

    Autograd's own backward of these ops sums the gate and up gradients of `padded` in a separate pass over an
    (E, C, D) block and recomputes or re-saves the element-wise intermediates; here the up term accumulates into
    the gate term's batched matmul (baddbmm) and the intermediates are saved once from the forward. Measured at
    the seed geometry in bf16 on the CPU: benchmarks/results/moe_backward.md."""

    @staticmethod
    def forward(ctx, padded, w_gate, w_up, w_down, weight):
        gate = torch.bmm(padded, w_gate)  # (E, C, H)
        up = torch.bmm(padded, w_up)  # (E, C, H)
        # The routing weight scales the hidden row before the down projection (linear, so the same sum): H wide
        # instead of D. The element-wise work is one fused kernel each way (moe_elementwise).
        hidden = fused_swiglu_forward(gate, up, weight)  # (E, C, H)
        ctx.save_for_backward(padded, w_gate, w_up, w_down, weight, gate, up, hidden)
        return torch.bmm(hidden, w_down)  # (E, C, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        padded, w_gate, w_up, w_down, weight, gate, up, hidden = ctx.saved_tensors
        need_padded, need_gate, need_up, need_down, need_weight = ctx.needs_input_grad  # frozen experts skip theirs
        d_hidden = torch.bmm(d_out, w_down.transpose(1, 2))  # (E, C, H)
        d_w_down = torch.bmm(hidden.transpose(1, 2), d_out) if need_down else None  # (E, H, D)
        d_gate, d_up, d_weight = fused_swiglu_backward(d_hidden, gate, up, weight)  # (E, C, H) x2, (E, C, 1)
        d_padded = (torch.bmm(d_gate, w_gate.transpose(1, 2)).baddbmm_(d_up, w_up.transpose(1, 2))
                    if need_padded else None)  # (E, C, D)
        d_w_gate = torch.bmm(padded.transpose(1, 2), d_gate) if need_gate else None  # (E, D, H)
        d_w_up = torch.bmm(padded.transpose(1, 2), d_up) if need_up else None  # (E, D, H)
        return d_padded, d_w_gate, d_w_up, d_w_down, d_weight if need_weight else None


class GroupedSwiGLU(torch.autograd.Function):
    """Weighted SwiGLU experts on expert-sorted rows through MKL's grouped GEMM (mmr1.cpu_grouped_gemm; fp32 on
    the CPU): x (M, D), counts (E,) rows per expert, w_gate/w_up (E, D, H), w_down (E, H, D), weight (M, 1) ->
    (M, D), row i = w_down[e]ᵀ(weight_i * silu(x_i w_gate[e]) * x_i w_up[e]). No padding; the backward is written
    out as PaddedSwiGLU's is (the up term of dx accumulates into the gate term's GEMM)."""

    @staticmethod
    def forward(ctx, x, counts, w_gate, w_up, w_down, weight):
        gemm, plan = cpu_grouped_gemm.grouped_gemm, cpu_grouped_gemm.GroupPlan(counts)
        ctx.plan = plan
        gate, up = cpu_grouped_gemm.grouped_gemm_two(x, w_gate, x, w_up, plan)  # (M, H) each, one batch
        # The routing weight scales the hidden row (H wide, cheaper than D); the element-wise work is one fused
        # kernel each way (moe_elementwise), which recomputes silu in the backward instead of keeping it.
        hidden = fused_swiglu_forward(gate, up, weight)  # (M, H)
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate, up, weight, hidden)
        return gemm(hidden, w_down, plan)  # (M, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, w_gate, w_up, w_down, gate, up, weight, hidden = ctx.saved_tensors  # counts live in ctx.plan
        need_x, _, need_gate, need_up, need_down, need_weight = ctx.needs_input_grad
        gemm, weight_gemm, plan = cpu_grouped_gemm.grouped_gemm, cpu_grouped_gemm.grouped_weight_gemm, ctx.plan
        d_out = d_out.contiguous()
        d_hidden = gemm(d_out, w_down, plan, transpose_b=True)  # (M, H)
        d_w_down = weight_gemm(hidden, d_out, plan) if need_down else None  # (E, H, D)
        d_gate, d_up, d_weight = fused_swiglu_backward(d_hidden, gate, up, weight)  # (M, H), (M, H), (M, 1)
        d_x = None
        if need_x:
            d_x = cpu_grouped_gemm.grouped_gemm_two(d_gate, w_gate, d_up, w_up, plan, transpose_b=True,
                                                    sum_products=True)  # (M, D)
        d_w_gate = weight_gemm(x, d_gate, plan) if need_gate else None  # (E, D, H)
        d_w_up = weight_gemm(x, d_up, plan) if need_up else None  # (E, D, H)
        return d_x, None, d_w_gate, d_w_up, d_w_down, d_weight if need_weight else None


@torch.compiler.disable  # host-side numpy and ctypes: a compiled model runs this part eagerly
def _mkl_swiglu(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """GroupedSwiGLU, or without autograd the same products with the intermediates freed as they go."""
    if torch.is_grad_enabled():
        return GroupedSwiGLU.apply(x, counts, w_gate, w_up, w_down, weight)
    gemm, plan = cpu_grouped_gemm.grouped_gemm, cpu_grouped_gemm.GroupPlan(counts)
    gate, up = cpu_grouped_gemm.grouped_gemm_two(x, w_gate, x, w_up, plan)  # (M, H) each
    hidden = F.silu(gate, inplace=True).mul_(up).mul_(weight)  # (M, H)
    return gemm(hidden, w_down, plan)  # (M, D)


def cpu_path(dtype: torch.dtype) -> str:
    """Which kernel a MoE layer (routed_swiglu) uses on CPU for this dtype under a balanced load (the benchmark
    reports it)."""
    if dtype == torch.float32 and cpu_grouped_gemm.available(torch.empty(0)):
        threaded = cpu_grouped_gemm.thread_slices() is not None
        threads = "one slice per OpenMP thread" if threaded else "MKL's threads"
        return (f"mkl grouped GEMM (cblas_sgemm_batch, {threads}) from {MKL_MIN_EXPERTS} experts x "
                f"{MKL_MIN_ROWS_PER_EXPERT} rows, else grouped_mm")
    if grouped_mm_available(torch.device("cpu"), dtype) and dtype == torch.float32:
        return "grouped_mm"
    if grouped_mm_available(torch.device("cpu"), dtype):
        return f"fused padded_bmm (grouped_mm when padding > {MAX_PADDING_WASTE:g}x)"
    return "fused padded_bmm"
