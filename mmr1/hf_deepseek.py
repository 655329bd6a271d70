"""DeepSeek-V3's MoE block (transformers `DeepseekV3MoE`) as an mmr1 `MoEFeedForward`, exactly.

DeepSeek-V3 routes with sigmoid scores, picks groups by the sum of their two best (bias-corrected) scores, picks
experts by the bias-corrected scores but weights them with the uncorrected ones, renormalises and scales by
`routed_scaling_factor`, and adds always-on shared experts. That is mmr1's MoE with `score_func="sigmoid"`,
`aux_free_bias=True` (the correction bias is mmr1's `expert_bias`), `route_scale=routed_scaling_factor`.
"""
from __future__ import annotations

from typing import Any

import torch

from mmr1.config import MoEConfig
from mmr1.hf_interop import UnsupportedHFCheckpoint
from mmr1.moe import MoEFeedForward


def moe_config_from_deepseek_v3(hf: Any) -> MoEConfig:
    """MoEConfig for the routed + shared experts of a transformers DeepseekV3Config."""
    if hf.hidden_act != "silu":
        raise UnsupportedHFCheckpoint(f"deepseek_v3: hidden_act={hf.hidden_act!r}; mmr1's experts are SwiGLU (silu)")
    return MoEConfig(num_experts=hf.n_routed_experts, num_groups=hf.n_group, topk_groups=hf.topk_group,
                     top_k=hf.num_experts_per_tok, expert_hidden=hf.moe_intermediate_size,
                     num_shared_experts=hf.n_shared_experts, score_func="sigmoid",
                     norm_topk_prob=hf.norm_topk_prob, route_scale=hf.routed_scaling_factor, aux_free_bias=True)


def convert_deepseek_v3_moe_state_dict(tensors: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """A `DeepseekV3MoE` state dict (gate.*, experts.*, shared_experts.*) -> `MoEFeedForward` names and layout."""
    hidden = cfg.expert_hidden
    gate_up = tensors["experts.gate_up_proj"]  # (E, 2H, D): gate rows, then up rows
    if gate_up.shape[1] != 2 * hidden:
        raise UnsupportedHFCheckpoint(f"deepseek_v3: experts.gate_up_proj has shape {tuple(gate_up.shape)}, "
                                      f"expected (E, {2 * hidden}, D)")
    converted = {
        "router.gate.weight": tensors["gate.weight"],
        "router.expert_bias": tensors["gate.e_score_correction_bias"],
        "experts.w_gate": gate_up[:, :hidden].transpose(1, 2).contiguous(),  # (E, D, H)
        "experts.w_up": gate_up[:, hidden:].transpose(1, 2).contiguous(),  # (E, D, H)
        "experts.w_down": tensors["experts.down_proj"].transpose(1, 2).contiguous(),  # (E, H, D)
    }
    for name in ("gate_proj", "up_proj", "down_proj"):
        converted[f"shared.{name}.weight"] = tensors[f"shared_experts.{name}.weight"]
    return converted


def moe_from_deepseek_v3(block: torch.nn.Module, hf_config: Any) -> MoEFeedForward:
    """A new `MoEFeedForward` computing what `block` (a transformers DeepseekV3MoE) computes."""
    cfg = moe_config_from_deepseek_v3(hf_config)
    moe = MoEFeedForward(hf_config.hidden_size, cfg)
    state = convert_deepseek_v3_moe_state_dict({k: v.detach() for k, v in block.state_dict().items()}, cfg)
    moe.load_state_dict(state, strict=True)
    return moe
