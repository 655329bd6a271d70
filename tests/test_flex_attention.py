"""The FlexAttention path of sliding-window attention (CUDA's default) against dense masked references, run here
on CPU in eager mode (exact; it materialises the scores) by forcing it on (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from mmr1 import local_attention
from mmr1.local_attention import marked_tokens, sliding_window_attention
from tests.test_long_context import (SCHEDULES, TOL, batch, global_token_case, long_model, naive_attention,
                                     padding_mask, reference_mask)


@pytest.fixture
def flex_on(monkeypatch):
    """Force the FlexAttention path; count its calls. torch refuses FlexAttention backward on CPU (its fused
    backward is GPU-only), so lift that guard: eager FlexAttention then differentiates its own dense reference
    implementation with our block mask, which is what these tests check."""
    monkeypatch.setattr(local_attention, "FLEX_ATTENTION", "on")
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args: None)
    monkeypatch.setattr(local_attention, "_BLOCK_MASKS", {})
    calls = []
    flex = local_attention.flex_sliding_attention
    monkeypatch.setattr(local_attention, "flex_sliding_attention", lambda *a: calls.append(a) or flex(*a))
    return calls


def check_forward_backward(out, ref, inputs):
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("B,H,Hkv,L,S,window", [
    (2, 4, 2, 37, 37, 5),  # L not a multiple of any block size
    (2, 4, 2, 37, 50, 9),  # cached keys before the queries
    (1, 2, 1, 1, 20, 7),  # one decode step
    (2, 8, 2, 45, 61, 19),  # G = 4
    (2, 4, 4, 33, 33, 100),  # window > L: plain causal
    (2, 2, 1, 150, 170, 40),  # longer than FlexAttention's 128 block: whole blocks skipped, partial last blocks
])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_matches_dense(B, H, Hkv, L, S, window, padded, flex_on):
    torch.manual_seed(0)
    q = torch.randn(B, H, L, 16, requires_grad=True)
    k = torch.randn(B, Hkv, S, 16, requires_grad=True)
    v = torch.randn(B, Hkv, S, 16, requires_grad=True)
    key_mask = padding_mask(B, S) if padded else None
    out = sliding_window_attention(q, k, v, window, key_mask)
    assert len(flex_on) == 1
    ref = naive_attention(q, k, v, reference_mask(key_mask if padded else torch.ones(B, S, dtype=torch.bool), L,
                                                  window))
    check_forward_backward(out, ref, (q, k, v))


def test_flex_global_tokens(flex_on):
    """Designated global tokens: T extra key columns the mask_mod opens by slot."""
    q, k, v, key_mask, marked, window, allowed = global_token_case()
    out = sliding_window_attention(q, k, v, window, key_mask, extra=marked_tokens(k, v, marked))
    assert len(flex_on) == 1
    check_forward_backward(out, naive_attention(q, k, v, allowed), (q, k, v))


def test_block_masks_are_reused(flex_on):
    """Unpadded: one block mask per shape; padded: reused while the same key mask comes back unchanged."""
    q, k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    sliding_window_attention(q, k, v, 4)
    first = local_attention._BLOCK_MASKS[(20, 20, 4, "cpu")]
    sliding_window_attention(q, k, v, 4)
    assert local_attention._BLOCK_MASKS[(20, 20, 4, "cpu")] is first and len(local_attention._BLOCK_MASKS) == 1
    key_mask = padding_mask(1, 20)
    sliding_window_attention(q, k, v, 4, key_mask)
    padded = local_attention._BLOCK_MASKS["padded"][2]
    sliding_window_attention(q, k, v, 4, key_mask)
    assert local_attention._BLOCK_MASKS["padded"][2] is padded
    key_mask[0, 5] = ~key_mask[0, 5]  # changed in place: rebuilt
    sliding_window_attention(q, k, v, 4, key_mask)
    assert local_attention._BLOCK_MASKS["padded"][2] is not padded


def test_default_stays_off_on_cpu_and_dropout_keeps_the_blocked_kernel(monkeypatch):
    q = torch.randn(1, 2, 20, 8)
    assert local_attention.FLEX_ATTENTION == "auto"  # unless MMR1_FLEX_ATTENTION is set
    assert not local_attention._flex_wanted(q, 0.0, decode=False)
    monkeypatch.setattr(local_attention, "FLEX_ATTENTION", "on")
    assert local_attention._flex_wanted(q, 0.0, decode=True)
    assert not local_attention._flex_wanted(q, 0.1, decode=False)
    monkeypatch.setattr(local_attention, "FLEX_ATTENTION", "yes")
    with pytest.raises(ValueError, match="MMR1_FLEX_ATTENTION"):
        local_attention._flex_wanted(q, 0.0, decode=False)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_model_with_flex_equals_default_path(schedule, flex_on, monkeypatch):
    """The whole model, same weights: forced FlexAttention vs the default (blocked/dense) kernel, forward and
    parameter gradients, left-padded batch of different lengths."""
    model = long_model(schedule)
    ids, mask = batch([19, 11, 4])
    weights = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(5))

    def logits_and_grads():
        logits = model(ids, attention_mask=mask).logits
        loss = (logits * weights * mask[..., None]).sum() / mask.sum()
        return logits, torch.autograd.grad(loss, list(model.parameters()))

    out, grads = logits_and_grads()
    assert flex_on  # the sliding/hybrid layers went through FlexAttention
    monkeypatch.setattr(local_attention, "FLEX_ATTENTION", "off")
    monkeypatch.setattr(local_attention, "DENSE_MAX_SCORES", 0)  # the blocked kernel, not its dense shortcut
    ref, ref_grads = logits_and_grads()
    torch.testing.assert_close(out[mask], ref[mask], **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)
