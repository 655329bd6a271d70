"""Rotary position embeddings and grouped-query causal self-attention with an optional KV cache."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mmr1.config import RopeScaling
from mmr1.local_attention import marked_tokens, sliding_window_attention
from mmr1.rope import rope_frequencies
from mmr1.sdpa import sdpa

if TYPE_CHECKING:
    from mmr1.kv_cache import KVCache


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (Su et al. 2021), precomputed up to `max_seq_len`, looked up by position id.

    Positions come in explicitly as (B, L) so that left-padded batches rotate each sequence from its own 0.
    Uses the half-split layout (dims i and i + D/2 form a pair), as Llama / Hugging Face checkpoints do.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim={head_dim} must be even")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.scaling = scaling  # None: plain RoPE; else linear / dynamic / YaRN (mmr1.rope)
        cos, sin = self._tables(device=None)
        # Not persistent: derived from the config, so checkpoints don't carry them.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, attention_factor = rope_frequencies(self.head_dim, self.theta, self.scaling, self.max_seq_len,
                                                      device)  # (D/2,)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (max_seq_len, D)
        if attention_factor != 1.0:  # YaRN scales q.k through the tables
            return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()
        return angles.cos().float(), angles.sin().float()

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L) -> cos, sin (B, 1, L, D) in fp32, ready to broadcast over heads."""
        if self.cos.dtype != torch.float32:
            # `model.to(torch.bfloat16)` casts buffers too; bf16 angles lose precision at long range, so rebuild.
            self.cos, self.sin = self._tables(self.cos.device)
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, D) by the angles in cos/sin (B, 1, L, D); computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


def attention_mask_for(key_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, L, S), True = may attend: causal + key padding.

    key_mask (B, S) marks real tokens among all keys (cached ones first); the L queries are the last L keys.
    Every query also sees itself so padding rows never softmax over nothing (NaN); real queries are unaffected
    because the only key a padding query adds is its own padding key.
    """
    S = key_mask.shape[1]
    query_pos = torch.arange(S - query_len, S, device=key_mask.device)[:, None]  # (L, 1)
    key_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    causal = key_pos <= query_pos  # (L, S)
    visible = key_mask[:, None, :] | (key_pos == query_pos)  # (B, L, S)
    return (causal & visible).unsqueeze(1)


def alibi_slopes(n_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """2^(-8 h / n) for h = 1..n (Press et al. 2022; geometric for any n, not only powers of two)."""
    return 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, device=device, dtype=torch.float32) / n_heads)


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    dropout_p: float) -> torch.Tensor:
    """Causal attention of q (B, H, L, Dh) over the last-L-aligned k, v (B, Hkv, S, Dh) with the ALiBi bias
    -slope_h * (query slot - key slot) added to the scores; attn_mask (B, 1, L, S) bool or None (causal).
    Slots count cache positions, so a left-padded sequence's distances are its token distances."""
    L, S = q.shape[2], k.shape[2]
    distance = (torch.arange(S - L, S, device=q.device)[:, None] - torch.arange(S, device=q.device)[None, :])
    bias = -alibi_slopes(q.shape[1], q.device)[:, None, None] * distance.float()  # (H, L, S)
    allowed = attn_mask if attn_mask is not None else (distance >= 0)[None, None]
    bias = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)  # (B or 1, H, L, S)
    return sdpa(q, k, v, attn_mask=bias, dropout_p=dropout_p, enable_gqa=True)


