"""Image loading: any path / PIL image / uint8 array -> a fully decoded RGB `PIL.Image`.

Everything that can go wrong with an image goes wrong here, at load time, with an `InputError` naming the
file: the size is checked from the header before decoding (no decompression bombs) and the pixels are then
decoded completely, so a truncated file fails now and not in a data-loader worker mid-epoch.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines.errors import InputError

DEFAULT_MAX_PIXELS = 4096 * 4096
WHITE = (255, 255, 255)


def load_image(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 2) -> Image.Image:
    """Load `source` (str/Path, PIL image, or uint8 array (H, W) / (H, W, 3|4)) as an RGB image.

    EXIF orientation is applied and any mode (palette, grayscale, 16-bit, alpha, CMYK) becomes RGB, with
    transparency composited on white. Raises `InputError` naming the source and what was expected.
    """
    if isinstance(source, (str, Path)):
        image, name = _open_file(Path(source), max_pixels), str(source)
    elif isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        _check_size(source.size, name, max_pixels, min_side=0)
        image = _decode(source, name)
    elif isinstance(source, np.ndarray):
        name = f"<numpy array {tuple(source.shape)} {source.dtype}>"
        image = _from_array(source, name, max_pixels)
    else:
        raise InputError(f"expected an image path, a PIL image or a uint8 numpy array, got {type(source).__name__}",
                         source=repr(source)[:80])
    image = _exif_transpose(image, name)
    _check_size(image.size, name, max_pixels, min_side)
    return to_rgb(image, name)


def _open_file(path: Path, max_pixels: int) -> Image.Image:
    name = str(path)
    if not path.exists():
        raise InputError("image file not found", source=name)
    if not path.is_file():
        raise InputError("expected an image file, found a directory or special file", source=name)
    if path.stat().st_size == 0:
        raise InputError("image file is empty (0 bytes)", source=name)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; our own cap below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise InputError(f"image is too large to decode safely ({e}); expected at most {max_pixels} pixels",
                         source=name) from None
    except UnidentifiedImageError:
        raise InputError("unsupported or corrupt image: Pillow cannot identify the format "
                         "(expected PNG, JPEG, WebP, BMP, GIF, TIFF, ...)", source=name) from None
    except OSError as e:
        raise InputError(f"corrupt, truncated or unreadable image file ({e})", source=name) from None
    # The header gives the size without decoding: refuse huge images before allocating their pixels.
    _check_size(image.size, name, max_pixels, min_side=0)
    return _decode(image, name)


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Force a full decode so truncated or corrupt pixel data fails here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as e:
        raise InputError(f"image is too large to decode safely ({e})", source=name) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"corrupt or truncated image data ({e}); expected a complete "
                         f"{image.format or 'image'} file", source=name) from None
    return image


def _from_array(array: np.ndarray, name: str, max_pixels: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"expected a uint8 array, got dtype {array.dtype} (scale to 0..255 and cast first)",
                         source=name)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(f"expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}",
                         source=name)
    _check_size((array.shape[1], array.shape[0]), name, max_pixels, min_side=0)
    return Image.fromarray(np.ascontiguousarray(array))  # uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA


def _check_size(size: tuple[int, int], name: str, max_pixels: int, min_side: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InputError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                         "(downscale it or raise max_pixels)", source=name)
    if min(width, height) < min_side:
        raise InputError(f"image is {width}x{height}; expected both sides to be at least {min_side} pixels",
                         source=name)


def _exif_transpose(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # malformed EXIF blocks raise a variety of errors from Pillow's parser
        raise InputError(f"cannot apply the EXIF orientation ({type(e).__name__}: {e})", source=name) from None


def to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white, high bit depths are scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), name)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"cannot convert image mode {image.mode} to RGB ({e})", source=name) from None


def _to_uint8(pixels: np.ndarray, name: str) -> np.ndarray:
    """16-bit / 32-bit integer or float grayscale -> uint8."""
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise InputError("float image contains NaN or infinite pixels", source=name)
        scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0  # [0, 1] floats vs already 0..255
        return np.clip(pixels * scale, 0, 255).round().astype(np.uint8)
    top = 255 if pixels.max(initial=0) <= 255 else 65535  # 8-bit data stored as "I" vs true 16-bit
    return np.clip(pixels.astype(np.int64) * 255 // top, 0, 255).astype(np.uint8)
