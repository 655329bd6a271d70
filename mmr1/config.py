"""Config dataclasses for the R1 backbone. Each serializes to a plain dict (JSON/YAML) and back."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


def config_to_dict(cfg: Any) -> dict:
    """A config dataclass as plain JSON-friendly data (nested dataclasses become dicts)."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: dict) -> Any:
    """Build `cls` from a dict, recursing into fields typed as config dataclasses.

    Unknown keys are an error that names the class and the key, so a typo in a YAML/JSON config never
    silently falls back to a default.
    """
    if data is None:
        return None
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        target = _dataclass_in(hints[key])
        kwargs[key] = config_from_dict(target, value) if target and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> Optional[type]:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):  # Optional[X] / X | None
        if dataclasses.is_dataclass(arg):
            return arg
    return None


@dataclass
class MoEConfig:
    """Fine-grained Mixture of Experts (DeepSeek-style): routed experts in groups plus shared experts."""

    num_experts: int = 128  # routed experts
    num_groups: int = 16  # experts are split into this many equal groups
    topk_groups: int = 4  # group-limited routing: only experts in the best `topk_groups` groups compete
    top_k: int = 2  # routed experts per token
    expert_hidden: int = 256  # width of each routed expert (fine-grained: narrower than a dense FFN)
    num_shared_experts: int = 1  # always-on experts, each `expert_hidden` wide
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    route_scale: float = 1.0
    aux_loss_coef: float = 0.01  # weight of the switch/GShard load-balancing loss in the training loss
    shared_expert_hidden: int = 0  # total width of the shared experts; 0 = num_shared_experts * expert_hidden
    shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(w . x) per token (Qwen2-MoE)
    # Dynamic activation: per token, experts in score order until their cumulative normalised probability
    # reaches `dynamic_threshold`, at least `min_k` (default 1) and at most `max_k` (default top_k) of them.
    # None: every token takes exactly `top_k`.
    dynamic_threshold: Optional[float] = None
    min_k: Optional[int] = None
    max_k: Optional[int] = None
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3's complementary per-sequence balance loss
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE): mean logsumexp(logits)^2
    # DeepSeek-V3 aux-loss-free balancing: a per-expert bias added to the scores only to choose experts,
    # nudged by `bias_update_rate` towards balance after every optimizer step.
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None  # None: dropless; else each expert keeps ceil(cf * N * k / E)

    def __post_init__(self) -> None:
        if self.num_experts % self.num_groups:
            raise ValueError(f"MoEConfig: num_experts={self.num_experts} not divisible by num_groups={self.num_groups}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"MoEConfig: topk_groups={self.topk_groups} must be in [1, num_groups={self.num_groups}]")
        per_group = self.num_experts // self.num_groups
        if not 1 <= self.top_k <= self.topk_groups * per_group:
            raise ValueError(f"MoEConfig: top_k={self.top_k} exceeds the experts in the kept groups")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEConfig: score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.shared_expert_hidden < 0:
            raise ValueError(f"MoEConfig: shared_expert_hidden={self.shared_expert_hidden} must be >= 0")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("MoEConfig: shared_expert_gate needs num_shared_experts >= 1")
        if self.dynamic_threshold is not None:
            if not 0.0 < self.dynamic_threshold <= 1.0:
                raise ValueError(f"MoEConfig: dynamic_threshold={self.dynamic_threshold} must be in (0, 1]")
            lo, hi = self.k_range
            if not 1 <= lo <= hi <= self.topk_groups * per_group:
                raise ValueError(f"MoEConfig: need 1 <= min_k={lo} <= max_k={hi} <= experts in the kept groups "
                                 f"({self.topk_groups * per_group})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig: capacity_factor={self.capacity_factor} must be positive (or None)")
        for name in ("seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig: {name}={getattr(self, name)} must be >= 0")

    @property
    def k_range(self) -> tuple[int, int]:
        """(fewest, most) routed experts a token can take."""
        if self.dynamic_threshold is None:
            return self.top_k, self.top_k
        return (1 if self.min_k is None else self.min_k), (self.top_k if self.max_k is None else self.max_k)

    @property
    def slots_per_token(self) -> int:
        """Static width of the routing tensors (N, slots); dynamic routing marks unused slots with -1."""
        return self.k_range[1]


ATTENTION_KINDS = ("full", "sliding", "hybrid")
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")


@dataclass
class RopeScaling:
    """RoPE context extension (the maths lives in mmr1.rope; names follow transformers' rope_parameters).

    linear: positions divided by `factor` (Chen et al. 2023, position interpolation).
    dynamic: NTK-aware base rescaling, theta' = theta * (factor * L / original - (factor - 1)) ** (D / (D - 2)),
        evaluated once at L = the model's max_seq_len (transformers re-evaluates it at the current length, which
        makes cached decoding disagree with a full forward; a fixed L keeps them identical).
    yarn: NTK-by-parts interpolation with a ramp between beta_fast and beta_slow rotations and cos/sin scaled by
        `attention_factor` (default 0.1 ln(factor) + 1) (Peng et al. 2023).
    """

    type: str = "linear"  # "linear" | "dynamic" | "yarn"
    factor: float = 1.0
    original_max_seq_len: Optional[int] = None  # pretraining context; dynamic and yarn need it
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None  # yarn: None = 0.1 * ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's correction range to whole dimensions (transformers' default)

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"RopeScaling: type={self.type!r}, expected one of {list(ROPE_SCALING_TYPES)}")
        if self.factor < 1.0:
            raise ValueError(f"RopeScaling: factor={self.factor} must be >= 1")
        if self.type in ("dynamic", "yarn") and not self.original_max_seq_len:
            raise ValueError(f"RopeScaling: type={self.type!r} needs original_max_seq_len (the pretraining context)")


