"""The fused SwiGLU element-wise kernels (mmr1.moe_elementwise): the compiled kernels equal autograd through the
plain ops, and a machine where torch.compile cannot build them falls back to the same formulas with a warning."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmr1 import moe_elementwise


def _inputs(rows=37, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(rows, width, generator=g) * 3, torch.randn(rows, width, generator=g)
    weight = torch.rand(rows, 1, generator=g)
    return gate, up, weight, torch.randn(rows, width, generator=g)


def _autograd_reference(gate, up, weight, d_hidden):
    leaves = [t.clone().requires_grad_(True) for t in (gate, up, weight)]
    hidden = F.silu(leaves[0]) * leaves[1] * leaves[2]
    hidden.backward(d_hidden)
    return hidden.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("rows", [37, 1, 0])
def test_fused_kernels_equal_autograd_of_the_plain_ops(rows):
    gate, up, weight, d_hidden = _inputs(rows)
    hidden, (d_gate, d_up, d_weight) = _autograd_reference(gate, up, weight, d_hidden)
    fused = moe_elementwise._Fused(moe_elementwise.swiglu_forward)
    torch.testing.assert_close(fused(gate, up, weight), hidden, atol=1e-6, rtol=1e-6)
    grads = moe_elementwise._Fused(moe_elementwise.swiglu_backward)(d_hidden, gate, up, weight)
    for got, want in zip(grads, (d_gate, d_up, d_weight)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not fused.failed


def test_a_failed_build_warns_once_and_runs_the_plain_ops(monkeypatch):
    def cannot_build(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", cannot_build)
    fused = moe_elementwise._Fused(moe_elementwise.swiglu_forward)
    gate, up, weight, _ = _inputs()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        out = fused(gate, up, weight)
    torch.testing.assert_close(out, moe_elementwise.swiglu_forward(gate, up, weight))
    assert fused.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        torch.testing.assert_close(fused(gate, up, weight), out)
