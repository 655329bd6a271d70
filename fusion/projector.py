"""Projectors from an encoder's feature space into the backbone's width.

`mlp`: a two-layer MLP applied per token (keeps every encoder token).
`resampler`: a perceiver-style resampler — `num_latents` learned queries cross-attend to the encoder tokens,
so any number of input tokens becomes a fixed number of output tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmr1.norm import RMSNorm
from mmr1.sdpa import sdpa


@dataclass
class ProjectorConfig:
    kind: str = "mlp"  # "mlp" | "resampler"
    hidden: int = 0  # MLP hidden width; 0 = the backbone width
    num_latents: int = 16  # resampler: output tokens per input
    layers: int = 1  # resampler: cross-attention + MLP layers
    heads: int = 4  # resampler attention heads

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "resampler"):
            raise ValueError(f"ProjectorConfig.kind must be 'mlp' or 'resampler', got {self.kind!r}")


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or out_dim
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(F.gelu(self.fc1(tokens))), mask  # (B, T, out_dim), (B, T)


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_latents = RMSNorm(dim)
        self.norm_inputs = RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.norm_mlp = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = latents.shape
        T = inputs.shape[1]
        h = self.heads  # head width comes from the tensors: under tensor parallel a rank holds h = heads / T
        q = self.wq(self.norm_latents(latents)).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, hd)
        # Latents attend to the inputs and to themselves, as in Flamingo's resampler.
        kv_in = torch.cat([self.norm_inputs(inputs), self.norm_latents(latents)], dim=1)  # (B, T+N, D)
        k, v = self.wkv(kv_in).view(B, T + N, 2, h, -1).unbind(2)
        kv_mask = torch.cat([mask, mask.new_ones(B, N)], dim=1)[:, None, None, :]  # (B, 1, 1, T+N)
        attn = sdpa(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=kv_mask)
        latents = latents + self.wo(attn.transpose(1, 2).reshape(B, N, -1))
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_latents: int = 16, layers: int = 1, heads: int = 4):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.latents = nn.Parameter(torch.randn(num_latents, out_dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(out_dim, heads) for _ in range(layers))
        self.norm = RMSNorm(out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.input_proj(tokens)  # (B, T, D)
        latents = self.latents.expand(tokens.shape[0], -1, -1).to(inputs.dtype)  # (B, N, D)
        for layer in self.layers:
            latents = layer(latents, inputs, mask)
        return self.norm(latents), mask.new_ones(latents.shape[:2])  # (B, N, D), (B, N)


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    if cfg.kind == "mlp":
        return MLPProjector(in_dim, out_dim, cfg.hidden)
    return PerceiverResampler(in_dim, out_dim, cfg.num_latents, cfg.layers, cfg.heads)