@dataclass
class R1Config:
    """Decoder-only R1 backbone: RMSNorm, RoPE, GQA attention, MoE feed-forward, gated cross-attention."""

    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads must be a multiple of n_kv_heads
    ffn_hidden: int = 688  # dense SwiGLU width (dense layers and MoE-less models)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    moe: Optional[MoEConfig] = None  # None: every layer is dense
    first_k_dense: int = 1  # the first layers stay dense even when `moe` is set
    cross_attn_layers: list[int] = field(default_factory=list)  # block indices with gated cross-attention
    cross_attn_heads: int = 4
    # Width of the modality tokens the cross-attention layers read; None: `dim` (this model's own encoders and
    # projectors). A draft that reads its target's modality tokens sets the target's dim (mmr1.distill).
    cross_attn_memory_dim: Optional[int] = None
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2); the output projection has none
    # Long context (mmr1.local_attention). A layer is "full" (causal), "sliding" (each query sees the last
    # `window` positions) or "hybrid" (the first `local_heads` heads sliding, the others full causal).
    attention_pattern: str = "full"  # kind of every layer, except:
    global_every: int = 0  # > 0: layers i with (i + 1) % global_every == 0 are "full" ("every 4th layer full")
    layer_attention: Optional[list[str]] = None  # one kind per layer; overrides the two fields above
    window: int = 512  # keys a local query sees, itself included: positions (i - window, i]
    local_heads: int = 0  # hybrid layers: local query heads (a multiple of n_heads // n_kv_heads); 0 = half
    # hybrid layers' global heads: None = full causal; token ids (BOS, modality markers) = their window plus
    # every earlier occurrence of those tokens (Longformer-style global tokens; O(L * (window + #tokens))).
    global_tokens: Optional[list[int]] = None
    # ALiBi-style bias -slope_h * (query slot - key slot) on the global heads (every head of a full layer, the
    # full-causal heads of hybrid layers), slopes 2^(-8h/n) over their n heads: RoPE + relative-position mix.
    alibi_global: bool = False
    attention_block_size: int = 256  # query block of the blocked O(L * window) local attention
    rope_scaling: Optional[RopeScaling] = None  # None: plain RoPE

    @property
    def memory_width(self) -> int:
        """Width of the modality tokens the cross-attention layers read."""
        return self.cross_attn_memory_dim or self.dim

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"R1Config: dim={self.dim} not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"R1Config: n_heads={self.n_heads} not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.dim % self.cross_attn_heads:
            raise ValueError(f"R1Config: dim={self.dim} not divisible by cross_attn_heads={self.cross_attn_heads}")
        if self.cross_attn_memory_dim is not None and self.cross_attn_memory_dim <= 0:
            raise ValueError(f"R1Config: cross_attn_memory_dim must be > 0 or None, got {self.cross_attn_memory_dim}")
        bad = [i for i in self.cross_attn_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"R1Config: cross_attn_layers {bad} outside [0, n_layers={self.n_layers})")
        self._check_attention_pattern()

    def _check_attention_pattern(self) -> None:
        kinds = [self.attention_pattern] + list(self.layer_attention or [])
        bad = sorted({k for k in kinds if k not in ATTENTION_KINDS})
        if bad:
            raise ValueError(f"R1Config: attention kinds {bad} unknown (attention_pattern / layer_attention); "
                             f"expected {list(ATTENTION_KINDS)}")
        if self.layer_attention is not None and len(self.layer_attention) != self.n_layers:
            raise ValueError(f"R1Config: layer_attention has {len(self.layer_attention)} entries for "
                             f"n_layers={self.n_layers}")
        if self.global_every < 0:
            raise ValueError(f"R1Config: global_every={self.global_every} must be >= 0")
        if self.window < 1 or self.attention_block_size < 1:
            raise ValueError(f"R1Config: window={self.window} and attention_block_size="
                             f"{self.attention_block_size} must be >= 1")
        if self.global_tokens is not None and (not self.global_tokens or any(
                not isinstance(t, int) or not 0 <= t < self.vocab_size for t in self.global_tokens)):
            raise ValueError(f"R1Config: global_tokens={self.global_tokens} must be None or a non-empty list of token "
                             f"ids in [0, vocab_size={self.vocab_size})")
        if self.alibi_global and self.global_tokens is not None and "full" not in self.layer_kinds():
            raise ValueError("R1Config: alibi_global applies to full-causal global heads; with global_tokens only "
                             "full layers have them, and this schedule has none")
        group = self.n_heads // self.n_kv_heads
        if "hybrid" in self.layer_kinds():
            local = self.hybrid_local_heads
            if not 0 < local < self.n_heads or local % group:
                raise ValueError(f"R1Config: local_heads={local} must be in (0, n_heads={self.n_heads}) and a "
                                 f"multiple of n_heads // n_kv_heads = {group} (local and global heads must not "
                                 "share a key/value head)")

    def layer_kinds(self) -> list[str]:
        """The attention kind of every layer: "full" | "sliding" | "hybrid"."""
        if self.layer_attention is not None:
            return list(self.layer_attention)
        return ["full" if self.global_every and (i + 1) % self.global_every == 0 else self.attention_pattern
                for i in range(self.n_layers)]

    @property
    def hybrid_local_heads(self) -> int:
        return self.local_heads or self.n_heads // 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and index >= self.first_k_dense
