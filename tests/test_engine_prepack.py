"""EngineConfig.cpu_prepacked_weights (mmr1/engine/prepack.py): the engine's outputs with oneDNN-packed linear
weights equal those without, stale packs are never used, and what cannot be packed is refused or left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmr1.engine import Engine, EngineConfig, SamplingParams, cpu_linear
from mmr1.engine.prepack import PrepackedLinears, available
from test_cpu_linear import check_bf16_experts_take_rows_times
from test_generation import tiny_model

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN linear packing")


def test_packed_linear_equals_f_linear_and_repacks_a_changed_weight():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40).bfloat16()
    x = torch.randn(1, 7, 48).bfloat16()
    mode = PrepackedLinears(layer)
    assert len(mode) == 1
    with torch.no_grad():
        with mode:
            packed = layer(x)
        torch.testing.assert_close(packed, F.linear(x, layer.weight, layer.bias), atol=1e-2, rtol=1e-2)
        layer.weight.mul_(-1.0)  # in place: the packed copy is stale now
        with mode:
            again = layer(x)
    torch.testing.assert_close(again, F.linear(x, layer.weight, layer.bias), atol=1e-2, rtol=1e-2)
    assert not torch.allclose(again.float(), packed.float())
    assert mode.packed_calls == 2
    # with gradients on, the plain op runs (the packed one has no backward)
    with mode:
        out = layer(x.requires_grad_(True))
    out.float().sum().backward()
    assert layer.weight.grad is not None and mode.packed_calls == 2


@pytest.mark.skipif(not cpu_linear.available(torch.bfloat16), reason="no AVX512_BF16 here: no bf16 few-row loop")
def test_few_rows_take_the_loop_and_more_rows_the_packed_weight():
    """`few_rows`: products of up to ROW_LIMITS[bf16] = 4 rows run on cpu_linear's loop, larger ones packed; both
    within bf16 rounding of F.linear. The engine passes its cpu_few_row_linears (default on): a batch-1 decode step
    takes the loop, a long prompt's prefill the packed weights."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 40).bfloat16()
    mode = PrepackedLinears(layer, few_rows=True)
    with torch.no_grad(), mode:
        for rows in (1, 4, 5, 12):
            x = torch.randn(rows, 64).bfloat16()
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=2e-2, rtol=2e-2)
    assert (mode.loop_calls, mode.packed_calls) == (2, 2)
    model = tiny_model().bfloat16()
    engine = Engine(model, config=EngineConfig(max_batch=1, cpu_prepacked_weights=True))
    engine.generate([list(range(3, 23))], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert engine._weights.loop_calls > 0 and engine._weights.packed_calls > 0
    off = Engine(model, config=EngineConfig(max_batch=1, cpu_prepacked_weights=True, cpu_few_row_linears=False))
    off.generate([list(range(3, 23))], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert off._weights.loop_calls == 0 and off._weights.packed_calls > 0


@pytest.mark.skipif(not cpu_linear.available(), reason="no AVX-512 loop here: experts keep torch's products")
def test_packed_weights_with_few_rows_send_bf16_experts_to_rows_times(monkeypatch):
    """With `few_rows` the packed weights also mark bf16 stacked experts (not nn.Linear layers) for the batch-1
    path's one-token MoE, as FewRowLinears does."""
    check_bf16_experts_take_rows_times(monkeypatch, cpu_prepacked_weights=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_outputs_equal_with_prepacked_weights(dtype):
    """A mixed batch (MoE model, prompts of several lengths, greedy): the same tokens with and without the flag; bf16
    linears run packed, fp32 ones stay on the plain op (PACKED_DTYPES)."""
    model = tiny_model().to(dtype)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 11, 6, 20)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    outs = {}
    for packed in (False, True):
        engine = Engine(model, config=EngineConfig(max_batch=4, cpu_prepacked_weights=packed))
        outs[packed] = [o.token_ids for o in engine.generate(prompts, params)]
    linears = [m for m in model.backbone.modules() if type(m) is torch.nn.Linear] if hasattr(model, "backbone") \
        else [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert all("forward" not in m.__dict__ for m in linears)  # outside a step the model is the user's
    if dtype == torch.float32:
        assert len(engine._weights) == 0 and outs[True] == outs[False]
    else:  # another bf16 kernel may round differently: a near-tie can flip, most tokens agree
        assert len(engine._weights) == len(linears) > 0 and engine._weights.packed_calls > 0
        agree = sum(a == b for x, y in zip(outs[True], outs[False]) for a, b in zip(x, y))
        assert agree >= 0.9 * sum(len(x) for x in outs[False])


def test_prepacked_weights_refuse_compile_decode():
    with pytest.raises(ValueError, match="cpu_prepacked_weights and compile_decode"):
        EngineConfig(cpu_prepacked_weights=True, compile_decode=True)
