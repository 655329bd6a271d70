"""Import Hugging Face transformers checkpoints (Llama, Qwen2, Mixtral, Qwen2-MoE) into the R1 backbone, exactly.

    load_hf_checkpoint(dir) = R1Model(r1_config_from_hf(config)) + convert_hf_state_dict(load_safetensors_dir(dir))

The four families are the R1 block with different names: pre-norm RMSNorm, rotate-half RoPE, GQA attention with
1/sqrt(head_dim) scaling, SwiGLU MLPs. The differences that matter map onto R1Config / MoEConfig fields:
- Qwen2 (and Qwen2-MoE with `qkv_bias`) put biases on q/k/v               -> R1Config.attention_bias
- Mixtral routes softmax over all experts, top-k, renormalised             -> one group, norm_topk_prob=True
- Qwen2-MoE: softmax top-k, renormalised iff `norm_topk_prob`; one shared expert of its own width whose output
  is scaled by sigmoid(shared_expert_gate . x)                             -> shared_expert_hidden/_gate
- Qwen2-MoE's `mlp_only_layers` / `decoder_sparse_step` choose the MoE layers -> first_k_dense when a prefix.
- RoPE scaling "linear" and "yarn"                                       -> R1Config.rope_scaling (mmr1.rope)
Anything else that would change the function computed (other rope scaling, sliding windows in use, other attention
types, biases R1 lacks, other activations, a head_dim that isn't hidden/heads, unknown model types) raises
UnsupportedHFCheckpoint naming the config key and value: an import is exact or it doesn't happen.

Training-only settings are not carried over: mmr1's load-balancing loss is per layer (balanced = 1.0) while
transformers pools the routers of all layers, so `router_aux_loss_coef` is copied as the coefficient but the
two losses are not the same number.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

from mmr1.config import MoEConfig, R1Config, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mixtral", "qwen2_moe")


class UnsupportedHFCheckpoint(ValueError):
    """A transformers checkpoint that the R1 backbone cannot reproduce exactly."""


def _refuse(model_type: str, key: str, value: Any, why: str) -> UnsupportedHFCheckpoint:
    return UnsupportedHFCheckpoint(f"from_hf: cannot import this {model_type} checkpoint exactly: "
                                   f"{key}={value!r} ({why})")


# ---- config ---------------------------------------------------------------------------------------------------

def read_hf_config(local_dir: str | Path) -> Any:
    """config.json of a local checkpoint -> its transformers config object (defaults filled in by transformers).

    The model_type is checked from the raw JSON first, so an unknown one is refused before transformers is asked.
    """
    path = Path(local_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"from_hf: no config.json in {local_dir}")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedHFCheckpoint(f"from_hf: model_type={model_type!r} is not supported; "
                                      f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    from transformers import AutoConfig  # only needed here; mmr1 itself doesn't depend on transformers
    return AutoConfig.from_pretrained(str(local_dir))


def _check_attention(hf: Any, model_type: str, max_seq_len: int) -> None:
    """Refuse every attention/RoPE setting whose math differs from R1's full causal attention with its RoPE."""
    _rope_scaling(hf, model_type)  # refuses RoPE variants R1 can't reproduce
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim != hf.hidden_size // hf.num_attention_heads:
        raise _refuse(model_type, "head_dim", head_dim,
                      f"R1 uses hidden_size / num_attention_heads = {hf.hidden_size // hf.num_attention_heads}")
    if getattr(hf, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise _refuse(model_type, "partial_rotary_factor", hf.partial_rotary_factor, "R1 rotates the whole head")
    layer_types = getattr(hf, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise _refuse(model_type, "layer_types", layer_types, f"R1 has only full attention, not {other}")
    if model_type == "mixtral":  # Mixtral windows every layer whenever sliding_window is set
        window = hf.sliding_window
        if window is not None and window < max_seq_len:
            raise _refuse(model_type, "sliding_window", window,
                          f"a window shorter than max_seq_len={max_seq_len} is sliding-window attention")
    if getattr(hf, "attention_dropout", 0.0):
        raise _refuse(model_type, "attention_dropout", hf.attention_dropout, "R1 has no attention dropout")
    if model_type == "llama":  # Llama's attention_bias also covers o_proj, which R1 doesn't have
        for key in ("attention_bias", "mlp_bias"):
            if getattr(hf, key, False):
                raise _refuse(model_type, key, getattr(hf, key), "R1 has no such biases")


# RoPE types R1 reproduces exactly (mmr1.rope, checked against transformers in tests/test_long_context_rope.py) and
# the rope_parameters keys each may carry. transformers' "dynamic" re-derives its frequencies from the current
# sequence length, which R1's fixed tables (and cached decoding) don't, so it is refused.
_ROPE_KEYS = {"default": set(), "linear": {"factor"},
              "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                       "truncate"}}


def _rope_scaling(hf: Any, model_type: str) -> RopeScaling | None:
    """transformers 5 folds legacy `rope_theta` / `rope_scaling` keys into `rope_parameters` when it reads a config."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise _refuse(model_type, "rope_parameters.rope_type", rope_type,
                      f"R1 reproduces only {sorted(_ROPE_KEYS)} RoPE")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"} - _ROPE_KEYS[rope_type])
    if extra:
        raise _refuse(model_type, "rope_parameters", rope, f"keys {extra} change RoPE and are not supported")
    if rope_type == "default":
        return None
    if rope.get("factor") is None:
        raise _refuse(model_type, "rope_parameters.factor", None, "R1 needs an explicit scaling factor")
    if rope_type == "linear":
        return RopeScaling(type="linear", factor=float(rope["factor"]))
    return RopeScaling(type="yarn", factor=float(rope["factor"]),
                       original_max_seq_len=int(rope["original_max_position_embeddings"]),
                       beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                       attention_factor=rope.get("attention_factor"), truncate=bool(rope.get("truncate", True)))


def _moe_layers(hf: Any, model_type: str) -> list[bool]:
    """Which decoder layers have a sparse MoE block, following each family's modeling code."""
    n = hf.num_hidden_layers
    if model_type == "mixtral":
        return [True] * n
    if model_type == "qwen2_moe":
        return [i not in hf.mlp_only_layers and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
                for i in range(n)]
    return [False] * n


def _moe_config(hf: Any, model_type: str) -> MoEConfig:
    if model_type == "mixtral":
        return MoEConfig(num_experts=hf.num_local_experts, num_groups=1, topk_groups=1,
                         top_k=hf.num_experts_per_tok, expert_hidden=hf.intermediate_size, num_shared_experts=0,
                         score_func="softmax", norm_topk_prob=True, route_scale=1.0,
                         aux_loss_coef=hf.router_aux_loss_coef)
    shared = hf.shared_expert_intermediate_size
    if shared <= 0:
        raise _refuse(model_type, "shared_expert_intermediate_size", shared, "expected a shared expert")
    return MoEConfig(num_experts=hf.num_experts, num_groups=1, topk_groups=1, top_k=hf.num_experts_per_tok,
                     expert_hidden=hf.moe_intermediate_size, num_shared_experts=1, shared_expert_hidden=shared,
                     shared_expert_gate=True, score_func="softmax", norm_topk_prob=bool(hf.norm_topk_prob),
                     route_scale=1.0, aux_loss_coef=hf.router_aux_loss_coef)


def r1_config_from_hf(hf: Any, max_seq_len: int | None = None) -> R1Config:
    """A transformers config (llama / qwen2 / mixtral / qwen2_moe) -> the R1Config computing the same function.

    max_seq_len defaults to max_position_embeddings (R1 precomputes its RoPE tables up to it).
    """
    model_type = hf.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedHFCheckpoint(f"from_hf: model_type={model_type!r} is not supported; "
                                      f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    max_seq_len = max_seq_len or hf.max_position_embeddings
    if hf.hidden_act != "silu":
        raise _refuse(model_type, "hidden_act", hf.hidden_act, "R1's MLPs are SwiGLU (silu)")
    _check_attention(hf, model_type, max_seq_len)
    if model_type == "mixtral" and hf.router_jitter_noise:
        raise _refuse(model_type, "router_jitter_noise", hf.router_jitter_noise, "R1's router has no jitter")

    moe_layers = _moe_layers(hf, model_type)
    first_k_dense = moe_layers.index(True) if any(moe_layers) else hf.num_hidden_layers
    if moe_layers != [i >= first_k_dense for i in range(hf.num_hidden_layers)]:
        keys = {k: getattr(hf, k) for k in ("mlp_only_layers", "decoder_sparse_step") if hasattr(hf, k)}
        raise _refuse(model_type, " / ".join(keys), tuple(keys.values()),
                      f"MoE layers {[i for i, m in enumerate(moe_layers) if m]} are not 'all layers from some k on', "
                      "which is all R1's first_k_dense can express")
    qkv_bias = {"qwen2": True, "qwen2_moe": bool(getattr(hf, "qkv_bias", True))}.get(model_type, False)
    return R1Config(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads, ffn_hidden=hf.intermediate_size,
        max_seq_len=max_seq_len, rope_theta=float(hf.rope_parameters["rope_theta"]), norm_eps=hf.rms_norm_eps,
        moe=_moe_config(hf, model_type) if any(moe_layers) else None, first_k_dense=first_k_dense,
        cross_attn_layers=[], cross_attn_heads=hf.num_attention_heads, tie_embeddings=bool(hf.tie_word_embeddings),
        dropout=0.0, attention_bias=qkv_bias, rope_scaling=_rope_scaling(hf, model_type))


# ---- weights --------------------------------------------------------------------------------------------------

def load_safetensors_dir(local_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json. Pickled
    checkpoints (pytorch_model.bin) are never unpickled: convert them to safetensors first."""
    from safetensors.torch import load_file

    root = Path(local_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in root.glob("*.bin"))
        hint = f" (found {pickles}: pickled weights are not loaded, save them as safetensors)" if pickles else ""
        raise FileNotFoundError(f"from_hf: no model.safetensors or model.safetensors.index.json in {root}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(root / name)))
    return tensors


def _taker(tensors: dict[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """take(key) pops a checkpoint tensor, so that whatever is left over at the end was not understood."""
    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise KeyError(f"from_hf: the checkpoint has no tensor {key!r}")
        return tensors.pop(key)
    return take


def _expert_weights(tensors: dict, take: Callable, moe: str, num_experts: int) -> dict[str, torch.Tensor]:
    """Routed experts -> R1's stacked w_gate/w_up (E, D, H) and w_down (E, H, D).

    transformers 5 holds them fused, gate_up_proj (E, 2H, D) with gate rows first and down_proj (E, D, H), and
    by default saves them back per expert: Mixtral's w1 (gate), w3 (up), w2 (down), Qwen2-MoE's gate/up/down_proj,
    each an nn.Linear weight (out, in). Both layouts are read.
    """
    if f"{moe}experts.gate_up_proj" in tensors:
        gate_up = take(f"{moe}experts.gate_up_proj")  # (E, 2H, D)
        gate, up = gate_up.chunk(2, dim=1)  # (E, H, D) each
        down = take(f"{moe}experts.down_proj")  # (E, D, H)
    else:
        names = ("w1", "w3", "w2") if f"{moe}experts.0.w1.weight" in tensors else ("gate_proj", "up_proj", "down_proj")
        gate, up, down = (torch.stack([take(f"{moe}experts.{e}.{name}.weight") for e in range(num_experts)])
                          for name in names)  # (E, H, D), (E, H, D), (E, D, H)
    return {"w_gate": gate.transpose(1, 2), "w_up": up.transpose(1, 2), "w_down": down.transpose(1, 2)}


def convert_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: R1Config) -> dict[str, torch.Tensor]:
    """A transformers *ForCausalLM state dict (consumed) -> R1Model state dict names and layouts.

    Raises when a tensor R1 needs is missing or when the checkpoint holds tensors R1 would ignore.
    """
    tensors = dict(tensors)
    take = _taker(tensors)
    out = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # usually dropped on save; the embedding is the head either way
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[f"{dst}attn_norm.weight"] = take(f"{src}input_layernorm.weight")
        out[f"{dst}ffn_norm.weight"] = take(f"{src}post_attention_layernorm.weight")
        for theirs, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            out[f"{dst}attn.{ours}.weight"] = take(f"{src}self_attn.{theirs}.weight")
            if cfg.attention_bias and ours != "wo":
                out[f"{dst}attn.{ours}.bias"] = take(f"{src}self_attn.{theirs}.bias")
        if cfg.is_moe_layer(i):
            # Mixtral checkpoints name the block `block_sparse_moe`, transformers 5 modules name it `mlp`.
            moe = f"{src}block_sparse_moe." if f"{src}block_sparse_moe.gate.weight" in tensors else f"{src}mlp."
            out[f"{dst}ffn.router.gate.weight"] = take(f"{moe}gate.weight")  # (E, D)
            for name, w in _expert_weights(tensors, take, moe, cfg.moe.num_experts).items():
                out[f"{dst}ffn.experts.{name}"] = w
            if cfg.moe.num_shared_experts:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{dst}ffn.shared.{proj}.weight"] = take(f"{moe}shared_expert.{proj}.weight")
            if cfg.moe.shared_expert_gate:
                out[f"{dst}ffn.shared_gate.weight"] = take(f"{moe}shared_expert_gate.weight")  # (1, D)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{dst}ffn.{proj}.weight"] = take(f"{src}mlp.{proj}.weight")
    if tensors:
        raise UnsupportedHFCheckpoint(f"from_hf: the checkpoint holds tensors R1 has no place for: "
                                      f"{sorted(tensors)[:8]}{' ...' if len(tensors) > 8 else ''}")
    return out


def load_hf_weights(model, local_dir: str | Path) -> None:
    """Copy a transformers checkpoint's weights into an R1Model built from its config (r1_config_from_hf), which
    may add cross-attention layers: those, and buffers R1 keeps on its own, keep their init; every other
    parameter must come from the checkpoint with the same shape."""
    state = convert_hf_state_dict(load_safetensors_dir(local_dir), model.cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in state.items():
        if key in params and tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"from_hf: {key} has shape {tuple(value.shape)} in {local_dir}, the model expects "
                             f"{tuple(params[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing_params = sorted(k for k in set(missing) & set(params) if ".cross_attn." not in k)
    if missing_params or unexpected:
        raise ValueError(f"from_hf: conversion mismatch, missing {missing_params[:8]}, unexpected {unexpected[:8]}")


def load_hf_checkpoint(local_dir: str | Path, max_seq_len: int | None = None):
    """A local transformers checkpoint directory (config.json + safetensors) -> an R1Model in fp32, eval mode."""
    from mmr1.backbone import R1Model

    model = R1Model(r1_config_from_hf(read_hf_config(local_dir), max_seq_len=max_seq_len))
    load_hf_weights(model, local_dir)
    return model.eval()


# ---- a multimodal model starting from a transformers backbone -------------------------------------------------

# What a multimodal model may choose on top of an imported backbone: cross-attention layers are new (gates start at
# 0, so text behaves exactly as the checkpoint), and the rest doesn't change the weights' function.
MULTIMODAL_FIELDS = ("cross_attn_layers", "cross_attn_heads", "max_seq_len", "dropout")


def backbone_config_from_hf(local_dir: str | Path, requested: R1Config | None, tokenizer_vocab_size: int) -> R1Config:
    """The backbone of a multimodal model initialised from a transformers checkpoint.

    Architecture from the checkpoint; MULTIMODAL_FIELDS from `requested`. A requested architecture field that was
    changed from its R1Config default and disagrees with the checkpoint is an error (never silently replaced),
    and so is a tokenizer with more ids than the checkpoint's embedding table (ids must mean the same tokens:
    use the tokenizer the checkpoint was trained with, extended with mmr1's special tokens within its vocab).
    """
    requested = requested or R1Config()
    chosen = {name: getattr(requested, name) for name in MULTIMODAL_FIELDS}
    cfg = r1_config_from_hf(read_hf_config(local_dir), max_seq_len=chosen["max_seq_len"])
    defaults = R1Config()
    conflicts = {f.name: (getattr(requested, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(R1Config)
                 if f.name not in MULTIMODAL_FIELDS + ("vocab_size",)
                 and getattr(requested, f.name) != getattr(defaults, f.name)
                 and getattr(requested, f.name) != getattr(cfg, f.name)}
    if conflicts:
        raise ValueError(f"init_from_hf={local_dir}: backbone fields disagree with the checkpoint "
                         f"(requested, checkpoint): {conflicts}; leave them out, the checkpoint defines them")
    if tokenizer_vocab_size > cfg.vocab_size:
        raise ValueError(f"init_from_hf={local_dir}: the tokenizer has {tokenizer_vocab_size} ids (modality markers "
                         f"included) but the checkpoint's vocab_size is {cfg.vocab_size}; the tokenizer must be the "
                         "checkpoint's own (ids mean the same tokens) and fit its embedding table")
    return dataclasses.replace(cfg, **chosen)
