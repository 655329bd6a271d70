"""Fine-grained Mixture-of-Experts feed-forward (DeepSeekMoE / DeepSeek-V3 style).

Each token goes to `top_k` (or, with dynamic activation, between min_k and max_k) of `num_experts` narrow
SwiGLU experts, chosen by group-limited routing, plus `num_shared_experts` always-on experts. Balancing:
switch/GShard and sequence-wise aux losses, router z-loss, DeepSeek-V3's aux-loss-free selection bias, and an
optional capacity factor (default dropless). Dispatch sorts the (token, expert) assignments by expert so that each
expert runs one matmul over a contiguous block of tokens; the routed weights are stored stacked
(E, dim, hidden) so a grouped GEMM can replace the per-expert loop without changing the checkpoint layout.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmr1.config import MoEConfig
from mmr1.feedforward import SwiGLU
from mmr1.moe_kernels import grouped_swiglu, routed_swiglu


class MoEAux:
    """What an MoE layer reports besides its output: balance losses and routing telemetry, each computed when first
    read. Training reads them; inference (the engine, generate) never does and so never pays for them -- about
    three quarters of the router's operators, which dominate a small batch's layer on a GPU. Losses are unweighted
    (the trainer applies the coefs) and carry gradients; the rest is detached. Counts are over real tokens only.

        aux_loss              () switch/GShard load-balancing loss; 1.0 when perfectly balanced
        tokens_per_expert     (E,) assignments the router chose per expert (before capacity drops)
        seq_aux_loss          () DeepSeek-V3 per-sequence balance loss, mean over sequences
        z_loss                () mean over real tokens of logsumexp(router logits)^2
        expert_indices        (N, slots) long, experts that ran; -1 = unused or dropped slot
        token_mask            (N,) bool, True = real token; None = all real
        router_entropy        () mean entropy (nats) of the routing distribution
        mean_experts_per_token  () experts chosen per real token (before drops)
        dropped_tokens        () long, real (token, expert) assignments dropped by capacity
        layer_idx             the decoder block this layer sits in (set by the backbone), for telemetry
    """

    def __init__(self, probs: torch.Tensor, logits: torch.Tensor, chosen: torch.Tensor, indices: torch.Tensor,
                 token_mask: torch.Tensor | None, seq_len: int, dropped_tokens: torch.Tensor | None = None):
        self._probs, self._logits, self._chosen, self._seq_len = probs, logits, chosen, seq_len  # (N, E), (N, E), (N, k)
        self.expert_indices = indices.detach()
        self.token_mask = token_mask
        self._dropped = dropped_tokens
        self.layer_idx: int | None = None

    @property
    def dropped_tokens(self) -> torch.Tensor:
        if self._dropped is None:  # no capacity limit
            self._dropped = torch.zeros((), dtype=torch.long, device=self.expert_indices.device)
        return self._dropped

    @functools.cached_property
    def _balance(self) -> tuple[torch.Tensor, torch.Tensor]:
        return load_balancing_loss(self._probs, self._chosen, self.token_mask)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._balance[0]

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return self._balance[1]

    @functools.cached_property
    def seq_aux_loss(self) -> torch.Tensor:
        return sequence_balance_loss(self._probs, self._chosen, self.token_mask, self._seq_len)

    @functools.cached_property
    def z_loss(self) -> torch.Tensor:
        return router_z_loss(self._logits, self.token_mask)

    @functools.cached_property
    def router_entropy(self) -> torch.Tensor:
        with torch.no_grad():
            real = _real_weights(self.token_mask, self._probs.shape[0], self._probs)
            return (torch.special.entr(self._probs).sum(dim=-1) * real).sum() / real.sum().clamp_min(1.0)

    @functools.cached_property
    def mean_experts_per_token(self) -> torch.Tensor:
        with torch.no_grad():
            real = _real_weights(self.token_mask, self._probs.shape[0], self._probs)
            return ((self._chosen >= 0).sum(dim=-1) * real).sum() / real.sum().clamp_min(1.0)


@dataclass
class Routing:
    weights: torch.Tensor  # (N, slots) fp32 combine weights of the chosen experts; 0 in unused slots
    indices: torch.Tensor  # (N, slots) chosen expert ids; -1 in unused slots
    aux: MoEAux


def group_limited_mask(scores: torch.Tensor, cfg: MoEConfig) -> torch.Tensor | None:
    """(N, E) bool, True for experts in each token's best `topk_groups` groups; None when all groups stay.

    A group scores its best expert (softmax) or the sum of its best two (sigmoid, as DeepSeek-V3).
    """
    N, E = scores.shape
    groups = cfg.num_groups
    if groups == 1 or cfg.topk_groups == groups:
        return None
    grouped = scores.view(N, groups, E // groups)  # (N, G, E/G)
    if cfg.score_func == "sigmoid" and E // groups >= 2:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
    else:
        group_scores = grouped.amax(dim=-1)  # (N, G)
    kept = group_scores.topk(cfg.topk_groups, dim=-1).indices  # (N, topk_groups)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # (N, G)
    return group_mask.repeat_interleave(E // groups, dim=1)  # (N, E)


def select_experts(scores: torch.Tensor, cfg: MoEConfig,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k over router scores (N, E) -> weights, indices (N, slots).

    Only experts in the best `topk_groups` groups compete. `bias` (E,) (aux-loss-free balancing) shifts the
    scores used to *choose* groups and experts; the weights are always the chosen experts' unbiased scores,
    renormalised to sum to 1 if `norm_topk_prob`, times `route_scale`.
    Fixed routing takes `top_k` experts. Dynamic routing (`dynamic_threshold`) takes experts in choice order
    until the cumulative probability (scores normalised over the token's allowed experts) reaches the
    threshold, clamped to [min_k, max_k]; the slots it leaves unused hold index -1 and weight 0.
    """
    choice = scores if bias is None else scores + bias
    allowed = group_limited_mask(choice, cfg)
    candidates = choice if allowed is None else choice.masked_fill(~allowed, float("-inf"))
    indices = candidates.topk(cfg.slots_per_token, dim=-1).indices  # (N, slots) in choice order
    weights = scores.gather(1, indices)  # (N, slots)
    if cfg.dynamic_threshold is not None:
        allowed_mass = scores if allowed is None else scores.masked_fill(~allowed, 0.0)
        probs = weights / allowed_mass.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # (N, slots)
        mass_before = probs.cumsum(dim=-1) - probs  # exclusive: a slot is taken while the threshold is unmet
        min_k, max_k = cfg.k_range
        taken = (mass_before < cfg.dynamic_threshold).sum(dim=-1).clamp(min_k, max_k)  # (N,)
        used = torch.arange(max_k, device=scores.device) < taken[:, None]  # (N, slots)
        indices = indices.masked_fill(~used, -1)
        weights = weights.masked_fill(~used, 0.0)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights * cfg.route_scale, indices


