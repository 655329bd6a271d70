"""Gated cross-modal attention (Flamingo-style): text hidden states attend to modality tokens.

The output is scaled by tanh(gate) with the gate initialised at 0, so a freshly built model computes exactly
what its text-only backbone computes; training opens the gate as the modality tokens become useful.
"""
from __future__ import annotations

import torch
from torch import nn

from mmr1.norm import RMSNorm
from mmr1.sdpa import sdpa


class GatedCrossAttention(nn.Module):
    """x (B, L, D) attends to memory (B, T, M); returns tanh(gate) * attn, to be added to x by the caller.

    memory_dim M is the width of the modality tokens, `dim` unless they come from another model: a speculative
    draft can read its target's modality tokens instead of encoding the inputs again."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float = 1e-5, memory_dim: int | None = None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"GatedCrossAttention: dim={dim} not divisible by n_heads={n_heads}")
        memory_dim = memory_dim or dim
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.norm = RMSNorm(dim, norm_eps)
        self.memory_norm = RMSNorm(memory_dim, norm_eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(memory_dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the modality tokens (B, T, M), (B, H, T, Dh) each. Computed once per request in
        decoding."""
        B, T, _ = memory.shape
        kv = self.wkv(self.memory_norm(memory)).view(B, T, 2, self.n_heads, self.head_dim)
        k, v = kv.unbind(dim=2)  # (B, T, H, Dh)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, L, D); memory: (B, T, M) or precomputed `kv`; memory_mask: (B, T) bool, True = real token, or
        (B, L, T) per query (the engine's packed batches, where one row holds several requests' tokens).

        Queries that see no modality token at all get exactly zero output.
        """
        B, L, _ = x.shape
        k, v = kv if kv is not None else self.memory_kv(memory)  # (B, H, T, Dh)
        q = self.wq(self.norm(x)).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        has_memory = None
        attn_mask = None
        if memory_mask is not None:
            per_query = memory_mask if memory_mask.dim() == 3 else memory_mask[:, None, :]  # (B, L or 1, T)
            has_memory = per_query.any(dim=-1)  # (B, L or 1)
            # A query without modality tokens would softmax over nothing (NaN); let it see token 0 and
            # zero its output below instead.
            safe_mask = per_query.clone()
            safe_mask[..., 0] |= ~has_memory
            attn_mask = safe_mask[:, None]  # (B, 1, L or 1, T)
        out = sdpa(q, k, v, attn_mask=attn_mask)  # (B, H, L, Dh)
        out = self.wo(out.transpose(1, 2).reshape(B, L, -1))  # -1: H * Dh, the local width under TP
        if has_memory is not None:
            out = out * has_memory[..., None].to(out.dtype)
        return torch.tanh(self.gate).to(out.dtype) * out
