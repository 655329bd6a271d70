"""The CPU few-row linear loop (mmr1/engine/cpu_linear.py) against float64 products and F.linear, as an operator
inside torch.compile, and the engine with it against the engine without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmr1.backbone import R1Model
from mmr1.config import R1Config
from mmr1.engine import Engine, EngineConfig, SamplingParams, cpu_linear

needs_loop = pytest.mark.skipif(not cpu_linear.available(),
                                reason="no AVX-512, C compiler or GNU OpenMP here: the engine keeps torch's products")


@needs_loop
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 9, 33])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (3, 15), (4, 16), (17, 17), (64, 100), (130, 48)])
def test_loop_equals_float64_product(threads, rows, out_features, in_features):
    """Any row count (passes of 4 rows and a remainder), weights whose row count is not a multiple of 4 (single
    rows at the end), input widths with and without a tail shorter than 16, with and without bias; 1 and 2 threads.
    fp32 sums in another order than MKL's: within 1e-5 of the float64 product, as F.linear is."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x, w, b = (torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g),
               torch.randn(out_features, generator=g))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            got = cpu_linear.linear_rows(x, w, bias)
            exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            scale = 1 + exact.abs()
            assert got.shape == (rows, out_features) and got.dtype == torch.float32
            if rows:
                assert ((got.double() - exact).abs() / scale).max().item() <= 1e-5
            assert torch.allclose(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(saved)


@needs_loop
def test_loop_takes_batched_and_strided_inputs():
    """x (..., in) of any rank, rows not contiguous (a column slice), weight rows strided (a slice of a wider
    matrix): the result is F.linear's, shaped (..., out), and the inputs are left alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=g)[..., :32]  # (2, 3, 32), rows 40 apart
    wide = torch.randn(24, 48, generator=g)
    w = wide[:, 8:40]  # (24, 32), rows 48 apart, each row contiguous
    before = x.clone(), wide.clone()
    got = cpu_linear.linear_rows(x, w)
    assert got.shape == (2, 3, 24)
    assert torch.allclose(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before[0]) and torch.equal(wide, before[1])


@needs_loop
def test_bad_arguments_are_refused():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with pytest.raises(TypeError, match="one dtype, fp32 or bf16; got x torch.bfloat16 on cpu, weight torch.float32"):
        cpu_linear.linear_rows(x.bfloat16(), w)
    with pytest.raises(TypeError, match="fp32 or bf16"):
        cpu_linear.linear_rows(x.half(), w.half())
    with pytest.raises(ValueError, match=r"x \(\.\.\., 16\)"):
        cpu_linear.linear_rows(torch.randn(2, 15), w)
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_linear.linear_rows(torch.randn(2, 8), w.t())  # (16, 8) with stride (1, 16)
    with pytest.raises(ValueError, match="bias"):
        cpu_linear.linear_rows(x, w, torch.randn(7))


@needs_loop
def test_operator_runs_inside_a_compiled_graph():
    """torch.ops.mmr1.linear_rows traces (its fake gives the shape) and the compiled graph calls the loop."""
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)

    def block(x):
        return torch.ops.mmr1.linear_rows(torch.relu(torch.ops.mmr1.linear_rows(x, w1, None)), w2, None) + x

    x = torch.randn(1, 32, generator=g)
    compiled = torch.compile(block, fullgraph=True)
    assert torch.allclose(compiled(x), F.linear(torch.relu(F.linear(x, w1)), w2) + x, rtol=1e-5, atol=1e-5)


needs_bf16_loop = pytest.mark.skipif(not cpu_linear.available(torch.bfloat16),
                                     reason="no AVX512_BF16 here: bf16 linears keep torch's products")
BF16_STEP = 2.0 ** -8  # the spacing of bf16 numbers relative to their size (8 significant bits)


def bf16_problem(rows: int, out_features: int, in_features: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(t.bfloat16() for t in (torch.randn(rows, in_features, generator=g),
                                        torch.randn(out_features, in_features, generator=g),
                                        torch.randn(out_features, generator=g)))


@needs_bf16_loop
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (3, 31), (4, 32), (17, 33), (64, 100), (130, 48)])
def test_bf16_loop_rounds_the_exact_product_once(threads, rows, out_features, in_features):
    """bf16 weights and rows (input widths with and without a tail shorter than 32, the vdpbf16ps width): each
    result is the exact product of the bf16 inputs (float64), summed in fp32 and rounded to bf16 once -- within
    one bf16 step of the exact value, as torch's bf16 F.linear is."""
    x, w, b = bf16_problem(rows, out_features, in_features, rows * 1000 + out_features + in_features)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            got = cpu_linear.linear_rows(x, w, bias)
            assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
            exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            sums = F.linear(x.double().abs(), w.double().abs())  # bounds the fp32 summation error
            for result in (got, F.linear(x, w, bias)):
                err = (result.double() - exact).abs()
                assert (err <= BF16_STEP * exact.abs() + 1e-6 * sums + 1e-30).all()
    finally:
        torch.set_num_threads(saved)


@needs_bf16_loop
def test_bf16_operator_runs_inside_a_compiled_graph():
    x, w, b = bf16_problem(2, 24, 40, 3)
    compiled = torch.compile(lambda x: torch.ops.mmr1.linear_rows(x, w, b) * 2, fullgraph=True)
    got = compiled(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, cpu_linear.linear_rows(x, w, b) * 2)


@needs_bf16_loop
def test_few_row_linears_route_bf16_products_of_up_to_four_rows(monkeypatch):
    """bf16 layers take the loop for 1 to ROW_LIMITS[bf16] = 4 rows, also a single row of a cached weight of
    CACHED_MIN_BYTES or more (the bf16 loop beats oneDNN's product from the cache too); 5 rows go to F.linear."""
    big = nn.Linear(512, 256).bfloat16()  # 256 KiB of bf16 weight, the model fits in any cache
    calls = []
    real = cpu_linear.linear_rows
    monkeypatch.setattr(cpu_linear, "linear_rows", lambda *args: calls.append(args[0].shape) or real(*args))
    few = cpu_linear.FewRowLinears(big)
    assert not few.streams and len(few) == 1 and cpu_linear.ROW_LIMITS[torch.bfloat16] == 4
    x = torch.randn(5, 512).bfloat16()
    with few, torch.no_grad():
        for rows in (1, 4, 5):
            out = big(x[:rows])
            assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), F.linear(x[:rows], big.weight,
                                                                                        big.bias).float(),
                                                                  rtol=2 * BF16_STEP, atol=1e-2)
    assert calls == [(1, 512), (4, 512)]


