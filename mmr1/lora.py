"""LoRA through peft: `apply_lora(model, cfg)` adds low-rank adapters to the chosen parts of the backbone and
freezes the rest (encoders and projectors train or not as configured); `merge_lora(model)` folds the adapters
into the weights and gives back the plain MultimodalR1 (same parameter names as a model never adapted).
`select_trainable(model, patterns)` is the other way to train a part (staged recipes): by parameter-name regexes.

Targets (`LoRAConfig.targets`):
    attention         self-attention wq, wk, wv, wo of every block
    cross_attention   gated cross-attention wq, wkv, wo
    mlp               dense SwiGLU feed-forwards (gate/up/down)
    shared_experts    the always-on shared experts of MoE blocks
    routed_experts    the stacked (E, in, out) expert weights, through peft's `target_parameters` (one low-rank
                      pair per expert); peft requires lora dropout 0 there
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

TARGET_PATTERNS = {
    "attention": r"backbone\.layers\.\d+\.attn\.(wq|wk|wv|wo)",
    "cross_attention": r"backbone\.layers\.\d+\.cross_attn\.(wq|wkv|wo)",
    "mlp": r"backbone\.layers\.\d+\.ffn\.(gate_proj|up_proj|down_proj)",
    "shared_experts": r"backbone\.layers\.\d+\.ffn\.shared\.(gate_proj|up_proj|down_proj)",
}
ROUTED_EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp", "shared_experts"])
    train_encoders: bool = False  # False: encoders frozen (and in eval mode)
    train_projectors: bool = True
    train: list[str] = field(default_factory=list)  # regexes of further parameter names to keep trainable

    def __post_init__(self) -> None:
        known = [*TARGET_PATTERNS, "routed_experts"]
        unknown = [t for t in self.targets if t not in known]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets={self.targets}: expected a non-empty list of {known}")
        if self.r < 1:
            raise ValueError(f"lora.r={self.r}: expected an integer >= 1")
        if "routed_experts" in self.targets and self.dropout:
            raise ValueError("lora.dropout must be 0 when lora.targets has routed_experts: peft's parameter "
                             "adapters (target_parameters) cannot apply dropout to the input")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject peft LoRA adapters into `model` in place (returns it); only adapters (+ what cfg keeps) train."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = [TARGET_PATTERNS[t] for t in cfg.targets if t in TARGET_PATTERNS]
    params = []
    if "routed_experts" in cfg.targets:
        params = sorted({f"{name}.{p}" for name, module in model.named_modules()
                         if type(module).__name__ == "GroupedExperts" for p in ROUTED_EXPERT_PARAMS})
    if modules and not any(re.fullmatch("|".join(modules), n) for n, _ in model.named_modules()):
        raise ValueError(f"lora.targets={cfg.targets} match no module of this model")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules="|".join(modules) if modules else [], target_parameters=params or None)
    model = inject_adapter_in_model(peft_cfg, model)  # marks only the adapters trainable
    for name, param in model.named_parameters():
        if any(re.search(p, name) for p in cfg.train):
            param.requires_grad_(True)
    for key, encoder in model.encoders.items():
        encoder.set_frozen(not cfg.train_encoders)
        model.projectors[key].requires_grad_(cfg.train_projectors)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base layers back (in place; returns the model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer) and not isinstance(module, BaseTunerLayer):
                setattr(module, child_name, child.get_base_layer())
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def select_trainable(model: nn.Module, patterns: list[str]) -> nn.Module:
    """Train exactly the parameters whose name matches one of the regexes `patterns` (in place)."""
    matched = 0
    for name, param in model.named_parameters():
        train = any(re.search(p, name) for p in patterns)
        param.requires_grad_(train)
        matched += train
    if not matched:
        raise ValueError(f"model.trainable={patterns} matches no parameter name (names look like "
                         f"{[n for n, _ in model.named_parameters()][:3]})")
    for encoder in getattr(model, "encoders", {}).values():  # an encoder with nothing to train runs frozen
        if not any(p.requires_grad for p in encoder.parameters()):
            encoder.set_frozen(True)
    return model
