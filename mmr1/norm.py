"""RMSNorm, shared by the backbone and the fusion layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32 for stability under bf16 autocast, returned in x's dtype; one
    fused operator where torch has one (bit-identical to the unfused formula on the CPU)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
