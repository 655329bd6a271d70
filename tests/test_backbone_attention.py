"""RoPE and grouped-query self-attention against naive references."""
from __future__ import annotations

import math

import torch

from mmr1.attention import RotaryEmbedding, SelfAttention, apply_rotary, attention_mask_for
from mmr1.kv_cache import KVCache


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Complex-number RoPE: pair (x_i, x_{i+D/2}) is one complex number, rotated by position * theta^(-2i/D)."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    angles = positions.double()[:, None, :, None] * freqs  # (B, 1, L, D/2)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1).float()


def naive_attention(attn: SelfAttention, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                    theta: float) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + causal/padding mask) V with KV heads repeated per query group, then wo."""
    B, L, _ = x.shape
    H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.wq.weight.T).view(B, L, H, Dh).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(B, L, Hkv, Dh).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(B, L, Hkv, Dh).transpose(1, 2)
    q, k = rope_reference(q, positions, theta), rope_reference(k, positions, theta)
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, L, Dh)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)  # (B, H, L, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal[None, None] & key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(dim=-1) @ v  # (B, H, L, Dh)
    return out.transpose(1, 2).reshape(B, L, H * Dh) @ attn.wo.weight.T


def padded_batch(B=3, L=7, dim=32):
    x = torch.randn(B, L, dim)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, 5:] = False  # right padding
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return x, mask, positions


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64, theta=500.0)
    x = torch.randn(2, 3, 5, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 20, 21, 40, 63]])
    cos, sin = rope(positions)
    torch.testing.assert_close(apply_rotary(x, cos, sin), rope_reference(x, positions, 500.0), atol=1e-5, rtol=1e-5)


def test_rope_preserves_norms_and_depends_on_relative_position_only():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=32, max_seq_len=128)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def rotated(x, pos):
        cos, sin = rope(torch.tensor([[pos]]))
        return apply_rotary(x, cos, sin)

    for pos in (0, 1, 17, 127):
        torch.testing.assert_close(rotated(q, pos).norm(), q.norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated(q, 0), q, atol=0, rtol=0)  # position 0 is the identity
    dot = lambda m, n: (rotated(q, m) * rotated(k, n)).sum()  # noqa: E731
    for m, n, shift in ((5, 2, 10), (3, 9, 50), (40, 40, 7)):
        torch.testing.assert_close(dot(m, n), dot(m + shift, n + shift), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_rope_tables_stay_fp32_after_half_precision_cast():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=600).to(torch.bfloat16)
    reference = RotaryEmbedding(head_dim=8, max_seq_len=600)
    cos, sin = rope(torch.tensor([[599]]))
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, reference(torch.tensor([[599]]))[0], atol=0, rtol=0)


def test_gqa_attention_equals_naive_reference_with_padding():
    torch.manual_seed(0)
    attn = SelfAttention(dim=32, n_heads=4, n_kv_heads=2)
    rope = RotaryEmbedding(8, 64, theta=10000.0)
    x, mask, positions = padded_batch()
    cos, sin = rope(positions)
    out = attn(x, cos, sin, attention_mask_for(mask, x.shape[1]))
    expected = naive_attention(attn, x, positions, mask, 10000.0)
    # Padding queries are free to attend anywhere (the naive reference gives them NaN): compare real rows.
    torch.testing.assert_close(out[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_plain_causal_path_equals_naive_reference():
    torch.manual_seed(1)
    attn = SelfAttention(dim=32, n_heads=8, n_kv_heads=1)  # multi-query attention
    x = torch.randn(2, 6, 32)
    positions = torch.arange(6).expand(2, 6)
    cos, sin = RotaryEmbedding(4, 16)(positions)
    expected = naive_attention(attn, x, positions, torch.ones(2, 6, dtype=torch.bool), 10000.0)
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_attention_mask_is_causal_with_padding_and_self():
    key_mask = torch.tensor([[False, False, True, True, True]])
    mask = attention_mask_for(key_mask, query_len=2)[0, 0]  # the last two of five positions
    assert mask.tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    full = attention_mask_for(key_mask, query_len=5)[0, 0]
    assert full[0].tolist() == [True, False, False, False, False]  # padding query sees only itself


def test_cached_attention_equals_full_attention():
    torch.manual_seed(2)
    attn = SelfAttention(dim=32, n_heads=4, n_kv_heads=2, layer_idx=1)
    rope = RotaryEmbedding(8, 64)
    x, mask, positions = padded_batch(L=6)
    mask[2] = True  # decoding appends to the right: only left padding
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = rope(positions)
    full = attn(x, cos, sin, attention_mask_for(mask, 6))

    cache = KVCache(n_layers=2, batch_size=3, max_len=8, n_kv_heads=2, head_dim=8)
    outs = []
    for chunk in (slice(0, 4), slice(4, 5), slice(5, 6)):  # a prefill, then one token at a time
        key_mask = cache.append_mask(mask[:, chunk])
        outs.append(attn(x[:, chunk], cos[:, :, chunk], sin[:, :, chunk],
                         attention_mask_for(key_mask, chunk.stop - chunk.start), cache))
        cache.advance(chunk.stop - chunk.start)
    assert cache.length == 6 and cache.keys[0] is None  # layer 0's slot is untouched
    torch.testing.assert_close(torch.cat(outs, dim=1)[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_fused_kernel_inputs_keep_masked_grouped_query_attention_exact():
    """mmr1.sdpa repeats K/V for masked grouped-query calls on CUDA (the memory-efficient kernel takes no grouped
    heads): the repeated call computes the same attention; unmasked or ungrouped calls are left alone."""
    from mmr1.sdpa import fused_kernel_inputs

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    kwargs = {"attn_mask": mask, "enable_gqa": True}
    k2, v2, kw2 = fused_kernel_inputs(q, k, v, kwargs)
    assert k2.shape == (2, 8, 7, 16) and kw2["enable_gqa"] is False and kwargs["enable_gqa"] is True
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k2, v2, **kw2),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs),
                               atol=1e-6, rtol=1e-6)
    for unchanged in ({"enable_gqa": True, "is_causal": True}, {"attn_mask": mask}):
        same_k, same_v, same_kw = fused_kernel_inputs(q, k, v, unchanged)
        assert same_k is k and same_v is v and same_kw is unchanged


def test_attention_backends_leave_cudnn_out_on_cuda_only():
    """Encoders call SDPA themselves; MultimodalR1.encode_modality runs them inside attention_backends, which on
    CUDA switches cuDNN attention off and nothing else, and switches it back when the last thread leaves (the
    engine's encoder workers and its decoding thread overlap)."""
    import threading

    from mmr1.sdpa import attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    flash = torch.backends.cuda.flash_sdp_enabled()
    inside, release = threading.Event(), threading.Event()

    def worker():
        with attention_backends(torch.device("cuda")):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(10)
    with attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled() == flash
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the worker is still inside
    release.set()
    thread.join(10)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
