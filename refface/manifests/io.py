"""Safe image decoding: EXIF orientation, any colour mode to 8-bit RGB, decompression-bomb limit."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from refface.manifests.atomic import write_bytes
from refface.manifests.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# 64 megapixels: larger than any face photo we expect, small enough that decoding cannot eat the box.
DEFAULT_MAX_PIXELS = 64_000_000


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files under ``root`` as sorted POSIX paths relative to it (hidden files skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    pattern = "**/*" if recursive else "*"
    found = []
    for p in root.glob(pattern):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode (CMYK, 16-bit, I, F, LA, P, RGBA, ...) to an 8-bit RGB array."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs decode as mode I; scale by the real range of the container.
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.stack([arr] * 3, axis=-1)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.stack([arr] * 3, axis=-1)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite on white: transparent areas of web images are meant as background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array with EXIF orientation applied.

    Raises:
        ImageError: empty, truncated, non-image or oversized input; the message says which.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"too large: {width}x{height} exceeds the {max_pixels} pixel limit")
            if width == 0 or height == 0:
                raise ImageError("zero-sized image")
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"not a decodable image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"truncated or corrupt image: {e}") from e
    return _to_rgb8(img)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; raises :class:`ImageError` with a reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from e
    return decode_image(data, max_pixels=max_pixels)


def encode_png(rgb: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of an RGB array; deterministic for the same pixels."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    write_bytes(path, encode_png(rgb))
