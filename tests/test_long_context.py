"""Sliding-window / hybrid attention and the ring-buffer KV cache against dense masked references (fp32, 1e-5)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mmr1.attention import SelfAttention, apply_rotary
from mmr1.backbone import R1Model
from mmr1.config import R1Config, RopeScaling, config_from_dict, config_to_dict
from mmr1.generation import generate, left_pad
from mmr1.kv_cache import KVCache
from mmr1 import local_attention
from mmr1.local_attention import marked_tokens, sliding_window_attention

TOL = dict(atol=1e-5, rtol=1e-5)



@pytest.fixture(autouse=True)
def blocked_kernel_always(monkeypatch):
    """These tests use short sequences, which the kernel would run densely; force the blocked path so it is the
    one under test (test_short_sequences_take_the_dense_path checks the dispatch itself)."""
    monkeypatch.setattr(local_attention, "DENSE_MAX_SCORES", 0)


@pytest.mark.parametrize("padded", [False, True])
def test_short_sequences_take_the_dense_path(padded, monkeypatch):
    torch.manual_seed(0)
    B, H, Hkv, L, window = 2, 4, 2, 40, 7
    q, k, v = torch.randn(B, H, L, 16), torch.randn(B, Hkv, L, 16), torch.randn(B, Hkv, L, 16)
    key_mask = padding_mask(B, L) if padded else None
    blocked = sliding_window_attention(q, k, v, window, key_mask, 8)
    monkeypatch.setattr(local_attention, "DENSE_MAX_SCORES", L * L)
    calls = []
    monkeypatch.setattr(local_attention, "_blocks", lambda *a: calls.append(a))
    dense = sliding_window_attention(q, k, v, window, key_mask, 8)
    assert not calls  # no block was computed
    torch.testing.assert_close(dense, blocked, **TOL)

def reference_mask(key_mask: torch.Tensor, L: int, window: int | None) -> torch.Tensor:
    """(B, L, S) bool by explicit loops: query i (slot S - L + i) sees key j iff j <= i, within the window (when
    given) and j is real -- or j is the query itself."""
    B, S = key_mask.shape
    allowed = torch.zeros(B, L, S, dtype=torch.bool)
    for i in range(L):
        qs = S - L + i
        for j in range(S):
            near = window is None or j > qs - window
            allowed[:, i, j] = (j <= qs) & near & (key_mask[:, j] | (j == qs))
    return allowed


def naive_attention(q, k, v, allowed, alibi=False):
    """softmax(q k^T / sqrt(D) [- slope_h (i - j)] masked) v with KV heads repeated; q (B, H, L, D), allowed
    (B, L, S); ALiBi slopes 2^(-8h/H), h = 1..H, i and j the query's and key's slots."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if alibi:
        H, L, S = q.shape[1], q.shape[2], k.shape[2]
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    scores[:, h, i, j] -= 2.0 ** (-8.0 * (h + 1) / H) * ((S - L + i) - j)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def padding_mask(B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, S, generator=g) > 0.25
    mask[0] = True
    if B > 1:
        mask[1, : S // 3] = False  # left padding
    return mask


# ---- the blocked kernel --------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,Hkv,L,S,window,block", [
    (2, 4, 2, 37, 37, 5, 8),  # L not a multiple of the block, window < block
    (2, 4, 2, 37, 50, 9, 8),  # cached keys before the queries
    (1, 2, 1, 1, 20, 7, 128),  # one decode step
    (3, 4, 4, 64, 64, 64, 16),  # window == L
    (2, 4, 2, 33, 33, 100, 8),  # window > L: plain causal
    (2, 2, 1, 10, 10, 1, 4),  # window 1: only itself
    (2, 8, 2, 45, 61, 19, 16),  # G = 4, window not a multiple of the block
])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("call_rows", [4096, 16])  # 16: a few blocks per SDPA call, many calls
def test_sliding_window_attention_matches_dense(B, H, Hkv, L, S, window, block, padded, call_rows, monkeypatch):
    monkeypatch.setattr(local_attention, "CALL_ROWS", call_rows)
    torch.manual_seed(0)
    q = torch.randn(B, H, L, 16, requires_grad=True)
    k = torch.randn(B, Hkv, S, 16, requires_grad=True)
    v = torch.randn(B, Hkv, S, 16, requires_grad=True)
    key_mask = padding_mask(B, S) if padded else None
    out = sliding_window_attention(q, k, v, window, key_mask, block)
    full_mask = key_mask if padded else torch.ones(B, S, dtype=torch.bool)
    ref = naive_attention(q, k, v, reference_mask(full_mask, L, window))
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, **TOL)