@needs_loop
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [0, 1, 2, 4, 5, 9])
@pytest.mark.parametrize("in_features,out_features", [(1, 1), (7, 130), (33, 47), (100, 16), (64, 64)])
def test_rows_times_rounds_the_exact_product_once(threads, rows, in_features, out_features):
    """x @ w for bf16 weights stored (in, out) (a stacked expert's w[e]): output widths with and without a tail
    shorter than 16 (and split between 2 threads), within one bf16 step of the float64 product of the bf16 inputs."""
    x, w, _ = bf16_problem(rows, out_features, in_features, rows * 1000 + out_features + in_features)
    w = w.t().contiguous()  # (in, out)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_linear.rows_times(x, w)
    finally:
        torch.set_num_threads(saved)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    exact, sums = x.double() @ w.double(), x.double().abs() @ w.double().abs()
    assert ((got.double() - exact).abs() <= BF16_STEP * exact.abs() + 1e-6 * sums + 1e-30).all()


@needs_loop
def test_rows_times_refuses_what_it_does_not_compute():
    x, w = torch.randn(2, 16).bfloat16(), torch.randn(16, 8).bfloat16()
    with pytest.raises(TypeError, match="bf16 CPU tensors; got x torch.float32"):
        cpu_linear.rows_times(x.float(), w)
    with pytest.raises(ValueError, match=r"contiguous rows; got x \(2, 16\), weight \(16, 8\) with strides \(1, 16\)"):
        cpu_linear.rows_times(x, torch.randn(8, 16).bfloat16().t())


