"""Expert telemetry: how each MoE layer spreads its tokens over experts, per layer and per modality group.

What a training step must hand over (duck-typed, see `MoELayerRouting`): `training_step` returns a dict with
`"loss"` and `"moe_aux"`, a list with one routing record per MoE layer. From a record and the batch we compute,
per layer and per token group (text-only / image-conditioned / audio-conditioned ...):

    tokens per expert (E,), imbalance = max / mean over experts (1.0 = perfectly balanced),
    mean experts per token, dropped tokens, router entropy.

`ExpertTelemetry` (a Lightning callback) accumulates these over `every_n_steps` optimizer steps, logs them to
the trainer's loggers, saves a layers x experts load heatmap PNG, and warns once per layer about a dead expert
(no tokens for `dead_after_steps` steps) or a collapsed router (one expert takes > `collapse_share` of the load).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import torch
from lightning.pytorch import Callback

MOE_OUTPUTS_KEY = "moe_aux"  # key of the per-layer routing records in the dict `training_step` returns
TEXT_GROUP = "text"  # tokens of samples that carry no modality
LAYER_GROUP = "all"  # every real token of the layer


class MoELayerRouting(Protocol):
    """One MoE layer's routing of one batch; N = B * L tokens in row-major (b, t) order.

    Required:
        expert_indices (N, k_max) long: the experts that processed each token; -1 marks a slot without one
            (not activated by dynamic routing, or dropped by the capacity limit).
        token_mask (N,) bool or None: False = padding (routed, but not counted). None: every token is real.
        router_entropy (): mean routing entropy over the real tokens.
        mean_experts_per_token (): experts chosen per real token, on average.
        dropped_tokens (): int, dropped by the capacity limit (0 when dropless).
    Optional (looked up with getattr):
        layer_idx: int, the block index, used to name the layer ("layer{idx}"); default: position in the list.
        num_experts: int, routed experts E; default: len(tokens_per_expert), else the callback's num_experts.
        token_entropy (N,) float: per-token routing entropy; needed for per-group entropy.
        token_dropped (N,) int/bool: per-token dropped assignments; needed for per-group dropped counts.
    """

    expert_indices: torch.Tensor
    token_mask: Optional[torch.Tensor]
    router_entropy: torch.Tensor
    mean_experts_per_token: torch.Tensor
    dropped_tokens: torch.Tensor


class ExpertTelemetryWarning(UserWarning):
    """A router that stopped using some experts, or that sends most tokens to one."""


# ---- pure statistics --------------------------------------------------------------------------------------
def tokens_per_expert(expert_indices: torch.Tensor, num_experts: int,
                      token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, k) expert ids (-1 = empty slot), (N,) bool mask -> (E,) long: assignments each expert received."""
    used = expert_indices >= 0  # (N, k)
    if token_mask is not None:
        used = used & token_mask.bool()[:, None]
    # Empty and masked-out slots are sent to a spill bin E that is cut off afterwards (no boolean indexing,
    # so no host sync).
    bins = torch.where(used, expert_indices, torch.full_like(expert_indices, num_experts))
    return torch.bincount(bins.reshape(-1), minlength=num_experts + 1)[:num_experts]


def load_imbalance(load: torch.Tensor) -> torch.Tensor:
    """(E,) tokens per expert -> () max / mean; 1.0 is perfectly balanced, E means one expert takes all.
    NaN when no expert received a token."""
    load = load.double()
    return load.max() / load.mean()