def global_token_case():
    """Padded q, k, v with cached keys (S > L), ~15 % of real tokens marked global, and the dense reference's
    `allowed` (B, L, S): the sliding window plus every earlier marked token."""
    torch.manual_seed(1)
    B, H, Hkv, L, S, window = 3, 4, 2, 41, 55, 6
    q = torch.randn(B, H, L, 16, requires_grad=True)
    k = torch.randn(B, Hkv, S, 16, requires_grad=True)
    v = torch.randn(B, Hkv, S, 16, requires_grad=True)
    key_mask = padding_mask(B, S, seed=2)
    marked = (torch.rand(B, S, generator=torch.Generator().manual_seed(3)) < 0.15) & key_mask
    marked[0, 0] = True
    allowed = reference_mask(key_mask, L, window)
    allowed |= marked[:, None, :] & reference_mask(torch.ones(B, S, dtype=torch.bool), L, None)
    return q, k, v, key_mask, marked, window, allowed


@pytest.mark.parametrize("call_rows", [4096, 16])
def test_global_tokens_extend_the_window(call_rows, monkeypatch):
    """extra keys: a query also sees every earlier marked token, even far outside its window."""
    monkeypatch.setattr(local_attention, "CALL_ROWS", call_rows)
    q, k, v, key_mask, marked, window, allowed = global_token_case()
    out = sliding_window_attention(q, k, v, window, key_mask, 8, extra=marked_tokens(k, v, marked))
    ref = naive_attention(q, k, v, allowed)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, **TOL)


def test_sliding_window_attention_never_builds_a_quadratic_tensor():
    """Every tensor the kernel's autograd graph saves is O(L * window): at L = 2048, window 64, nothing may hold
    L * L / 4 elements (a (L, L) mask or score matrix would)."""
    L, window = 2048, 64
    q, k, v = (torch.randn(1, 2, L, 8, requires_grad=True) for _ in range(3))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = sliding_window_attention(q, k, v, window, None, block_size=64)
    out.sum().backward()
    assert sizes and max(sizes) < L * L // 4


# ---- config --------------------------------------------------------------------------------------------------

