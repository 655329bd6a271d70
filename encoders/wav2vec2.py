"""wav2vec 2.0 audio encoder: transformers' Wav2Vec2Model -> frame tokens with a frame mask.

A batch is right-padded waveforms plus a sample mask; the model's convolutional front end turns samples into
frames (50 per second for the standard conv stack) and the frame mask is derived from each clip's length with
transformers' own output-length arithmetic. With `feat_extract_norm="layer"` (the default for models built
here, and e.g. wav2vec2-large-lv60) padding never changes the tokens of the real frames, so a clip encodes the
same alone or in a batch. "group"-norm models (e.g. wav2vec2-base) were trained without an attention mask:
as transformers recommends, they get zero padding and no attention mask, and their tokens depend slightly on
the padding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import Wav2Vec2Config, Wav2Vec2Model

from data_pipelines.audio import load_audio
from data_pipelines.errors import InputError
from encoders.base import ModalityEncoder, ModalityProcessor
from encoders.registry import register_encoder

# SpecAugment time masking and LayerDrop are regularisers for fine-tuning a pretrained model; from scratch they
# destabilise early training, and LayerDrop leaves whole layers without gradients (a DDP error). Off unless the
# `config` argument turns them back on.
TRAINING_DEFAULTS = {"mask_time_prob": 0.0, "layerdrop": 0.0}

# Why "layer": per-frame LayerNorm in the conv front end keeps padding from leaking into real frames.
FROM_SCRATCH_DEFAULTS = {"feat_extract_norm": "layer"}


class AudioProcessor(ModalityProcessor):
    """Audio -> mono float32 `(S,)` at `sample_rate`, zero-mean unit-variance per clip when `normalize`.

    Clips shorter than `min_samples` (the encoder's receptive field: one frame) are rejected; clips longer
    than `max_seconds` are rejected by `load_audio`, never truncated. `collate` right-pads with zeros.
    """

    def __init__(self, sample_rate: int = 16000, max_seconds: float | None = 30.0, normalize: bool = True,
                 min_samples: int = 1, modality: str = "audio"):
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.normalize = normalize
        self.min_samples = min_samples
        self.modality = modality

    def load(self, source: Any) -> torch.Tensor:
        waveform = load_audio(source, target_sr=self.sample_rate, max_seconds=self.max_seconds)  # (S,)
        if waveform.numel() < self.min_samples:
            name = str(source) if isinstance(source, (str, Path)) else "<waveform tuple>"
            raise InputError(f"audio is {waveform.numel()} samples ({1000 * waveform.numel() / self.sample_rate:.1f}"
                             f" ms) at {self.sample_rate} Hz; the encoder needs at least {self.min_samples} samples "
                             f"({1000 * self.min_samples / self.sample_rate:.1f} ms) to produce one frame",
                             source=name)
        return waveform

    def preprocess(self, waveform: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return waveform
        # The same normalisation as transformers' Wav2Vec2FeatureExtractor (do_normalize=True).
        return (waveform - waveform.mean()) / torch.sqrt(waveform.var(correction=0) + 1e-7)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([item.shape[0] for item in items])  # (N,)
        values = pad_sequence(items, batch_first=True)  # (N, S), zero padded on the right
        mask = torch.arange(values.shape[1])[None, :] < lengths[:, None]  # (N, S)
        return {"values": values, "mask": mask}

    def dummy_input(self) -> torch.Tensor:
        return torch.zeros(self.min_samples)  # (S,) silence, just long enough for one frame


@register_encoder("wav2vec2")
class Wav2Vec2Encoder(ModalityEncoder):
    """Waveforms `(B, S)` + sample mask -> `last_hidden_state` `(B, frames, hidden)` + frame mask `(B, frames)`.

    pretrained: a local directory written by `save_pretrained` (config.json + safetensors weights).
    config: Wav2Vec2Config keyword arguments; without `pretrained` they define a model trained from scratch,
        with `pretrained` they override the saved config (e.g. {"mask_time_prob": 0.05}).
    Padded frames' tokens are zero.
    """

    def __init__(self, pretrained: str | None = None, config: dict | None = None, modality: str = "audio",
                 freeze: bool = False, sample_rate: int = 16000, max_seconds: float | None = 30.0,
                 normalize: bool = True):
        super().__init__()
        overrides = {**TRAINING_DEFAULTS, **(config or {})}
        if pretrained is not None:
            if not Path(pretrained).is_dir():
                raise FileNotFoundError(f"wav2vec2 pretrained={str(pretrained)!r} is not a directory; expected a "
                                        "local directory written by Wav2Vec2Model.save_pretrained")
            self.model = Wav2Vec2Model.from_pretrained(pretrained, local_files_only=True, **overrides)
        elif config is not None:
            self.model = Wav2Vec2Model(Wav2Vec2Config(**{**FROM_SCRATCH_DEFAULTS, **overrides}))
        else:
            raise ValueError("Wav2Vec2Encoder needs pretrained (a local model directory) or config "
                             "(Wav2Vec2Config arguments for a model trained from scratch)")
        cfg = self.model.config
        self.modality = modality
        self.output_dim = cfg.output_hidden_size if cfg.add_adapter else cfg.hidden_size
        self.uses_attention_mask = cfg.feat_extract_norm == "layer"
        self.processor = AudioProcessor(sample_rate, max_seconds, normalize, _receptive_field(cfg), modality)
        self.set_frozen(freeze)

    def architecture_kwargs(self) -> dict:
        """Arguments that rebuild this model without its pretrained directory (an export loads the weights)."""
        p = self.processor
        config = {k: v for k, v in self.model.config.to_diff_dict().items() if k != "transformers_version"}
        return {"pretrained": None, "config": config, "modality": self.modality,
                "sample_rate": p.sample_rate, "max_seconds": p.max_seconds, "normalize": p.normalize}

    def forward(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # values: (B, S) waveforms; mask: (B, S) bool, True on real samples (right padding), or None.
        attention_mask = mask.long() if mask is not None and self.uses_attention_mask else None
        tokens = self.model(values.to(self.model.dtype), attention_mask=attention_mask).last_hidden_state  # (B, F, D)
        if mask is None:
            frame_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, F)
            return tokens, frame_mask
        frame_mask = self.model._get_feature_vector_attention_mask(tokens.shape[1], mask.long())  # (B, F) bool
        return tokens.masked_fill(~frame_mask[..., None], 0.0), frame_mask


def _receptive_field(config: Wav2Vec2Config) -> int:
    """Samples needed for one output frame of the conv feature extractor."""
    samples = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        samples = (samples - 1) * stride + kernel
    return samples