def experts_per_token(expert_indices: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """() mean count of non-empty slots over the selected tokens; NaN when no token is selected."""
    slots = (expert_indices >= 0).sum(dim=1).double()  # (N,)
    weight = torch.ones_like(slots) if token_mask is None else token_mask.double()  # (N,)
    return (slots * weight).sum() / weight.sum()


@dataclass
class RoutingStats:
    """Additive routing counts for one layer and one token group (over one batch, or summed over several).

    Sums, not means, so batches of different sizes combine exactly. `dropped` / `entropy_sum` are None when the
    routing records do not carry the per-token values a group needs.
    """

    load: torch.Tensor  # (E,) long, assignments per expert
    tokens: torch.Tensor  # () long, real tokens
    expert_slots: torch.Tensor  # () float, sum over tokens of experts per token
    dropped: Optional[torch.Tensor]  # () float, dropped tokens
    entropy_sum: Optional[torch.Tensor]  # () float, sum over tokens of router entropy

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        def add(a, b):
            return None if a is None or b is None else a + b
        return RoutingStats(self.load + other.load, self.tokens + other.tokens,
                            self.expert_slots + other.expert_slots, add(self.dropped, other.dropped),
                            add(self.entropy_sum, other.entropy_sum))

    def summary(self) -> dict[str, float]:
        """Plain floats for logging (one host sync); entries that are undefined are left out."""
        tokens = int(self.tokens)
        out = {"tokens": float(tokens)}
        if tokens == 0:
            return out
        out["imbalance"] = float(load_imbalance(self.load))
        out["max_share"] = float(self.load.max()) / max(1, int(self.load.sum()))
        out["idle_experts"] = float((self.load == 0).sum())
        out["experts_per_token"] = float(self.expert_slots) / tokens
        if self.dropped is not None:
            out["dropped_tokens"] = float(self.dropped)
        if self.entropy_sum is not None:
            out["router_entropy"] = float(self.entropy_sum) / tokens
        return {k: v for k, v in out.items() if math.isfinite(v)}


def _real_tokens(routing: MoELayerRouting) -> torch.Tensor:
    n = routing.expert_indices.shape[0]
    mask = routing.token_mask
    return torch.ones(n, dtype=torch.bool, device=routing.expert_indices.device) if mask is None else mask.bool()


def layer_stats(routing: MoELayerRouting, num_experts: int) -> RoutingStats:
    """All real tokens of one layer; experts per token, entropy and drops are the layer's own reported values."""
    indices, real = routing.expert_indices.detach(), _real_tokens(routing)
    tokens = real.sum()

    def scalar(value: Any) -> torch.Tensor:
        return torch.as_tensor(value, device=indices.device).detach().double()
    return RoutingStats(load=tokens_per_expert(indices, num_experts, real), tokens=tokens,
                        expert_slots=scalar(routing.mean_experts_per_token) * tokens,
                        dropped=scalar(routing.dropped_tokens),
                        entropy_sum=scalar(routing.router_entropy) * tokens)


def group_stats(routing: MoELayerRouting, num_experts: int, group_mask: torch.Tensor) -> RoutingStats:
    """The real tokens of one layer that are in `group_mask` (N,) bool.

    Experts per token here counts the experts that processed the token (non-empty slots), since a layer reports
    its chosen-experts mean for the whole batch only. Drops and entropy need the optional per-token fields.
    """
    indices = routing.expert_indices.detach()
    selected = _real_tokens(routing) & group_mask.to(indices.device).bool()  # (N,)
    weight = selected.double()
    token_dropped = getattr(routing, "token_dropped", None)
    token_entropy = getattr(routing, "token_entropy", None)
    return RoutingStats(
        load=tokens_per_expert(indices, num_experts, selected), tokens=selected.sum(),
        expert_slots=((indices >= 0).sum(dim=1).double() * weight).sum(),
        dropped=None if token_dropped is None else (token_dropped.detach().double() * weight).sum(),
        entropy_sum=None if token_entropy is None else (token_entropy.detach().double() * weight).sum())


def token_groups(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Which real tokens of a collated batch belong to which modality group: {name: (B, L) bool}.

    "text": tokens of samples that carry no modality; one group per modality key present in the batch, holding
    the tokens of the samples conditioned on it. Groups overlap on purpose: a sample with an image and an audio
    clip counts in both the image and the audio group (each group answers "how are tokens routed when this
    modality is in context"), so one label per token cannot hold them and each group gets its own mask.
    Padding (attention_mask False) is in no group.
    """
    real = batch["attention_mask"].bool()  # (B, L)
    conditioned = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)  # (B,)
    groups = {}
    for key, modality in (batch.get("modalities") or {}).items():
        if key in (TEXT_GROUP, LAYER_GROUP):
            raise ValueError(f"modality key {key!r} clashes with the telemetry group of the same name")
        present = modality["present"].to(real.device).bool()  # (B,)
        conditioned |= present
        groups[key] = real & present[:, None]
    return {TEXT_GROUP: real & ~conditioned[:, None], **groups}


# ---- heatmap -------------------------------------------------------------------------------------------------
def save_load_heatmap(loads: Mapping[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """{layer name: (E,) load} -> PNG of layers x experts, each row divided by its mean (1.0 = balanced)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(loads)
    width = max(int(v.numel()) for v in loads.values())
    grid = torch.full((len(names), width), float("nan"), dtype=torch.float64)
    for row, name in enumerate(names):
        load = loads[name].detach().double().cpu()
        grid[row, :load.numel()] = load / load.mean().clamp_min(1e-12)
    fig = Figure(figsize=(min(24.0, 3.0 + 0.08 * width), 1.5 + 0.35 * len(names)))
    FigureCanvasAgg(fig)  # render with Agg, independent of pyplot's global backend
    ax = fig.add_subplot()
    image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="load / mean load")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# ---- the callback ---------------------------------------------------------------------------------------------
class ExpertTelemetry(Callback):
    """Logs per-layer and per-modality routing statistics every `every_n_steps` optimizer steps.

    Metrics are `moe/{layer}/{stat}` for all real tokens and `moe/{layer}/{group}/{stat}` per modality group,
    with stat in imbalance, max_share, idle_experts, experts_per_token, dropped_tokens, router_entropy, tokens,
    averaged or summed over the window since the previous log. Heatmaps go to
    `{trainer.log_dir}/expert_load/step{step:07d}.png`. Dead-expert and collapse checks run at each log.
    Statistics are those of this process's batches (no cross-process reduction); logs, heatmaps and warnings
    come from rank zero.
    """

    def __init__(self, every_n_steps: int = 50, heatmap: bool = True, dead_after_steps: int = 200,
                 collapse_share: float = 0.5, num_experts: Optional[int] = None):
        if every_n_steps < 1 or dead_after_steps < 1:
            raise ValueError(f"ExpertTelemetry: every_n_steps={every_n_steps} and "
                             f"dead_after_steps={dead_after_steps} must be >= 1")
        if not 0.0 < collapse_share < 1.0:
            raise ValueError(f"ExpertTelemetry: collapse_share={collapse_share} must be in (0, 1)")
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        self.dead_after_steps = dead_after_steps
        self.collapse_share = collapse_share
        self.num_experts = num_experts
        self._window: dict[str, dict[str, RoutingStats]] = {}  # layer -> group -> stats since the last log
        self._last_seen: dict[str, torch.Tensor] = {}  # layer -> (E,) last step at which each expert got a token
        self._warned: set[tuple[str, str]] = set()  # (layer, "dead" | "collapsed")
        self._last_logged_step = -1
        self.last_metrics: dict[str, float] = {}
        self.heatmap_paths: list[Path] = []

    def _experts_of(self, routing: MoELayerRouting) -> int:
        declared = getattr(routing, "num_experts", None)
        counts = getattr(routing, "tokens_per_expert", None)
        num = declared or (counts.numel() if counts is not None else None) or self.num_experts
        if not num:
            raise ValueError("ExpertTelemetry: cannot tell the number of experts; pass num_experts= or give the "
                             "routing records a num_experts / tokens_per_expert field")
        return int(num)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(outputs, Mapping) or not outputs.get(MOE_OUTPUTS_KEY):
            return
        step = trainer.global_step
        groups = {name: mask.reshape(-1) for name, mask in token_groups(batch).items()}  # name -> (N,)
        for position, routing in enumerate(outputs[MOE_OUTPUTS_KEY]):
            self._accumulate(layer_name(routing, position), routing, groups, step)
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._flush(trainer, step)

    def _accumulate(self, layer: str, routing: MoELayerRouting, groups: Mapping[str, torch.Tensor],
                    step: int) -> None:
        num_experts = self._experts_of(routing)
        window = self._window.setdefault(layer, {})
        batch_stats = {LAYER_GROUP: layer_stats(routing, num_experts)}
        batch_stats.update({name: group_stats(routing, num_experts, mask) for name, mask in groups.items()})
        for name, stats in batch_stats.items():
            window[name] = stats if name not in window else window[name] + stats
        load = batch_stats[LAYER_GROUP].load
        # Before its first batch every expert counts as last seen one step earlier.
        last_seen = self._last_seen.get(layer, torch.full_like(load, step - 1))
        self._last_seen[layer] = torch.where(load > 0, torch.full_like(load, step), last_seen)

    def _flush(self, trainer, step: int) -> None:
        metrics, loads = {}, {}
        for layer, groups in self._window.items():
            loads[layer] = groups[LAYER_GROUP].load
            for group, stats in groups.items():
                prefix = f"moe/{layer}" if group == LAYER_GROUP else f"moe/{layer}/{group}"
                metrics.update({f"{prefix}/{k}": v for k, v in stats.summary().items()})
            self._check_router(layer, groups[LAYER_GROUP].load, step)
        self._window = {}
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        # trainer.log_dir broadcasts from rank 0 under DDP: every rank must ask, or rank 0 waits forever.
        log_dir = trainer.log_dir if self.heatmap and loads else None
        if self.heatmap and loads and trainer.is_global_zero:
            path = Path(log_dir or trainer.default_root_dir) / "expert_load" / f"step{step:07d}.png"
            self.heatmap_paths.append(save_load_heatmap(loads, path, title=f"expert load, step {step}"))

    def _check_router(self, layer: str, window_load: torch.Tensor, step: int) -> None:
        silent = step - self._last_seen[layer]  # (E,) steps since each expert last got a token
        dead = (silent >= self.dead_after_steps).nonzero().flatten().tolist()
        if dead and (layer, "dead") not in self._warned:
            self._warned.add((layer, "dead"))
            _warn(f"MoE {layer}: expert(s) {dead} received no tokens for {self.dead_after_steps} or more steps "
                  f"(dead experts, step {step})")
        total = int(window_load.sum())
        top = int(window_load.argmax())
        share = float(window_load[top]) / max(1, total)
        if total and share > self.collapse_share and (layer, "collapsed") not in self._warned:
            self._warned.add((layer, "collapsed"))
            _warn(f"MoE {layer}: expert {top} took {share:.0%} of the layer's assignments over the last "
                  f"{self.every_n_steps} steps (> {self.collapse_share:.0%}: collapsed router, step {step})")

    def state_dict(self) -> dict[str, Any]:
        # Warn once per layer across a resumed run too; the rest is a rolling window and can restart empty.
        return {"warned": sorted(self._warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = {tuple(item) for item in state_dict.get("warned", [])}


def layer_name(routing: Any, position: int) -> str:
    """"layer{block index}" when the record knows its block, else "moe{position among the MoE layers}"."""
    index = getattr(routing, "layer_idx", None)
    return f"moe{position}" if index is None else f"layer{index}"


def _warn(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(message, category=ExpertTelemetryWarning)


__all__: Sequence[str] = ["MoELayerRouting", "ExpertTelemetry", "ExpertTelemetryWarning", "RoutingStats",
                          "tokens_per_expert", "load_imbalance", "experts_per_token", "layer_stats",
                          "group_stats", "token_groups", "save_load_heatmap", "layer_name"]
