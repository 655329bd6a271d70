"""load_image / load_audio: conversions with exact values, and every bad input naming its file."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data_pipelines import InputError, load_audio, load_image


# ---- images -------------------------------------------------------------------------------------
def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # red, fully transparent except the first column which is opaque
    pixels[:, 0, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((3, 2)) == (255, 255, 255)


def test_palette_grayscale_and_16bit_become_rgb(tmp_path):
    Image.new("RGB", (5, 5), (10, 200, 30)).quantize(colors=4).save(tmp_path / "p.png")
    Image.new("L", (5, 5), 77).save(tmp_path / "l.png")
    Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert load_image(tmp_path / "p.png").getpixel((2, 2)) == (10, 200, 30)
    assert load_image(tmp_path / "l.png").getpixel((2, 2)) == (77, 77, 77)
    assert load_image(tmp_path / "i16.png").getpixel((2, 2)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_arrays_and_pil_images():
    gray = np.full((3, 4), 9, dtype=np.uint8)
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    assert load_image(gray).getpixel((1, 1)) == (9, 9, 9)
    assert load_image(rgba).getpixel((1, 1)) == (255, 255, 255)  # transparent black -> white
    assert load_image(Image.new("LA", (3, 3), (0, 255))).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("array, expected", [
    (np.zeros((4, 4), dtype=np.float32), "uint8"),
    (np.zeros((4, 4, 2), dtype=np.uint8), "shape"),
    (np.zeros((1, 4, 3), dtype=np.uint8), "at least 2"),
])
def test_bad_arrays(array, expected):
    with pytest.raises(InputError, match=expected) as info:
        load_image(array)
    assert "numpy array" in str(info.value)


def _png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height but holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    _png_header_only(path, 5000, 4000)  # would fail to decode: the cap must fire first
    with pytest.raises(InputError, match=r"5000x4000 = 20000000 pixels, over the limit of 16777216") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_pillow_decompression_bomb_is_an_input_error(tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, 100_000, 100_000)
    with pytest.raises(InputError, match="too large") as info:
        load_image(path, max_pixels=10**11)
    assert str(path) in str(info.value)


def _truncated_png(path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case, expected", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("corrupt", "corrupt"),
    ("truncated", "truncated"),
    ("unsupported", "cannot identify"),
    ("tiny", "1x1; expected both sides to be at least 2"),
    ("directory", "directory"),
])
def test_bad_image_files_name_the_file(tmp_path, case, expected):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    elif case == "truncated":
        _truncated_png(path)
    elif case == "unsupported":
        path.write_text("this is a text file, not an image\n")
    elif case == "tiny":
        Image.new("RGB", (1, 1)).save(path)
    elif case == "directory":
        path.mkdir()
    with pytest.raises(InputError, match=expected) as info:
        load_image(path)
    assert info.value.source == str(path) and str(path) in str(info.value)


# ---- audio --------------------------------------------------------------------------------------
def test_stereo_file_is_averaged_to_mono(tmp_path):
    path = tmp_path / "st.wav"
    samples = np.stack([np.full(1600, 0.5), np.full(1600, -0.25)], axis=1).astype(np.float32)  # (T, 2)
    sf.write(path, samples, 16000, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.shape == (1600,)
    assert torch.allclose(audio, torch.full((1600,), 0.125), atol=1e-7)


def test_resampling_changes_length_and_keeps_the_tone(tmp_path):
    path = tmp_path / "tone.wav"
    t = np.arange(8000) / 8000
    sf.write(path, np.sin(2 * np.pi * 440 * t).astype(np.float32), 8000, subtype="FLOAT")
    audio = load_audio(path, target_sr=16000)
    assert audio.shape == (16000,)
    expected = torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000)
    assert torch.allclose(audio[1000:-1000], expected[1000:-1000], atol=1e-2)


def test_waveform_tuples():
    ramp = np.linspace(-1, 1, 400, dtype=np.float32)
    assert torch.equal(load_audio((ramp, 16000)), torch.from_numpy(ramp))
    two = np.stack([ramp, -ramp])  # (C, T) and (T, C) both mean to zero
    assert torch.equal(load_audio((two, 16000)), torch.zeros(400))
    assert torch.equal(load_audio((torch.from_numpy(two.T), 16000)), torch.zeros(400))
    pcm = np.array([16384, -32768], dtype=np.int16)
    assert load_audio((pcm, 16000)).tolist() == [0.5, -1.0]
    assert load_audio((ramp, 8000), target_sr=16000).shape == (800,)


@pytest.mark.parametrize("rate", [0, -8000, 15999.5, "16000", True, None])
def test_bad_sample_rates(rate):
    with pytest.raises(InputError, match="sample rate") as info:
        load_audio((np.zeros(100, dtype=np.float32), rate))
    assert "waveform" in str(info.value)


@pytest.mark.parametrize("waveform, expected", [
    (np.zeros(0, dtype=np.float32), "zero samples"),
    (np.zeros((2, 0), dtype=np.float32), "zero samples"),
    (np.array([0.0, np.nan], dtype=np.float32), "NaN or infinite"),
    (torch.tensor([0.0, float("inf")]), "NaN or infinite"),
    (np.zeros((2, 2, 2), dtype=np.float32), "1-D"),
    (np.zeros(4, dtype=np.uint8), "dtype uint8"),
    ([0.0, 0.1], "numpy array or torch tensor"),
])
def test_bad_waveforms(waveform, expected):
    with pytest.raises(InputError, match=expected):
        load_audio((waveform, 16000))


def test_too_long_is_an_error_never_truncated(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(8000 * 3, dtype=np.float32), 8000)
    with pytest.raises(InputError) as info:
        load_audio(path, max_seconds=2.5)
    message = str(info.value)
    assert str(path) in message and "3.00 s" in message and "max_seconds=2.5" in message
    assert "raise max_seconds to at least 3" in message
    assert load_audio(path, max_seconds=3.0, target_sr=8000).shape == (24000,)
    with pytest.raises(InputError, match="1.50 s"):
        load_audio((np.zeros(12000, dtype=np.float32), 8000), max_seconds=1)


@pytest.mark.parametrize("case, expected", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("corrupt", "corrupt"),
    ("unsupported", "unsupported"),
    ("zero_length", "zero samples"),
    ("nan", "NaN or infinite"),
    ("directory", "directory"),
])
def test_bad_audio_files_name_the_file(tmp_path, case, expected):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "corrupt":
        path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\xff" * 40)
    elif case == "unsupported":
        path.write_text("plain text pretending to be audio\n")
    elif case == "zero_length":
        sf.write(path, np.zeros((0, 1), dtype=np.float32), 16000)
    elif case == "nan":
        sf.write(path, np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000, subtype="FLOAT")
    elif case == "directory":
        path.mkdir()
    with pytest.raises(InputError, match=expected) as info:
        load_audio(path)
    assert info.value.source == str(path) and str(path) in str(info.value)
