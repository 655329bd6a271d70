"""One entry point for scaled-dot-product attention, so every attention layer picks its kernel the same way.

On CUDA the cuDNN backend is left out. torch 2.11 tries cuDNN first on Hopper and Blackwell for attention with a
mask, and cuDNN builds an execution plan for every new (batch, length) shape: a few milliseconds each. A serving
engine sees new lengths almost every step (an H200 spent 3.3 ms per attention call and 61 ms per engine step on
it, benchmarks/results/gpu_checks.md), and training with padded batches sees new lengths every few steps. The
flash and memory-efficient kernels need no plan. Flash takes no mask and the memory-efficient kernel no grouped
K/V heads, so a masked grouped-query call repeats K/V to the query heads first (as transformers does), instead of
falling through to the unfused math kernel.

torch's backend switches are process-wide, not per thread, and the engine encodes images and audio in worker
threads while the main thread decodes. So cuDNN is switched off while any thread is inside `without_cudnn` and
back to what it was when the last one leaves, under a lock; the other backends stay as the user set them.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_switch = threading.Lock()
_inside = 0  # threads inside without_cudnn()
_cudnn_before: bool | None = None  # cuDNN's switch when the first of them entered


@contextlib.contextmanager
def without_cudnn() -> Iterator[None]:
    """torch.backends.cuda's cuDNN attention switch off inside; restored when the last thread leaves."""
    global _inside, _cudnn_before
    with _switch:
        if _inside == 0:
            _cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _inside += 1
    try:
        yield
    finally:
        with _switch:
            _inside -= 1
            if _inside == 0:
                torch.backends.cuda.enable_cudnn_sdp(_cudnn_before)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs), without cuDNN on CUDA; unchanged elsewhere."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    k, v, kwargs = fused_kernel_inputs(q, k, v, kwargs)
    with without_cudnn():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """A context for code that calls F.scaled_dot_product_attention itself (the encoders: transformers' Wav2Vec2
    pads each batch to its longest clip, so it sees new lengths too): without_cudnn on CUDA, nothing elsewhere."""
    return without_cudnn() if device.type == "cuda" else contextlib.nullcontext()


def fused_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict
                        ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """k, v (B, Hkv, S, Dh) and the keyword arguments a fused kernel takes for the same attention: a masked
    grouped-query call gets K/V repeated to the H query heads, (B, H, S, Dh), and enable_gqa off."""
    if kwargs.get("enable_gqa") and kwargs.get("attn_mask") is not None and k.shape[-3] != q.shape[-3]:
        repeats = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeats, dim=-3), v.repeat_interleave(repeats, dim=-3)  # (B, H, S, Dh)
        kwargs = {**kwargs, "enable_gqa": False}
    return k, v, kwargs
