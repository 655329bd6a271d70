"""MultimodalR1: modality encoders -> projectors (+ modality-type embeddings) -> R1 backbone with gated
cross-attention. One config dataclass (`MultimodalConfig`) describes the whole model; `save_pretrained` writes
`config.json` + `model.safetensors` + `tokenizer.json`, `from_pretrained` reads them back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_model, save_model
from torch import nn

import encoders as encoder_registry
from encoders.base import ModalityEncoder, ModalityProcessor
from fusion.projector import ProjectorConfig, build_projector
from mmr1.backbone import R1Model, R1Output
from mmr1.config import R1Config, config_from_dict, config_to_dict
from mmr1.sdpa import attention_backends
from mmr1.tokenizer import R1Tokenizer

CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"


@dataclass
class EncoderConfig:
    """One modality branch. The key of this config in `MultimodalConfig.encoders` is the modality key used in
    manifests and in `Pipeline(..., key=input)`."""

    name: str  # registry name: "clip_vit", "wav2vec2", or a plug-in's entry-point name
    kwargs: dict = field(default_factory=dict)  # passed to encoders.create_encoder(name, **kwargs)
    freeze: bool = False
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class TokenSource:
    """For a model without encoders whose cross-attention reads another model's modality tokens (a draft distilled
    with modality_tokens: teacher): which model that was, and the fingerprint of what made its tokens
    (`MultimodalR1.modality_fingerprint`), so the engine can tell a draft paired with another target."""

    model: str  # the teacher's directory, as the training config named it
    fingerprint: str


@dataclass
class MultimodalConfig:
    backbone: R1Config = field(default_factory=R1Config)
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)
    token_source: Optional[TokenSource] = None

    def to_dict(self) -> dict:
        data = {"backbone": config_to_dict(self.backbone),
                "encoders": {k: config_to_dict(v) for k, v in self.encoders.items()}}
        if self.token_source is not None:  # absent otherwise: exports of other models read as they always did
            data["token_source"] = config_to_dict(self.token_source)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MultimodalConfig":
        unknown = sorted(set(data) - {"backbone", "encoders", "token_source"})
        if unknown:
            raise ValueError(f"MultimodalConfig: unknown field(s) {unknown}; expected 'backbone', 'encoders' and "
                             f"(optionally) 'token_source'")
        encoders = {k: v if isinstance(v, EncoderConfig) else config_from_dict(EncoderConfig, v)
                    for k, v in (data.get("encoders") or {}).items()}
        backbone = data.get("backbone") or {}
        if not isinstance(backbone, R1Config):
            backbone = config_from_dict(R1Config, backbone)
        source = data.get("token_source")
        if source is not None and not isinstance(source, TokenSource):
            source = config_from_dict(TokenSource, source)
        return cls(backbone=backbone, encoders=encoders, token_source=source)


def foreign_tokens_hint(backbone: R1Config, modalities: list[str], source: Optional[TokenSource] = None) -> str:
    """For an input error: why a model without encoders whose cross-attention reads another model's modality tokens
    (a draft distilled with modality_tokens: teacher) takes no image or audio itself, and, when it recorded its
    teacher (`source`), which target to run it with; "" for any other model."""
    if modalities or (backbone.cross_attn_memory_dim is None and source is None):
        return ""
    target = (f"; it was distilled from {source.model}: Pipeline.from_pretrained({source.model!r}, draft=<its "
              f"directory>)" if source is not None else "")
    return (f" (it has no encoders: its cross-attention reads another model's modality tokens, width "
            f"{backbone.memory_width}; a speculative draft distilled with modality_tokens: teacher runs as "
            f"Engine(target, ..., draft=<it>){target})")


def build_encoder(key: str, cfg: EncoderConfig) -> ModalityEncoder:
    encoder = encoder_registry.create_encoder(cfg.name, **cfg.kwargs)
    if not isinstance(encoder, ModalityEncoder):
        raise TypeError(f"encoder {cfg.name!r} for {key!r} is a {type(encoder).__name__}, not a ModalityEncoder")
    # The config key names the modality, so one encoder class can serve several keys.
    encoder.modality = key
    encoder.processor.modality = key
    encoder.set_frozen(cfg.freeze)
    return encoder


class MultimodalR1(nn.Module):
    def __init__(self, config: MultimodalConfig):
        super().__init__()
        self.config = config
        dim = config.backbone.dim
        if config.encoders and not config.backbone.cross_attn_layers:
            raise ValueError("MultimodalConfig: encoders are configured but backbone.cross_attn_layers is empty, "
                             "so the backbone could never see them")
        memory_dim = config.backbone.cross_attn_memory_dim
        if config.encoders and memory_dim not in (None, dim):
            raise ValueError(f"MultimodalConfig: backbone.cross_attn_memory_dim={memory_dim} but the encoders' "
                             f"projectors give tokens of width dim={dim}; a model with its own encoders reads "
                             f"width dim (set cross_attn_memory_dim only for a draft that reads its target's tokens)")
        self.encoders = nn.ModuleDict({k: build_encoder(k, c) for k, c in config.encoders.items()})
        self.projectors = nn.ModuleDict({k: build_projector(c.projector, self.encoders[k].output_dim, dim)
                                         for k, c in config.encoders.items()})
        self.modality_embeddings = nn.ParameterDict({k: nn.Parameter(torch.zeros(dim)) for k in config.encoders})
        self.backbone = R1Model(config.backbone)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders.keys())

    def processors(self) -> dict[str, ModalityProcessor]:
        return {k: enc.processor for k, enc in self.encoders.items()}

    def modality_fingerprint(self) -> str:
        """A hash of everything that makes this model's modality tokens (encoders, projectors, modality
        embeddings: names, shapes, values rounded to bf16, so an fp32 model and its bf16 copy agree). The backbone
        is left out: fine-tuning it keeps the tokens a draft reads. "" for a model without encoders."""
        if not self.encoders:
            return ""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            if name.startswith(("encoders.", "projectors.", "modality_embeddings.")):
                digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
                values = tensor.detach().to("cpu")
                if values.is_floating_point():
                    values = values.to(torch.bfloat16).view(torch.int16)  # numpy has no bf16
                digest.update(values.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---- encoding and fusion ----------------------------------------------------------------------
    def encode_modality(self, key: str, values: torch.Tensor, mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality's collated inputs -> backbone-width tokens (N, T, dim) and token mask (N, T)."""
        encoder = self.encoders[key]
        device = self.modality_embeddings[key].device  # processors collate on the CPU (data workers, engine queues)
        values, mask = values.to(device), None if mask is None else mask.to(device)
        with (torch.set_grad_enabled(torch.is_grad_enabled() and not getattr(encoder, "frozen", False)),
              attention_backends(device)):
            tokens, token_mask = encoder(values, mask)  # (N, T, enc_dim), (N, T)
        tokens, token_mask = self.projectors[key](tokens, token_mask)  # (N, T', dim)
        return tokens + self.modality_embeddings[key].to(tokens.dtype), token_mask

    def fuse(self, encoded: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch_size: int
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scatter each modality's tokens to the batch rows that carry it and concatenate along T.

        encoded: {key: (tokens (N, T, D), mask (N, T), present (B,) bool)} -> (B, sum T, D), (B, sum T).
        Rows that lack a modality get zero tokens with mask False there.
        """
        states, masks = [], []
        for key in self.modalities:
            if key not in encoded:
                continue
            tokens, mask, present = encoded[key]
            full = tokens.new_zeros(batch_size, tokens.shape[1], tokens.shape[2])
            full_mask = mask.new_zeros(batch_size, mask.shape[1])
            full[present] = tokens
            full_mask[present] = mask
            states.append(full)
            masks.append(full_mask)
        if not states:
            return None, None
        return torch.cat(states, dim=1), torch.cat(masks, dim=1)

    def encode_batch(self, modalities: Mapping[str, Mapping[str, torch.Tensor]], batch_size: int,
                     encode_absent: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The collated `batch["modalities"]` of the data pipeline -> cross-attention states and mask.

        encode_absent: also run every modality the batch lacks, on its processor's `dummy_input()`, and the
            cross-attention layers on a masked-out memory token when the batch has no modality at all; the
            results enter as exact zeros (`0 * output`), so the outputs are bit-identical but every trainable
            parameter takes part in the graph. Data-parallel ranks whose batches carry different modality sets
            then run the same modules -- hence the same collectives (FSDP all-gathers, DDP gradient buckets) in
            the same order -- and every parameter gets a gradient (zero where the modality was absent).
        """
        unknown = [key for key in modalities if key not in self.encoders]
        if unknown:
            raise KeyError(f"batch carries modality {unknown[0]!r} but the model has encoders for {self.modalities}")
        encoded, anchor = {}, None
        for key in self.modalities:  # one fixed order on every rank
            if key in modalities:
                item = modalities[key]
                tokens, mask = self.encode_modality(key, item["values"], item.get("mask"))
                encoded[key] = (tokens, mask, item["present"])
            elif encode_absent:
                zero = self._zero_contribution(key)
                anchor = zero if anchor is None else anchor + zero
        cross_states, cross_mask = self.fuse(encoded, batch_size)
        if not encode_absent or not self.config.backbone.cross_attn_layers:
            return cross_states, cross_mask
        if cross_states is None:  # text only: one memory token that every row masks out (cross-attn outputs 0)
            device = self.backbone.tok_embeddings.weight.device
            cross_states = torch.zeros(batch_size, 1, self.config.backbone.dim, device=device)  # (B, 1, D)
            cross_mask = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)  # (B, 1)
        if anchor is not None:
            cross_states = cross_states + anchor.to(cross_states.dtype)  # x + 0.0 == x, bit for bit
        return cross_states, cross_mask

    def _zero_contribution(self, key: str) -> torch.Tensor:
        """() an exact 0 computed from `key`'s encoder + projector on one dummy input."""
        processor = self.encoders[key].processor
        batch = processor.collate([processor.dummy_input()])
        tokens, _ = self.encode_modality(key, batch["values"], batch.get("mask"))
        return tokens.float().sum() * 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                modalities: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
                encode_absent: bool = False) -> R1Output:
        cross_states, cross_mask = self.encode_batch(modalities or {}, input_ids.shape[0], encode_absent)
        return self.backbone(input_ids, attention_mask=attention_mask, cross_states=cross_states,
                             cross_mask=cross_mask)

    # ---- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer: R1Tokenizer) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.export_config()
        (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        save_model(self, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "mmr1"})
        tokenizer.save(directory / TOKENIZER_NAME)
        return directory

    def export_config(self) -> MultimodalConfig:
        """The config to rebuild this model without its original pretrained sources: an encoder that knows how
        (`architecture_kwargs()`) replaces its kwargs so loading needs only the exported directory."""
        encoders = {}
        for key, cfg in self.config.encoders.items():
            arch = getattr(self.encoders[key], "architecture_kwargs", None)
            kwargs = arch() if callable(arch) else dict(cfg.kwargs)
            encoders[key] = dataclasses.replace(cfg, kwargs=kwargs)
        return MultimodalConfig(backbone=self.config.backbone, encoders=encoders,
                                token_source=self.config.token_source)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu"
                        ) -> tuple["MultimodalR1", R1Tokenizer]:
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not an mmr1 model directory: {name} is missing "
                                        f"(expected {CONFIG_NAME}, {WEIGHTS_NAME}, {TOKENIZER_NAME})")
        config = MultimodalConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        load_model(model, str(directory / WEIGHTS_NAME), strict=True, device=str(map_location))
        model.eval()
        return model, R1Tokenizer.from_file(directory / TOKENIZER_NAME)