@needs_loop
def test_few_row_linears_route_only_small_inference_products(monkeypatch):
    """Weights read from memory (parameters over the last-level cache): <= MAX_ROWS rows without grad go to the
    loop, more rows and grad-enabled calls to F.linear (the result then has a grad_fn); on exit the layers have no
    instance forward left."""
    monkeypatch.setattr(cpu_linear, "last_level_cache_bytes", lambda: 0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8, bias=False))
    calls = []
    real = cpu_linear.linear_rows
    monkeypatch.setattr(cpu_linear, "linear_rows", lambda *args: calls.append(args[0].shape) or real(*args))
    few = cpu_linear.FewRowLinears(model)
    assert few.streams and len(few) == 2
    small, large = torch.randn(cpu_linear.MAX_ROWS, 16), torch.randn(cpu_linear.MAX_ROWS + 1, 16)
    with torch.no_grad():
        expected = model(small)
    with few:
        with torch.no_grad():
            assert torch.allclose(model(small), expected, rtol=1e-5, atol=1e-5)
            assert len(calls) == 2
            model(small[:1])
            assert len(calls) == 4
            model(large)
            assert len(calls) == 4
        assert model(small).grad_fn is not None and len(calls) == 4
    assert all("forward" not in layer.__dict__ for layer in model)


@needs_loop
def test_cached_weights_take_the_loop_only_for_several_rows_of_large_weights(monkeypatch):
    """Parameters that fit in the last-level cache: a weight of CACHED_MIN_BYTES or more takes the loop for 2 to
    MAX_ROWS rows and torch for one row; a smaller weight is not routed at all."""
    big, small = nn.Linear(256, 256), nn.Linear(64, 64)  # 256 KiB and 16 KiB of fp32 weight
    model = nn.Sequential(big, small)
    calls = []
    real = cpu_linear.linear_rows
    monkeypatch.setattr(cpu_linear, "linear_rows", lambda *args: calls.append(args[1].shape) or real(*args))
    few = cpu_linear.FewRowLinears(model)
    assert not few.streams and len(few) == 1
    with few, torch.no_grad():
        big(torch.randn(1, 256))
        small(torch.randn(4, 64))
        assert calls == []
        out = big(torch.randn(2, 3, 256))  # 6 rows
        assert calls == [(256, 256)] and out.shape == (2, 3, 256)


def tiny_model(seed: int = 0) -> R1Model:
    torch.manual_seed(seed)
    return R1Model(R1Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176,
                            max_seq_len=128)).eval()


@needs_loop
def test_engine_installs_the_loop_only_where_it_routes_something(monkeypatch):
    """The tiny model fits in the cache and has no weight of CACHED_MIN_BYTES: the engine keeps torch's products.
    Over the cache (made small here) every fp32 linear is routed."""
    model = tiny_model()
    few = cpu_linear.FewRowLinears(model)
    assert few.model_bytes == sum(p.numel() * 4 for p in model.parameters()) and len(few) == 0
    assert not isinstance(Engine(model)._weights, cpu_linear.FewRowLinears)
    monkeypatch.setattr(cpu_linear, "last_level_cache_bytes", lambda: few.model_bytes - 1)
    engine = Engine(model)
    assert isinstance(engine._weights, cpu_linear.FewRowLinears) and engine._weights.streams
    assert len(engine._weights) == sum(type(m) is nn.Linear for m in model.modules())


