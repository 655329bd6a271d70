"""Fine-grained Mixture-of-Experts feed-forward (DeepSeekMoE / DeepSeek-V3 style).

Each token goes to `top_k` of `num_experts` narrow SwiGLU experts, chosen by group-limited routing, plus
`num_shared_experts` always-on experts. Dispatch sorts the (token, expert) assignments by expert so that each
expert runs one matmul over a contiguous block of tokens; the routed weights are stored stacked
(E, dim, hidden) so a grouped GEMM can replace the per-expert loop without changing the checkpoint layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmr1.config import MoEConfig
from mmr1.feedforward import SwiGLU


@dataclass
class MoEAux:
    """What an MoE layer reports besides its output."""

    aux_loss: torch.Tensor  # () load-balancing loss over the real tokens of the call; 1.0 when perfectly balanced
    tokens_per_expert: torch.Tensor  # (E,) how many real tokens each routed expert received


@dataclass
class Routing:
    weights: torch.Tensor  # (N, k) fp32 combine weights of the chosen experts
    indices: torch.Tensor  # (N, k) chosen expert ids
    aux: MoEAux


def select_experts(scores: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k over router scores (N, E) -> weights, indices (N, k).

    Experts are split into `num_groups` equal groups; a group scores its best expert (softmax) or the sum of
    its best two (sigmoid, as DeepSeek-V3); only experts in the best `topk_groups` groups compete for top-k.
    Weights are the chosen experts' scores, renormalised to sum to 1 if `norm_topk_prob`, times `route_scale`.
    """
    N, E = scores.shape
    groups = cfg.num_groups
    candidates = scores
    if groups > 1 and cfg.topk_groups < groups:
        grouped = scores.view(N, groups, E // groups)  # (N, G, E/G)
        if cfg.score_func == "sigmoid" and E // groups >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        else:
            group_scores = grouped.amax(dim=-1)  # (N, G)
        kept = group_scores.topk(cfg.topk_groups, dim=-1).indices  # (N, topk_groups)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # (N, G)
        expert_mask = group_mask.repeat_interleave(E // groups, dim=1)  # (N, E)
        candidates = scores.masked_fill(~expert_mask, float("-inf"))
    indices = candidates.topk(cfg.top_k, dim=-1).indices  # (N, k)
    weights = scores.gather(1, indices)  # (N, k)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights * cfg.route_scale, indices


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor,
                        token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e and the per-expert token counts.

    probs (N, E): each token's routing distribution (rows sum to 1); indices (N, k): its chosen experts;
    token_mask (N,) bool: True for real tokens, padding counts in neither f nor P.
    f_e = share of the real tokens' k assignments that went to expert e, P_e = mean routing probability of e.
    Gradients flow through P only (f is a count). No host sync: padding is weighted out, not indexed out.
    """
    N, E = probs.shape
    k = indices.shape[1]
    real = probs.new_ones(N) if token_mask is None else token_mask.to(probs.dtype)  # (N,)
    counts = probs.new_zeros(E).scatter_add_(0, indices.reshape(-1), real.repeat_interleave(k))  # (E,)
    n_real = real.sum()
    f = counts / (n_real * k).clamp_min(1.0)  # (E,)
    P = (probs * real[:, None]).sum(dim=0) / n_real.clamp_min(1.0)  # (E,)
    return E * (f * P).sum(), counts.long()


class Router(nn.Module):
    """Linear gate -> per-expert scores -> group-limited top-k, computed in fp32 even under autocast."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Routing:
        """x (N, D); token_mask (N,) bool, True = real token (padding is routed but not counted in aux)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        if self.cfg.score_func == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)  # a distribution for the balance loss
        weights, indices = select_experts(scores, self.cfg)
        aux_loss, tokens_per_expert = load_balancing_loss(probs, indices, token_mask)
        return Routing(weights, indices, MoEAux(aux_loss, tokens_per_expert))


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; input rows arrive sorted by expert with `counts` rows each."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w in (self.w_gate, self.w_up, self.w_down):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) -> (M, D). Grouped GEMM (or its padded-bmm fallback), no loop
        over experts; `mmr1.moe_kernels.loop_swiglu` is the per-expert reference it is tested against."""
        from mmr1.moe_kernels import grouped_swiglu  # local import: keeps this module's header untouched

        return grouped_swiglu(x, counts, self.w_gate, self.w_up, self.w_down)


class MoEFeedForward(nn.Module):
    """Routed experts (top-k of E) + shared experts (always on). forward returns (out, MoEAux)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden)
        # n shared SwiGLU experts of width h sum to exactly one SwiGLU of width n * h, so keep one.
        self.shared = SwiGLU(dim, cfg.num_shared_experts * cfg.expert_hidden) if cfg.num_shared_experts else None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """x (B, L, D); token_mask (B, L) bool, True = real token. Returns out (B, L, D) and the aux stats."""
        B, L, D = x.shape
        flat = x.reshape(B * L, D)  # (N, D)
        routing = self.router(flat, None if token_mask is None else token_mask.reshape(B * L))
        k = self.cfg.top_k
        slot_experts = routing.indices.reshape(-1)  # (N*k,) expert of each (token, slot) assignment
        order = slot_experts.argsort(stable=True)  # assignments grouped by expert
        slot_tokens = order // k  # (N*k,) token of each sorted assignment
        counts = torch.bincount(slot_experts, minlength=self.cfg.num_experts)  # (E,) incl. padding: compute load
        expert_out = self.experts(flat[slot_tokens], counts)  # (N*k, D)
        expert_out = expert_out * routing.weights.reshape(-1)[order, None].to(expert_out.dtype)
        out = expert_out.new_zeros(B * L, D).index_add_(0, slot_tokens, expert_out)  # combine the k slots
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, L, D), routing.aux