def _real_weights(token_mask: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """(n,) 1.0 for real tokens, 0.0 for padding, in `like`'s dtype."""
    return like.new_ones(n) if token_mask is None else token_mask.to(like.dtype)


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor,
                        token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e and the per-expert token counts.

    probs (N, E): each token's routing distribution (rows sum to 1); indices (N, k): its chosen experts
    (-1 = unused slot); token_mask (N,) bool: True for real tokens, padding counts in neither f nor P.
    f_e = share of the real tokens' assignments that went to expert e, P_e = mean routing probability of e.
    Gradients flow through P only (f is a count). No host sync: padding is weighted out, not indexed out.
    """
    N, E = probs.shape
    real = _real_weights(token_mask, N, probs)  # (N,)
    assigned = real[:, None] * (indices >= 0).to(probs.dtype)  # (N, k)
    counts = probs.new_zeros(E).scatter_add_(0, indices.clamp_min(0).reshape(-1), assigned.reshape(-1))  # (E,)
    n_real = real.sum()
    f = counts / assigned.sum().clamp_min(1.0)  # (E,)
    P = (probs * real[:, None]).sum(dim=0) / n_real.clamp_min(1.0)  # (E,)
    return E * (f * P).sum(), counts.long()


def sequence_balance_loss(probs: torch.Tensor, indices: torch.Tensor, token_mask: torch.Tensor | None,
                          seq_len: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss: the load-balancing loss computed within each
    sequence (consecutive `seq_len` rows of probs (N, E) / indices (N, k)), averaged over the sequences that
    have a real token. Keeps any single sequence from piling onto a few experts."""
    N, E = probs.shape
    B = N // seq_len
    real = _real_weights(token_mask, N, probs)  # (N,)
    per_seq = seq_len * indices.shape[1]  # explicit, not -1: a rank may hold no sequence at all (B = 0)
    assigned = (real[:, None] * (indices >= 0).to(probs.dtype)).view(B, per_seq)  # (B, L*k)
    counts = probs.new_zeros(B, E).scatter_add_(1, indices.clamp_min(0).view(B, per_seq), assigned)  # (B, E)
    f = counts / assigned.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, E)
    n_real = real.view(B, seq_len).sum(dim=1)  # (B,)
    P = (probs * real[:, None]).view(B, seq_len, E).sum(dim=1) / n_real.clamp_min(1.0)[:, None]  # (B, E)
    has_real = (n_real > 0).to(probs.dtype)
    return (E * (f * P).sum(dim=1) * has_real).sum() / has_real.sum().clamp_min(1.0)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2; keeps router logits small (fp32-safe)."""
    real = _real_weights(token_mask, logits.shape[0], logits)
    z = torch.logsumexp(logits, dim=-1).square()  # (N,)
    return (z * real).sum() / real.sum().clamp_min(1.0)


def apply_capacity(weights: torch.Tensor, indices: torch.Tensor, capacity_factor: float, num_experts: int,
                   token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ceil(capacity_factor * A / E) assignments per expert, A = the real assignments (N * k for
    fixed top-k); within an expert the highest weights win, ties go to the earlier token. Dropped and padding
    assignments become index -1 / weight 0. Returns weights, indices (N, k) and the dropped real count ().
    """
    N, k = indices.shape
    E = num_experts
    real = torch.ones(N, dtype=torch.bool, device=indices.device) if token_mask is None else token_mask
    live = (indices >= 0) & real[:, None]  # (N, k) assignments that compete for capacity
    capacity = torch.ceil(live.sum().double() * capacity_factor / E)  # () tensor: no host sync
    expert = indices.where(live, E).reshape(-1)  # (N*k,) non-competing slots go to an overflow bin E
    by_weight = weights.reshape(-1).argsort(descending=True, stable=True)
    order = by_weight[expert[by_weight].argsort(stable=True)]  # grouped by expert, best weight first
    sorted_expert = expert[order]
    per_expert = torch.bincount(sorted_expert, minlength=E + 1)  # (E+1,)
    first = per_expert.cumsum(0) - per_expert  # (E+1,) where each expert's run starts
    rank = torch.arange(N * k, device=indices.device) - first[sorted_expert]  # place within its expert
    keep = torch.empty_like(live.reshape(-1)).scatter_(0, order, (sorted_expert < E) & (rank < capacity))
    keep = keep.view(N, k)
    dropped = (live & ~keep).sum()
    return weights.masked_fill(~keep, 0.0), indices.masked_fill(~keep, -1), dropped