@needs_loop
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_loop)])
@pytest.mark.parametrize("compile_decode", [False, True])
def test_engine_outputs_unchanged_by_the_loop(compile_decode, dtype, monkeypatch):
    """Greedy outputs with cpu_few_row_linears on and off: batch 1 (the solo path, eager or compiled) and a few
    requests batched together (packed steps of a few rows). (The tiny model fits in any cache: the test lets the
    engine use the loop anyway.) bf16: the loop's results are rounded from fp32 sums taken in another order than
    oneDNN's, so a near-tie between two logits could flip; this model has none on these prompts."""
    monkeypatch.setattr(cpu_linear, "last_level_cache_bytes", lambda: 0)
    model = tiny_model().to(dtype)
    prompts = [[5, 9, 17, 3], [100, 2], [7] * 9, [200, 201, 202]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outs = {}
    for on in (True, False):
        cfg = EngineConfig(max_batch=4, block_size=4, cpu_few_row_linears=on, compile_decode=compile_decode)
        engine = Engine(model, config=cfg)
        assert isinstance(engine._weights, cpu_linear.FewRowLinears) == on
        solo = [engine.generate([p], params)[0].token_ids for p in prompts]
        outs[on] = solo, [o.token_ids for o in engine.generate(prompts, params)]
    assert outs[True] == outs[False]
    assert all("forward" not in m.__dict__ for m in model.modules())  # nothing left on the user's model


def check_bf16_experts_take_rows_times(monkeypatch, **engine_config) -> None:
    """A bf16 MoE model whose weights stream from memory (the cache made small here), decoded at batch 1 with
    cpu_few_row_linears off and on (and `engine_config`): on, its stacked experts are marked for
    cpu_linear.rows_times during the steps and the gate/up and down products go through it; the greedy tokens are
    the same; the mark is gone after the steps."""
    from test_generation import tiny_model as tiny_moe_model

    monkeypatch.setattr(cpu_linear, "last_level_cache_bytes", lambda: 0)
    calls = []
    real = cpu_linear.rows_times
    monkeypatch.setattr(cpu_linear, "rows_times", lambda x, w: calls.append(tuple(w.shape)) or real(x, w))
    model = tiny_moe_model().bfloat16()
    experts = [m for m in model.modules() if type(m).__name__ == "GroupedExperts"]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    outs = {}
    for on in (False, True):
        engine = Engine(model, config=EngineConfig(max_batch=1, cpu_few_row_linears=on, **engine_config))
        outs[on] = engine.generate([[5, 9, 17, 3]], params)[0].token_ids
        assert len(getattr(engine._weights, "_experts", [])) == (len(experts) if on else 0)
    assert outs[True] == outs[False] and experts
    dim, hidden = experts[0].w_gate.shape[1:]
    assert {(dim, hidden), (hidden, dim)} == set(calls)  # gate/up and down products, every decode step
    assert all("few_row_matmul" not in m.__dict__ for m in experts)


@needs_loop
@pytest.mark.parametrize("compile_decode", [False, True])
def test_bf16_experts_take_rows_times_in_the_batch_1_fast_path(compile_decode, monkeypatch):
    """The one-token MoE of the batch-1 path multiplies bf16 experts through rows_times (compiled: through its
    operator) while FewRowLinears marks them."""
    check_bf16_experts_take_rows_times(monkeypatch, compile_decode=compile_decode)


def test_engine_keeps_torch_products_where_the_loop_is_missing(monkeypatch):
    """A CPU without AVX-512 (or without a compiler): the engine runs torch's products, and asking for the
    context directly is a clear error."""
    monkeypatch.setattr(cpu_linear, "available", lambda dtype=torch.float32: False)
    model = tiny_model()
    engine = Engine(model, config=EngineConfig(max_batch=2, block_size=4))
    assert not isinstance(engine._weights, cpu_linear.FewRowLinears)
    assert len(engine.generate([[5, 9, 17]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids) == 3
    with pytest.raises(RuntimeError, match="AVX-512"):
        cpu_linear.FewRowLinears(model)
