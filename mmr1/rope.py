"""RoPE frequencies with context-extension scaling: linear (position interpolation), dynamic NTK-aware, YaRN.

    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, max_seq_len)
    angles[p] = p * inv_freq;  cos/sin tables are multiplied by attention_factor (YaRN's "mscale", as in
    transformers, so q.k is scaled by attention_factor ** 2)

Computed in float64 and cast once to fp32, like the unscaled tables in mmr1.attention.RotaryEmbedding. The
formulas follow transformers.modeling_rope_utils (tests/test_long_context_rope.py checks parity).
"""
from __future__ import annotations

import math

import torch

from mmr1.config import RopeScaling


def default_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2, float64 (D/2,)."""
    dims = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
    return theta ** -(dims / head_dim)


def yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling, device: torch.device | None = None) -> torch.Tensor:
    """NTK-by-parts: dimensions that rotate fewer than beta_slow times over the original context are interpolated
    (divided by factor), those rotating more than beta_fast times are kept, with a linear ramp in between."""
    def correction_dim(rotations: float) -> float:  # the dimension index that rotates `rotations` times
        return head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = default_inv_freq(head_dim, theta, device)
    interpolation = extrapolation / s.factor
    return interpolation * ramp + extrapolation * (1 - ramp)


def yarn_attention_factor(s: RopeScaling) -> float:
    if s.attention_factor is not None:
        return s.attention_factor
    return 1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None, max_seq_len: int,
                     device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq float64 (D/2,), attention_factor) for plain or scaled RoPE."""
    if scaling is None:
        return default_inv_freq(head_dim, theta, device), 1.0
    if scaling.type == "linear":
        return default_inv_freq(head_dim, theta, device) / scaling.factor, 1.0
    if scaling.type == "dynamic":
        # Evaluated at the model's whole context (see RopeScaling): fixed frequencies, so caching is exact.
        length = max(max_seq_len, scaling.original_max_seq_len)
        base = theta * ((scaling.factor * length / scaling.original_max_seq_len) - (scaling.factor - 1)) ** (
            head_dim / (head_dim - 2))
        return default_inv_freq(head_dim, base, device), 1.0
    return yarn_inv_freq(head_dim, theta, scaling, device), yarn_attention_factor(scaling)