class Router(nn.Module):
    """Linear gate -> per-expert scores -> group-limited top-k, computed in fp32 even under autocast."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        if cfg.aux_free_bias:
            # A buffer, not a parameter: no gradient, changed only by `update_bias`; persistent so checkpoints,
            # state_dicts and safetensors exports carry it.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
                ) -> Routing:
        """x (N, D); token_mask (N,) bool, True = real token (padding is routed but not counted in aux);
        seq_len: rows per sequence for the sequence-wise loss (default: the N rows are one sequence)."""
        N = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        if self.cfg.score_func == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)  # a distribution for the balance losses
        weights, indices = select_experts(scores, self.cfg, self.expert_bias if self.cfg.aux_free_bias else None)
        chosen, dropped = indices, None
        if self.cfg.capacity_factor is not None:
            weights, indices, dropped = apply_capacity(weights, indices, self.cfg.capacity_factor,
                                                       self.cfg.num_experts, token_mask)
        aux = MoEAux(probs, logits, chosen, indices, token_mask, seq_len or N, dropped)
        return Routing(weights, indices, aux)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): bias_e += rate * sign(mean load - load_e), so
        overloaded experts become less likely to be chosen and idle ones more. tokens_per_expert (E,)."""
        load = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(self.cfg.bias_update_rate * torch.sign(load.mean() - load))


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; input rows arrive sorted by expert with `counts` rows each."""

    def __init__(self, num_experts: int, dim: int, hidden: int, kernel: str | None = None):
        super().__init__()
        # None picks the fastest kernel per call (moe_kernels.kernel_choice); "mkl", "grouped" or "padded" forces
        # one (benchmarks compare them inside one layer).
        self.kernel = kernel
        self.w_gate = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w in (self.w_gate, self.w_up, self.w_down):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, flat: torch.Tensor, slot_experts: torch.Tensor, slot_weights: torch.Tensor, *,
                has_unused: bool = False) -> torch.Tensor:
        """flat (N, D) tokens, slot_experts / slot_weights (N*k,) each (token, slot) assignment's expert
        (num_experts = unused) and weight -> (N, D): dispatch, experts and weighted combine, no loop over experts
        (mmr1.moe_kernels.routed_swiglu). The whole computation is this module's forward so that wrappers of
        its weights (peft's LoRA parameter adapters) see every use of them."""
        return routed_swiglu(flat, slot_experts, slot_weights, self.w_gate, self.w_up, self.w_down,
                             has_unused=has_unused, path=self.kernel)

    def sorted_rows(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) rows already sorted by expert, counts (E,) -> (M, D) (grouped GEMM or its padded fallback;
        `mmr1.moe_kernels.loop_swiglu` is the per-expert reference)."""
        return grouped_swiglu(x, counts, self.w_gate, self.w_up, self.w_down)


class MoEFeedForward(nn.Module):
    """Routed experts (top-k of E) + shared experts (always on). forward returns (out, MoEAux)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden)
        # n shared SwiGLU experts of width h sum to exactly one SwiGLU of width n * h, so keep one.
        shared_hidden = cfg.shared_expert_hidden or cfg.num_shared_experts * cfg.expert_hidden
        self.shared = SwiGLU(dim, shared_hidden) if cfg.num_shared_experts else None
        # Qwen2-MoE lets each token scale the shared experts' contribution by a sigmoid gate.
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """x (B, L, D); token_mask (B, L) bool, True = real token. Returns out (B, L, D) and the aux stats."""
        B, L, D = x.shape
        flat = x.reshape(B * L, D)  # (N, D)
        routing = self.router(flat, None if token_mask is None else token_mask.reshape(B * L), seq_len=L)
        E = self.cfg.num_experts
        slot_experts = routing.indices.reshape(-1)  # (N*k,) expert of each (token, slot) assignment
        skips_slots = self.cfg.dynamic_threshold is not None or self.cfg.capacity_factor is not None
        if skips_slots:
            slot_experts = slot_experts.where(slot_experts >= 0, E)  # unused/dropped slots sort last
        out = self.experts(flat, slot_experts, routing.weights.reshape(-1), has_unused=skips_slots)  # (N, D)
        if self.shared is not None:
            shared = self.shared(flat)  # (N, D)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared  # (N, 1) gate per token
            out = out + shared
        return out.view(B, L, D), routing.aux
