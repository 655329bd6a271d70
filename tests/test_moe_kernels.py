"""Grouped-GEMM and padded-bmm SwiGLU experts against the per-expert loop reference, and the benchmark smoke run."""
from __future__ import annotations

import json

import pytest
import torch

from mmr1 import cpu_grouped_gemm, moe_kernels
from mmr1.moe import GroupedExperts
from mmr1.moe_kernels import (MAX_PADDING_WASTE, grouped_mm_available, grouped_mm_fits, grouped_mm_swiglu,
                              grouped_swiglu, loop_swiglu, padded_bmm_swiglu)

FAST_PATHS = {"grouped_swiglu": grouped_swiglu, "padded_bmm": padded_bmm_swiglu, "grouped_mm": grouped_mm_swiglu,
              "mkl": lambda x, counts, *w: moe_kernels._mkl_swiglu(x, counts, x.new_ones(x.shape[0], 1), *w)}
FP32_ONLY = {"mkl"}  # MKL's batched GEMM is single precision
COUNTS = {
    "uneven_with_empty_experts": [3, 0, 7, 1, 0, 5],
    "one_expert": [9],
    "all_rows_in_one_expert": [0, 0, 6, 0],
    "last_expert_empty": [2, 4, 0],
}
D, H = 16, 8  # 16-byte aligned rows in fp32 and bf16, as torch._grouped_mm requires


def case(counts: list[int], dtype: torch.dtype, seed: int = 0, hidden: int = H):
    g = torch.Generator().manual_seed(seed)
    H = hidden
    E, M = len(counts), sum(counts)
    x = torch.randn(M, D, generator=g).to(dtype).requires_grad_(True)
    weights = [(torch.randn(E, a, b, generator=g) / a ** 0.5).to(dtype).requires_grad_(True)
               for a, b in ((D, H), (D, H), (H, D))]
    return x, torch.tensor(counts), weights


def outputs_and_grads(fn, x, counts, weights, grad_out=None):
    out = fn(x, counts, *weights)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype) if grad_out is None \
        else grad_out
    return out, torch.autograd.grad(out, [x, *weights], grad_out)


def skip_unsupported(path: str, dtype: torch.dtype) -> None:
    if path == "grouped_mm" and not grouped_mm_available(torch.device("cpu"), dtype):
        pytest.skip(f"torch._grouped_mm has no CPU kernel for {dtype} in torch {torch.__version__}")
    if path == "mkl" and not cpu_grouped_gemm.available(torch.empty(0, dtype=dtype)):
        pytest.skip(f"this torch build has no MKL batched GEMM for {dtype}")


@pytest.mark.parametrize("path", list(FAST_PATHS))
@pytest.mark.parametrize("layout", list(COUNTS))
def test_fast_paths_match_loop_forward_and_all_gradients_fp32(path, layout):
    skip_unsupported(path, torch.float32)
    x, counts, weights = case(COUNTS[layout], torch.float32)
    out, grads = outputs_and_grads(FAST_PATHS[path], x, counts, weights)
    ref, ref_grads = outputs_and_grads(loop_swiglu, x, counts, weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(("x", "w_gate", "w_up", "w_down"), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("path", [p for p in FAST_PATHS if p not in FP32_ONLY])
def test_fast_paths_match_loop_bf16(path):
    skip_unsupported(path, torch.bfloat16)
    x, counts, weights = case(COUNTS["uneven_with_empty_experts"], torch.bfloat16)
    out, grads = outputs_and_grads(FAST_PATHS[path], x, counts, weights)
    ref, ref_grads = outputs_and_grads(loop_swiglu, x, counts, weights)
    assert out.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: allow a few rounding steps of difference in accumulation order.
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-2, rtol=2e-2)


def test_experts_with_zero_rows_get_exactly_zero_weight_gradient():
    x, counts, weights = case(COUNTS["uneven_with_empty_experts"], torch.float32)
    _, (_, d_gate, d_up, d_down) = outputs_and_grads(grouped_swiglu, x, counts, weights)
    for empty in (1, 4):
        assert d_gate[empty].abs().max() == 0 and d_up[empty].abs().max() == 0 and d_down[empty].abs().max() == 0


def test_unaligned_width_falls_back_to_padded_bmm():
    x, counts, weights = case(COUNTS["uneven_with_empty_experts"], torch.float32, hidden=6)  # 24-byte rows
    assert not grouped_mm_fits(torch.float32, *weights)
    out, grads = outputs_and_grads(grouped_swiglu, x, counts, weights)
    ref, ref_grads = outputs_and_grads(loop_swiglu, x, counts, weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("counts,expected_path", [([40, 1, 1, 1], "grouped_mm"), ([3, 2, 4, 3], "padded_bmm")])
def test_cpu_bf16_picks_grouped_mm_only_when_padding_would_be_wasteful(monkeypatch, counts, expected_path):
    # [40, 1, 1, 1]: padding to (4, 40) would almost quadruple the work, so grouped_mm runs; [3, 2, 4, 3] pads
    # 12 rows to 16 and stays on the bmm path. Either way the result is the loop's.
    assert (4 * max(counts) > MAX_PADDING_WASTE * sum(counts)) == (expected_path == "grouped_mm")
    calls = []
    real = moe_kernels.grouped_mm_swiglu
    monkeypatch.setattr(moe_kernels, "grouped_mm_swiglu", lambda *a: calls.append(1) or real(*a))
    x, counts, weights = case(counts, torch.bfloat16)
    out, grads = outputs_and_grads(grouped_swiglu, x, counts, weights)
    assert bool(calls) == (expected_path == "grouped_mm")
    ref, ref_grads = outputs_and_grads(loop_swiglu, x, counts, weights)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-2, rtol=2e-2)


def test_no_rows_at_all():
    x, counts, weights = case([0, 0, 0], torch.float32)
    for fn in (grouped_swiglu, padded_bmm_swiglu, loop_swiglu):
        assert fn(x, counts, *weights).shape == (0, D)


def test_grouped_experts_module_uses_the_fast_path_and_matches_the_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=5, dim=D, hidden=H)
    counts = torch.tensor([4, 0, 2, 7, 1])
    x = torch.randn(int(counts.sum()), D)
    weights = [experts.w_gate, experts.w_up, experts.w_down]
    torch.testing.assert_close(experts.sorted_rows(x, counts), loop_swiglu(x, counts, *weights), atol=1e-5,
                               rtol=1e-5)


