"""Modality encoders: the plug-in point for new input types.

`create_encoder(name, **kwargs)` builds any registered encoder: the built-ins below, or a third-party one
declared in the `mmr1.encoders` entry-point group of an installed package (see `encoders.registry`).
"""
from encoders.base import ModalityEncoder, ModalityProcessor
from encoders.registry import create_encoder, list_encoders, register_encoder

# Imported for their @register_encoder side effect: the built-ins are always available by name.
from encoders.clip_vit import ClipViTEncoder, ImageProcessor  # noqa: E402
from encoders.wav2vec2 import AudioProcessor, Wav2Vec2Encoder  # noqa: E402

__all__ = [
    "ModalityEncoder", "ModalityProcessor", "register_encoder", "create_encoder", "list_encoders",
    "ClipViTEncoder", "Wav2Vec2Encoder", "ImageProcessor", "AudioProcessor",
]