def test_layer_schedule_from_one_line_of_config():
    assert R1Config().layer_kinds() == ["full"] * 4  # the default stays today's model
    cfg = R1Config(n_layers=8, attention_pattern="sliding", global_every=4)
    assert cfg.layer_kinds() == ["sliding"] * 3 + ["full"] + ["sliding"] * 3 + ["full"]
    cfg = R1Config(n_layers=3, layer_attention=["hybrid", "sliding", "full"], global_tokens=[1, 2],
                   rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=128))
    assert cfg.layer_kinds() == ["hybrid", "sliding", "full"]
    assert config_from_dict(R1Config, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert KVCache.for_model(R1Config(), 1).windows == [None] * 4


@pytest.mark.parametrize("kwargs,field", [
    ({"attention_pattern": "local"}, "attention_pattern"),
    ({"layer_attention": ["full"]}, "layer_attention"),
    ({"window": 0}, "window"),
    ({"attention_pattern": "hybrid", "local_heads": 1}, "local_heads"),  # 4 heads / 2 KV heads: groups of 2
    ({"attention_pattern": "hybrid", "local_heads": 4}, "local_heads"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "original_max_seq_len"),
    ({"rope_scaling": {"type": "ntk", "factor": 4.0}}, "type"),
    ({"attention_pattern": "hybrid", "global_tokens": [1], "alibi_global": True}, "alibi_global"),
    ({"attention_pattern": "hybrid", "global_tokens": [600]}, "global_tokens"),
])
def test_bad_attention_config_is_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        config_from_dict(R1Config, kwargs)


# ---- whole model vs a dense masked reference ------------------------------------------------------------------

def dense_attention_forward(self: SelfAttention, x, cos, sin, attn_mask=None, cache=None, key_mask=None,
                            global_mask=None):
    """Reference SelfAttention.forward: no cache, each head's mask built by loops (local heads windowed; global
    heads full, or windowed plus every earlier real global token)."""
    assert cache is None
    B, L, _ = x.shape
    q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    km = key_mask if key_mask is not None else torch.ones(B, L, dtype=torch.bool)
    hl, hkl = self.local_heads, self.local_kv_heads
    outs = []
    if hl:
        outs.append(naive_attention(q[:, :hl], k[:, :hkl], v[:, :hkl], reference_mask(km, L, self.window)))
    if hl < self.n_heads:
        if self.global_tokens:
            allowed = reference_mask(km, L, self.window)
            allowed |= (global_mask & km)[:, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
        else:
            allowed = reference_mask(km, L, None)
        outs.append(naive_attention(q[:, hl:], k[:, hkl:], v[:, hkl:], allowed, alibi=self.alibi))
    return self.wo(torch.cat(outs, dim=1).transpose(1, 2).reshape(B, L, -1))


SCHEDULES = {
    "sliding": dict(attention_pattern="sliding"),
    "hybrid": dict(attention_pattern="hybrid"),
    "mixed": dict(layer_attention=["sliding", "hybrid", "full"]),
    "global_tokens": dict(layer_attention=["hybrid", "sliding", "hybrid"], global_tokens=[1, 2]),
    "alibi": dict(layer_attention=["hybrid", "sliding", "full"], alibi_global=True),
}


def long_model(schedule: str, window=5, block=4, seed=0, **overrides) -> R1Model:
    torch.manual_seed(seed)
    cfg = R1Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64,
                   window=window, attention_block_size=block, tie_embeddings=False,
                   **{**SCHEDULES[schedule], **overrides})
    model = R1Model(cfg)
    model.init_weights(std=0.1)
    return model.eval()


def batch(lengths, seed=0):
    """Left-padded random prompts, each starting with 1 (<bos>) and holding a few 2s (global tokens when set)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(1, 64, (n - 1,), generator=g).tolist() for n in lengths]
    for p in prompts:
        p[len(p) // 2] = 2
    return left_pad(prompts, 1, torch.device("cpu"))  # pads with the <bos> id: padding must never count as global


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_model_forward_backward_match_dense_reference(schedule, monkeypatch):
    model = long_model(schedule)
    ids, mask = batch([19, 11, 4])  # different lengths, left padded, 19 not a multiple of the block (4)
    weights = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(5))

    def logits_and_grads():  # a random projection of the real tokens' logits, O(1) gradients
        logits = model(ids, attention_mask=mask).logits
        loss = (logits * weights * mask[..., None]).sum() / mask.sum()
        return logits, torch.autograd.grad(loss, list(model.parameters()))

    out, grads = logits_and_grads()
    with monkeypatch.context() as patch:
        patch.setattr(SelfAttention, "forward", dense_attention_forward)
        ref, ref_grads = logits_and_grads()
    torch.testing.assert_close(out[mask], ref[mask], **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_cached_decode_equals_full_forward_at_every_step(schedule):
    """Prefill in chunks longer than the window, then one token at a time well past it: every step's logits equal
    the no-cache forward of the whole left-padded batch so far."""
    model = long_model(schedule)
    ids, mask = batch([47, 30, 6], seed=1)
    B, total = ids.shape
    cache = KVCache.for_model(model.cfg, B, max_len=total)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        # chunks of 19 (blocked kernel) and 6 (dense small-step path), both > window 5; then single tokens
        steps = [(0, 19), (19, 25)] + [(t, t + 1) for t in range(25, total)]
        for lo, hi in steps:
            got = model(ids[:, lo:hi], attention_mask=mask[:, lo:hi], cache=cache).logits
            torch.testing.assert_close(got[mask[:, lo:hi]], full[:, lo:hi][mask[:, lo:hi]], **TOL)
    assert cache.length == total


def test_ring_buffer_keeps_decode_memory_flat():
    """Sliding layers hold `window` slots however long the context; full layers grow with it."""
    window, steps = 6, 40
    nbytes = {}
    for schedule in ("sliding", "mixed"):
        model = long_model(schedule, window=window)
        cache = KVCache.for_model(model.cfg, 1, max_len=steps)
        sizes = []
        with torch.no_grad():
            for t in range(steps):
                model(torch.tensor([[t % 60 + 1]]), cache=cache)
                sizes.append(cache.nbytes())
        nbytes[schedule] = sizes
    per_slot = 2 * 1 * 2 * 8 * 4  # K and V, batch 1, 2 KV heads, head_dim 8, fp32
    assert nbytes["sliding"][window - 1] == nbytes["sliding"][-1] == 3 * window * per_slot
    # mixed: sliding layer ring + hybrid layer (ring for its local KV head + full buffer for its global one)
    # + the full layer's buffer (max_len slots each, allocated on first write).
    assert nbytes["mixed"][-1] == window * per_slot + (window + steps) * per_slot // 2 + steps * per_slot


def test_global_token_store_grows_only_with_designated_tokens():
    """hybrid + global_tokens: all K/V heads in rings, the global heads' store gains a slot per marked token only."""
    window, steps = 4, 30
    model = long_model("global_tokens", window=window)
    cache = KVCache.for_model(model.cfg, 1, max_len=steps)
    tokens = [1] + [5 + t % 50 for t in range(1, steps)]
    tokens[20] = 2  # one more designated token, far past the window of the first
    sizes = []
    with torch.no_grad():
        for token in tokens:
            model(torch.tensor([[token]]), cache=cache)
            sizes.append(cache.nbytes())
    per_slot = 2 * 2 * 8 * 4  # K and V, 2 KV heads, head_dim 8, fp32
    rings = 3 * window * per_slot
    assert sizes[-1] == rings + 2 * 2 * (per_slot // 2)  # 2 hybrid layers x 2 marked tokens x 1 global KV head
    assert sizes[window] == sizes[19] == rings + 2 * (per_slot // 2)
    assert [len(s[2][0]) for s in cache.marked if s is not None] == [2, 2]


def test_storage_dtype_hook_stores_bf16_and_returns_compute_dtype():
    model = long_model("mixed")
    cache = KVCache.for_model(model.cfg, 1, max_len=12, storage_dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(torch.arange(1, 13)[None], cache=cache).logits
        ref = model(torch.arange(1, 13)[None]).logits
    assert cache.ring_keys[0].dtype == torch.bfloat16 and cache.keys[2].dtype == torch.bfloat16
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)  # bf16 rounding of K/V only


@pytest.mark.parametrize("schedule", ["sliding", "hybrid"])
def test_generate_past_the_window_equals_recompute(schedule):
    model = long_model(schedule, window=4)
    model.init_weights(std=0.3)  # peaked logits: greedy paths that differ between prompts
    prompts = [[5, 9, 2, 33, 8, 1, 17], [7], [12, 40, 3]]
    generated = generate(model, prompts, max_new_tokens=12)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for _ in range(12):
            ids, mask = left_pad(seqs, 0, torch.device("cpu"))
            for seq, token in zip(seqs, model(ids, attention_mask=mask).logits[:, -1].argmax(-1).tolist()):
                seq.append(token)
    assert generated == [s[len(p):] for s, p in zip(seqs, prompts)]
