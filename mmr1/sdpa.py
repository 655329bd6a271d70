"""One entry point for scaled-dot-product attention, so every attention layer picks its kernel the same way.

On CUDA the cuDNN backend is left out. torch 2.11 tries cuDNN first on Hopper and Blackwell for attention with a
mask, and cuDNN builds an execution plan for every new (batch, length) shape: a few milliseconds each. A serving
engine sees new lengths almost every step (an H200 spent 3.3 ms per attention call and 61 ms per engine step on
it, benchmarks/results/gpu_checks.md), and training with padded batches sees new lengths every few steps. The
flash and memory-efficient kernels need no plan. Flash takes no mask and the memory-efficient kernel no grouped
K/V heads, so a masked grouped-query call repeats K/V to the query heads first (as transformers does), instead of
falling through to the unfused math kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs) with CUDA_BACKENDS on CUDA; unchanged elsewhere."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    k, v, kwargs = fused_kernel_inputs(q, k, v, kwargs)
    with sdpa_kernel(CUDA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def fused_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict
                        ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """k, v (B, Hkv, S, Dh) and the keyword arguments a fused kernel takes for the same attention: a masked
    grouped-query call gets K/V repeated to the H query heads, (B, H, S, Dh), and enable_gqa off."""
    if kwargs.get("enable_gqa") and kwargs.get("attn_mask") is not None and k.shape[-3] != q.shape[-3]:
        repeats = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeats, dim=-3), v.repeat_interleave(repeats, dim=-3)  # (B, H, S, Dh)
        kwargs = {**kwargs, "enable_gqa": False}
    return k, v, kwargs