def test_autocast_bf16_matches_the_loop_under_autocast():
    x, counts, weights = case(COUNTS["uneven_with_empty_experts"], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = outputs_and_grads(grouped_swiglu, x, counts, weights)
        ref, ref_grads = outputs_and_grads(loop_swiglu, x, counts, weights)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)  # fp32 master weights get fp32 gradients
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-2, rtol=2e-2)


def test_benchmark_quick_run_writes_table_and_json(tmp_path):
    from benchmarks.moe import main

    # asserts parity with transformers before timing; "--allocator default": leave this test process's malloc alone
    result = main(["--quick", "--allocator", "default", "--out", str(tmp_path / "moe")])
    saved = json.loads((tmp_path / "moe.json").read_text())
    assert saved["machine"]["host_allocator"] == "glibc default"
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    impls = {(r["model"], r["impl"]) for r in saved["rows"]}
    for model in ("mixtral", "qwen2_moe"):
        assert {(model, i) for i in ("mmr1", "mmr1 (+ balance losses)", "eager", "grouped_mm", "batched_mm")} <= impls
        if cpu_grouped_gemm.available(torch.empty(0)):  # the MKL kernel's own share, timed in the same run
            assert (model, "mmr1 (torch._grouped_mm experts)") in impls
    for r in saved["rows"]:
        assert r["fwd_bwd_tok_s"] > 0 and r["fwd_tok_s"] > 0
        if not r["impl"].startswith("mmr1"):
            assert r["ours_over_theirs_fwd_bwd"] > 0
    assert "| mixtral | fp32 | 2 | eager |" in (tmp_path / "moe.md").read_text()
    assert saved["dynamic_activation"]["rows"][0]["mean_experts_per_token"] >= 2