class SelfAttention(nn.Module):
    """Causal grouped-query attention: n_heads query heads share n_kv_heads key/value heads.

    kind "full": every head attends causally to all keys (SDPA). "sliding": every head sees the last `window`
    positions, blocked in O(L * window) (mmr1.local_attention). "hybrid": the first `local_heads` heads slide, the
    others are full -- or, with global_tokens, see their window plus the earlier designated global tokens (the
    caller marks them); one output projection mixes all heads as in any multi-head layer.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, layer_idx: int = 0, dropout: float = 0.0,
                 qkv_bias: bool = False, kind: str = "full", window: int = 512, local_heads: int = 0,
                 block_size: int = 256, global_tokens: bool = False, alibi: bool = False):
        super().__init__()
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"SelfAttention: need dim % n_heads == 0 and n_heads % n_kv_heads == 0, "
                             f"got dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}")
        self.kind = kind
        self.window = window
        self.block_size = block_size
        # Local query heads; they use the first local_heads // group KV heads, so local and global never share one.
        self.local_heads = {"full": 0, "sliding": n_heads, "hybrid": local_heads}[kind]
        group = n_heads // n_kv_heads
        if kind == "hybrid" and (not 0 < local_heads < n_heads or local_heads % group):
            raise ValueError(f"SelfAttention: hybrid local_heads={local_heads} must be in (0, {n_heads}) and a "
                             f"multiple of n_heads // n_kv_heads = {group}")
        self.local_kv_heads = self.local_heads // group
        self.global_tokens = global_tokens and kind == "hybrid"
        # ALiBi on the full-causal (global) heads; token-restricted global heads have none.
        self.alibi = alibi and not self.global_tokens and self.local_heads < n_heads
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
        self.dropout = dropout
        # q/k/v biases (Qwen2) start at zero so that a fresh model matches its bias-free counterpart.
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        if qkv_bias:
            for proj in (self.wq, self.wk, self.wv):
                nn.init.zeros_(proj.bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                global_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); cos/sin (B, 1, L, Dh); attn_mask (B, 1, L, S) bool or None for plain causal over x.

        With a cache, this call's keys/values are written after the cached ones and the queries attend to all
        S = cached + L keys (the caller builds attn_mask for that). Local heads need only key_mask (B, S), the
        padding of those keys (None: no padding); full heads ignore it. global_mask (B, L): which of the L new
        tokens are designated global tokens (hybrid layers with global_tokens only).
        """
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kind != "full":
            if cache is not None and not hasattr(cache, "update_window"):
                raise TypeError(f"SelfAttention: layer {self.layer_idx} is {self.kind!r}; its cache "
                                f"({type(cache).__name__}) must implement update_window (see mmr1.kv_cache)")
            if self.global_tokens:
                out = self._local_global_tokens(q, k, v, cache, key_mask, attn_mask, global_mask)
            else:
                out = self._local_global(q, k, v, attn_mask, cache, key_mask)
            return self.wo(out.transpose(1, 2).reshape(B, L, -1))
        if getattr(cache, "computes_attention", False):  # the engine's packed batch attends row by row itself
            out = cache.attend(self.layer_idx, q, k, v)  # (B, H, L, Dh)
            return self.wo(out.transpose(1, 2).reshape(B, L, -1))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, Dh)
        dropout_p = self.dropout if self.training else 0.0
        if self.alibi:
            out = alibi_attention(q, k, v, attn_mask, dropout_p)
        elif attn_mask is None:
            if k.shape[2] != L:  # SDPA's is_causal aligns top-left, wrong once cached keys precede the queries
                raise ValueError("SelfAttention: attn_mask is required when attending to cached keys")
            out = sdpa(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
        else:
            out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)

    def _local_global_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None,
                             key_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                             global_mask: torch.Tensor | None) -> torch.Tensor:
        """Hybrid with global tokens: every head slides; global heads also see the marked tokens -> (B, H, L, Dh)."""
        if global_mask is None:
            raise ValueError("SelfAttention: global_tokens needs global_mask, the designated tokens among the inputs")
        if key_mask is None and attn_mask is not None:
            key_mask = attn_mask[:, 0, -1, :]
        if key_mask is not None:
            global_mask = global_mask & key_mask[:, -q.shape[2]:]  # a padding slot is never a global token
        dropout_p = self.dropout if self.training else 0.0
        hl, hkl = self.local_heads, self.local_kv_heads
        if cache is not None:
            extra = cache.update_marked(self.layer_idx, k[:, hkl:], v[:, hkl:], global_mask)
            k, v, key_mask = cache.update_window(self.layer_idx, k, v)  # all KV heads in the ring
        else:
            extra = marked_tokens(k[:, hkl:], v[:, hkl:], global_mask)
        args = (self.window, key_mask, self.block_size, dropout_p)
        out_local = sliding_window_attention(q[:, :hl], k[:, :hkl], v[:, :hkl], *args)
        out_global = sliding_window_attention(q[:, hl:], k[:, hkl:], v[:, hkl:], *args, extra=extra)
        return torch.cat([out_local, out_global], dim=1)

    def _local_global(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                      cache: KVCache | None, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Sliding/hybrid: local heads blocked over their window, global heads full causal -> (B, H, L, Dh)."""
        L = q.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        if key_mask is None and attn_mask is not None:
            # The last query row sees every key but itself through the padding mask; its own key is seen by no
            # other query, so this row is the key mask as far as any query can tell.
            key_mask = attn_mask[:, 0, -1, :]
        hl, hkl = self.local_heads, self.local_kv_heads
        k_loc, v_loc = k[:, :hkl], v[:, :hkl]
        if cache is not None:
            k_loc, v_loc, local_mask = cache.update_window(self.layer_idx, k_loc, v_loc)
        else:
            local_mask = key_mask
        out = sliding_window_attention(q[:, :hl], k_loc, v_loc, self.window, local_mask, self.block_size, dropout_p)
        if hl == self.n_heads:
            return out
        q_g, k_g, v_g = q[:, hl:], k[:, hkl:], v[:, hkl:]
        if cache is not None:
            k_g, v_g = cache.update(self.layer_idx, k_g, v_g)  # a full buffer holding only the global heads
        if self.alibi:
            out_g = alibi_attention(q_g, k_g, v_g, attn_mask, dropout_p)
        elif attn_mask is None:
            if k_g.shape[2] != L:
                raise ValueError("SelfAttention: attn_mask is required when attending to cached keys")
            out_g = sdpa(q_g, k_g, v_g, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
        else:
            out_g = sdpa(q_g, k_g, v_g, attn_mask=attn_mask, dropout_p=dropout_p,
                                                   enable_gqa=True)
        return torch.cat([out, out_g], dim=1)  # (B, H, L, Dh): local heads first, as in the projections
