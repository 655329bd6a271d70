"""Audio loading: a file or an in-memory `(waveform, sample_rate)` -> mono float32 `(T,)` at the target rate.

Files are read with soundfile (WAV, FLAC, OGG, ...), channels are averaged to mono and the rate converted with
torchaudio. Audio is never truncated: a clip over `max_seconds` is an error, checked from the header before
the samples are decoded.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from data_pipelines.errors import InputError

# Integer PCM arrays are scaled to [-1, 1) by their full-scale value.
_PCM_SCALE = {np.dtype(np.int16): 2.0 ** 15, np.dtype(np.int32): 2.0 ** 31}


def load_audio(source: Any, *, target_sr: int = 16000, max_seconds: float | None = None) -> torch.Tensor:
    """Load `source` as a mono float32 waveform `(T,)` sampled at `target_sr`.

    `source` is a path (str/Path) or a tuple `(waveform, sample_rate)` with a numpy array or torch tensor:
    1-D is mono, 2-D has channels on the smaller axis. Raises `InputError` naming the source on a missing,
    empty, corrupt or unsupported file, zero-length audio, NaN/inf samples, a bad sample rate, or audio longer
    than `max_seconds`.
    """
    if not isinstance(target_sr, numbers.Integral) or isinstance(target_sr, bool) or target_sr <= 0:
        raise ValueError(f"target_sr must be a positive integer, got {target_sr!r}")
    if isinstance(source, (str, Path)):
        name = str(source)
        channels, sample_rate = _read_file(Path(source), max_seconds)  # (C, T)
    elif isinstance(source, tuple) and len(source) == 2:
        name = "<waveform tuple>"
        sample_rate = _check_rate(source[1], name)
        channels = _channels_first(source[0], name)  # (C, T)
        _check_duration(channels.shape[1], sample_rate, max_seconds, name)
    else:
        raise InputError("expected an audio file path or a (waveform, sample_rate) tuple, "
                         f"got {type(source).__name__}", source=repr(source)[:80])

    if channels.shape[1] == 0:
        raise InputError("audio has zero samples; expected a non-empty clip", source=name)
    if not torch.isfinite(channels).all():
        raise InputError("audio contains NaN or infinite samples", source=name)
    mono = channels.mean(dim=0)  # (T,)
    if sample_rate != target_sr:
        mono = AF.resample(mono, sample_rate, target_sr)
    return mono.contiguous()


def _read_file(path: Path, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    name = str(path)
    if not path.exists():
        raise InputError("audio file not found", source=name)
    if not path.is_file():
        raise InputError("expected an audio file, found a directory or special file", source=name)
    if path.stat().st_size == 0:
        raise InputError("audio file is empty (0 bytes)", source=name)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"unsupported or corrupt audio file ({e}); expected a format soundfile reads "
                         "(WAV, FLAC, OGG, MP3, AIFF, ...)", source=name) from None
    sample_rate = _check_rate(info.samplerate, name)
    _check_duration(info.frames, sample_rate, max_seconds, name)  # before decoding the samples
    try:
        samples, _ = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"corrupt audio data ({e})", source=name) from None
    return torch.from_numpy(np.ascontiguousarray(samples.T)), sample_rate


def _check_rate(sample_rate: Any, name: str) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise InputError(f"sample rate must be a positive integer, got {sample_rate!r}", source=name)
    if not float(sample_rate).is_integer() or sample_rate <= 0:
        raise InputError(f"sample rate must be a positive integer number of Hz, got {sample_rate!r}", source=name)
    return int(sample_rate)


def _check_duration(frames: int, sample_rate: int, max_seconds: float | None, name: str) -> None:
    if max_seconds is None:
        return
    seconds = frames / sample_rate
    if seconds > max_seconds:
        raise InputError(f"audio is {seconds:.2f} s long ({frames} samples at {sample_rate} Hz), over the limit "
                         f"max_seconds={max_seconds:g}; audio is never truncated, so trim or split the clip, or "
                         f"raise max_seconds to at least {np.ceil(seconds * 100) / 100:g}", source=name)


def _channels_first(waveform: Any, name: str) -> torch.Tensor:
    """numpy / torch, 1-D or 2-D with channels on the smaller axis -> float32 (C, T)."""
    if isinstance(waveform, np.ndarray):
        if waveform.dtype in _PCM_SCALE:
            waveform = waveform.astype(np.float32) / _PCM_SCALE[waveform.dtype]
        elif waveform.dtype.kind != "f":
            raise InputError(f"expected a float, int16 or int32 waveform, got dtype {waveform.dtype}", source=name)
        tensor = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    elif isinstance(waveform, torch.Tensor):
        if waveform.dtype in (torch.int16, torch.int32):
            tensor = waveform.float() / (2.0 ** 15 if waveform.dtype == torch.int16 else 2.0 ** 31)
        elif waveform.is_floating_point():
            tensor = waveform.detach().to("cpu", torch.float32)
        else:
            raise InputError(f"expected a float, int16 or int32 waveform, got dtype {waveform.dtype}", source=name)
    else:
        raise InputError(f"expected the waveform to be a numpy array or torch tensor, got {type(waveform).__name__}",
                         source=name)
    if tensor.numel() == 0:
        raise InputError(f"audio has zero samples (shape {tuple(tensor.shape)}); expected a non-empty clip",
                         source=name)
    if tensor.ndim == 1:
        return tensor.unsqueeze(0)
    if tensor.ndim == 2:
        return tensor if tensor.shape[0] <= tensor.shape[1] else tensor.T
    raise InputError(f"expected a 1-D (samples) or 2-D (channels, samples) waveform, got shape "
                     f"{tuple(tensor.shape)}", source=name)