def test_padded_block_backward_equals_autograds_and_its_benchmark_runs(tmp_path):
    """PaddedSwiGLU's hand-written backward gives autograd's gradients of the same forward (fp32: to rounding;
    the benchmark asserts the same before timing), including the routing weights' and the padding rows' zeros."""
    from benchmarks.moe_backward import main, seed_block

    inputs = seed_block(2, torch.float32, dim=32, hidden=16, experts=8, tokens=64)
    grad_out = torch.randn(inputs[0].shape)
    ours = moe_kernels.PaddedSwiGLU.apply(*inputs)
    ref = moe_kernels.weighted_padded_swiglu_reference(*inputs)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)  # fused element-wise kernel: to rounding
    grads = torch.autograd.grad(ours, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for name, a, b in zip(("padded", "w_gate", "w_up", "w_down", "weight"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    padding = inputs[4].detach() == 0  # (E, C, 1): rows that carry no token
    assert padding.any() and grads[0].masked_select(padding).abs().max() == 0  # zero rows with weight 0
    # Frozen experts (staged recipes, LoRA elsewhere): no weight gradients computed, the rest unchanged.
    frozen = (inputs[0], *(w.detach() for w in inputs[1:4]), inputs[4])
    out = moe_kernels.PaddedSwiGLU.apply(*frozen)
    d_padded, d_weight = torch.autograd.grad(out, (frozen[0], frozen[4]), grad_out)
    torch.testing.assert_close(d_padded, grads[0], atol=0, rtol=0)
    torch.testing.assert_close(d_weight, grads[4], atol=0, rtol=0)

    result = main(["--quick", "--allocator", "default", "--out", str(tmp_path / "bwd")])
    saved = json.loads((tmp_path / "bwd.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert {(r["dtype"], r["top_k"]) for r in saved["rows"]} == {("bf16", 2), ("bf16", 4), ("fp32", 2), ("fp32", 4)}
    assert all(r["autograd_ms"] > 0 and r["mmr1_ms"] > 0 for r in saved["rows"])
    assert "| fp32 | 2 |" in (tmp_path / "bwd.md").read_text()

def test_padding_benchmark_skews_the_load_and_reports_the_switch(tmp_path):
    """benchmarks/moe_padding.py: a larger hot share means more padding; both paths agree before they are timed."""
    from benchmarks.moe_padding import assignments, main

    g = torch.Generator().manual_seed(0)
    loads = [torch.bincount(assignments(256, 2, 16, share, g), minlength=16) for share in (0.0, 0.5)]
    assert loads[1][:4].sum() > 0.5 * 512 > loads[0][:4].sum()
    result = main(["--quick", "--out", str(tmp_path / "pad")])
    saved = json.loads((tmp_path / "pad.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and saved["max_padding_waste"] == MAX_PADDING_WASTE
    for r in saved["rows"]:
        assert r["grouped_ms"] > 0 and r["padded_ms"] > 0
        assert r["default_path"] == ("padded" if r["padding_per_row"] <= MAX_PADDING_WASTE else "grouped")
    assert "| 64 | 0.00 |" in (tmp_path / "pad.md").read_text()

def test_gpu_checks_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_checks.py is what a lent GPU runs (benchmarks/gpu_run.sh); the same code must run here."""
    from benchmarks.gpu_checks import main

    result = main(["--device", "cpu", "--quick", "--out", str(tmp_path / "gpu")])
    assert set(result["kernels"]) == {"float32", "bfloat16"}
    assert "token for token" in result["engine"]["packed"] and "token for token" in result["engine"]["padded"]
    assert result["continuous_vs_static"]["throughput_ratio"] > 0
    assert "| engine packed |" in (tmp_path / "gpu.md").read_text()


@pytest.mark.parametrize("path", ["mkl", "grouped", "padded"])
@pytest.mark.parametrize("unused", [False, True])
def test_routed_experts_equal_sort_loop_and_combine_fp32(path, unused):
    """routed_swiglu (dispatch + experts + weighted combine in one; the padded path never materialises the sorted
    rows) equals the readable composition: sort assignments by expert, loop over experts, weight, index_add."""
    skip_unsupported("grouped_mm" if path == "grouped" else path, torch.float32)
    g = torch.Generator().manual_seed(3)
    N, E, k = 13, 6, 2
    flat = torch.randn(N, D, generator=g, requires_grad=True)
    slot_experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).reshape(-1)
    slot_experts[:5] = 2  # a crowded expert; expert 5 may get nothing
    if unused:
        slot_experts[[1, 6, 7]] = E  # skipped assignments (dynamic-k / dropped tokens)
    slot_weights = torch.rand(N * k, generator=g, requires_grad=True)
    weights = [(torch.randn(E, a, b, generator=g) / a ** 0.5).requires_grad_(True) for a, b in ((D, H), (D, H), (H, D))]
    grad_out = torch.randn(N, D, generator=g)

    def reference(flat, slot_weights, *weights):
        keep = slot_experts < E
        order = slot_experts.where(keep, E).argsort(stable=True)[:int(keep.sum())]
        counts = torch.bincount(slot_experts[order], minlength=E)
        rows = loop_swiglu(flat[order // k], counts, *weights) * slot_weights[order, None]
        return rows.new_zeros(N, D).index_add_(0, order // k, rows)

    out = moe_kernels.routed_swiglu(flat, slot_experts, slot_weights, *weights, has_unused=unused, path=path)
    grads = torch.autograd.grad(out, [flat, slot_weights, *weights], grad_out)
    ref = reference(flat, slot_weights, *weights)
    ref_grads = torch.autograd.grad(ref, [flat, slot_weights, *weights], grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "routing weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_routed_experts_pick_grouped_mm_when_padding_would_explode():
    """On the CPU in bf16 a balanced load takes the fused padded path, a skewed one grouped GEMM."""
    x, counts, weights = case([40, 1, 1, 1], torch.float32)
    slot_experts = torch.repeat_interleave(torch.arange(4), counts)
    bf16 = [w.detach().bfloat16() for w in weights]
    skewed, _ = moe_kernels._routed_path(x, counts, torch.bfloat16, *bf16)
    balanced, _ = moe_kernels._routed_path(x, torch.tensor([11, 11, 11, 10]), torch.bfloat16, *bf16)
    assert balanced == "padded"  # bf16 on the CPU: the fused padded path while padding is cheap
    assert skewed == ("grouped" if grouped_mm_available(torch.device("cpu"), torch.bfloat16) else "padded")
    out = moe_kernels.routed_swiglu(x, slot_experts, torch.ones(43), *weights)  # k = 1
    torch.testing.assert_close(out, loop_swiglu(x, counts, *weights), atol=1e-5, rtol=1e-5)


def test_routed_padded_path_under_autocast_gives_fp32_master_weights_close_gradients():
    """The padded routed path (hand-written backward) casts to the autocast dtype itself, as autocast would: the
    output is bf16, fp32 parameters and routing weights get fp32 gradients close to the fp32 reference."""
    g = torch.Generator().manual_seed(5)
    N, E, k = 24, 4, 2
    flat = torch.randn(N, D, generator=g, requires_grad=True)
    slot_experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).reshape(-1)
    slot_weights = torch.rand(N * k, generator=g, requires_grad=True)
    weights = [(torch.randn(E, a, b, generator=g) / a ** 0.5).requires_grad_(True) for a, b in ((D, H), (D, H), (H, D))]
    inputs = [flat, slot_weights, *weights]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe_kernels.routed_swiglu(flat, slot_experts, slot_weights, *weights, path="padded")
    grads = torch.autograd.grad(out.float().sum(), inputs)
    ref = moe_kernels.routed_swiglu(flat, slot_experts, slot_weights, *weights, path="padded")
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    assert out.dtype == torch.bfloat16
    assert all(gr.dtype == torch.float32 for gr in grads)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for name, a, b in zip(("x", "routing weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2, msg=lambda m: f"d{name}: {m}")


def _loop_products(a, b, counts, transpose_b=False):
    rows = [r @ (w.T if transpose_b else w) for r, w in zip(a.split(counts.tolist()), b)]
    return torch.cat(rows)


@pytest.mark.parametrize("layout", list(COUNTS))
def test_mkl_grouped_gemm_equals_per_group_matmuls(layout):
    """cpu_grouped_gemm: plain, transposed-b, accumulating and weight-gradient products, groups without rows
    included, on rows with a stride wider than their width (a slice of a bigger tensor)."""
    skip_unsupported("mkl", torch.float32)
    counts = torch.tensor(COUNTS[layout])
    g = torch.Generator().manual_seed(7)
    M, E, K, N = int(counts.sum()), counts.numel(), 12, 5
    a = torch.randn(M, K + 3, generator=g)[:, 1:K + 1]  # row stride K + 3
    b = torch.randn(E, K, N, generator=g)
    bt = torch.randn(E, N, K, generator=g)
    dy = torch.randn(M, N, generator=g)
    gemm, plan = cpu_grouped_gemm.grouped_gemm, cpu_grouped_gemm.GroupPlan(counts)
    torch.testing.assert_close(gemm(a, b, plan), _loop_products(a, b, counts), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gemm(a, bt, plan, transpose_b=True), _loop_products(a, bt, counts, True),
                               atol=1e-6, rtol=1e-6)
    start = torch.randn(M, N, generator=g)
    torch.testing.assert_close(gemm(a, b, plan, out=start.clone()), start + _loop_products(a, b, counts),
                               atol=1e-6, rtol=1e-6)
    ref = torch.stack([r.T @ d for r, d in zip(a.split(counts.tolist()), dy.split(counts.tolist()))])
    for row_block in (128, 5, 1):  # whole products; blocks of 5, 5, 2 output rows; one row each
        dw = cpu_grouped_gemm.grouped_weight_gemm(a, dy, plan, row_block=row_block)
        torch.testing.assert_close(dw, ref, atol=1e-6, rtol=1e-6)
        assert (dw[counts == 0] == 0).all()  # written, not left uninitialised


def test_mkl_grouped_gemm_refuses_what_it_cannot_run():
    assert not cpu_grouped_gemm.available(torch.empty(4, 4, dtype=torch.bfloat16))
    assert not cpu_grouped_gemm.available(torch.empty(4, 4).T)  # columns not contiguous
    assert not cpu_grouped_gemm.available(torch.empty(1, 4).expand(3, 4))  # rows overlap (stride 0)
    assert cpu_grouped_gemm.available(torch.empty(4, 6)[:, :4], torch.empty(2, 4, 4))

    class Wrapped(torch.Tensor):  # a tensor subclass (a sharded DTensor is one): its data pointer may not be it all
        pass

    assert not cpu_grouped_gemm.available(torch.empty(4, 4).as_subclass(Wrapped))
    assert moe_kernels.kernel_choice(torch.device("cpu"), torch.float32, torch.tensor([2, 2]), 4,
                                     torch.empty(4, 4).T)[0] != "mkl"


def test_grouped_swiglu_block_equals_autograd_of_the_same_ops_and_skips_frozen_gradients():
    """GroupedSwiGLU's hand-written backward (routing weight inside) equals autograd through the loop reference,
    for every input; frozen expert weights get no gradient and the rest stay the same."""
    skip_unsupported("mkl", torch.float32)
    x, counts, weights = case(COUNTS["uneven_with_empty_experts"], torch.float32, seed=4)
    routing = torch.rand(x.shape[0], 1, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad_out = torch.randn(x.shape[0], D, generator=torch.Generator().manual_seed(3))
    out = moe_kernels.GroupedSwiGLU.apply(x, counts, *weights, routing)
    grads = torch.autograd.grad(out, [x, *weights, routing], grad_out)
    w_gate, w_up, w_down = weights

    def reference(x, w_gate, w_up, w_down, routing):
        rows = [torch.nn.functional.silu(r @ wg) * (r @ wu) * s @ wd for r, s, wg, wu, wd in
                zip(x.split(counts.tolist()), routing.split(counts.tolist()), w_gate, w_up, w_down)]
        return torch.cat(rows)

    ref = reference(x, *weights, routing)
    ref_grads = torch.autograd.grad(ref, [x, *weights, routing], grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down", "routing"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    frozen = [w.detach() for w in weights]
    out = moe_kernels.GroupedSwiGLU.apply(x, counts, *frozen, routing)
    d_x, d_routing = torch.autograd.grad(out, [x, routing], grad_out)
    torch.testing.assert_close(d_x, ref_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d_routing, ref_grads[4], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the inference branch: same products, intermediates freed as they go
        torch.testing.assert_close(moe_kernels._mkl_swiglu(x, counts, routing, *weights), ref, atol=1e-5, rtol=1e-5)


def test_fp32_cpu_layers_take_the_mkl_kernel_for_many_experts_with_dozens_of_rows():
    skip_unsupported("mkl", torch.float32)
    _, _, weights = case([1] * 16, torch.float32)
    many = torch.full((16,), moe_kernels.MKL_MIN_ROWS_PER_EXPERT)
    x = torch.randn(int(many.sum()), D)
    assert moe_kernels._routed_path(x, many, torch.float32, *weights)[0] == "mkl"
    few_rows = torch.full((16,), 4)  # a decode step's handful of rows per expert
    assert moe_kernels._routed_path(x[:64], few_rows, torch.float32, *weights)[0] == "grouped"
    x8, c8, w8 = case([64] * 8, torch.float32)  # few experts: torch._grouped_mm splits each GEMM well
    assert moe_kernels._routed_path(x8, c8, torch.float32, *w8)[0] == "grouped"
    assert moe_kernels.cpu_path(torch.float32).startswith("mkl")


@pytest.mark.parametrize("kernel", ["mkl", "grouped"])
def test_a_compiled_fp32_moe_layer_equals_the_eager_one(kernel):
    """torch.compile of a model with fp32 experts on the CPU: MKL's host-side part (numpy plans, ctypes) and
    torch._grouped_mm in fp32 (its traced shape function takes only 16-bit inputs) run eagerly behind a graph
    break instead of failing inside dynamo, and outputs and gradients match the eager layer."""
    skip_unsupported(kernel, torch.float32)
    from mmr1.config import MoEConfig
    from mmr1.moe import MoEFeedForward

    torch.manual_seed(0)
    layer = MoEFeedForward(32, MoEConfig(num_experts=16, num_groups=1, topk_groups=1, top_k=2, expert_hidden=16))
    layer.experts.kernel = kernel
    x = torch.randn(1, 512, 32, requires_grad=True)
    results = []
    for run in (layer, torch.compile(layer)):
        for p in [x, *layer.parameters()]:
            p.grad = None
        out, _ = run(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in layer.parameters())])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
