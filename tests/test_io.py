"""Robust image reading: every bad-input case gives a clear ImageError, good ones decode to RGB8."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import decode_image, list_images, read_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h=20, w=30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_formats_decode_to_rgb8(fmt):
    arr = decode_image(_encode(_rgb(), fmt))
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize(
    "mode",
    ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1", "F"],
)
def test_colour_modes_become_rgb8(mode):
    img = _rgb().convert("RGB")
    if mode == "I;16":
        arr16 = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
        img = Image.fromarray(arr16)
        data = _encode(img, "PNG")
    elif mode == "F":
        img = Image.fromarray(np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30), mode="F")
        data = _encode(img, "TIFF")
    else:
        img = img.convert(mode)
        data = _encode(img, "JPEG" if mode == "CMYK" else "PNG")
    arr = decode_image(data)
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8


def test_sixteen_bit_keeps_range():
    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    arr = decode_image(_encode(Image.fromarray(arr16), "PNG"))
    assert arr.min() == 255


def test_rgba_composites_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (decode_image(_encode(img, "PNG")) == 255).all()


def test_exif_orientation_applied():
    img = _rgb(10, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    arr = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert arr.shape == (40, 10, 3)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a decodable image"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg_reported():
    data = _encode(_rgb(200, 200), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_guards_against_bombs():
    data = _encode(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_pixels=1_000_000)


def test_missing_file_reported(tmp_path):
    with pytest.raises(ImageError, match="cannot read file"):
        read_image(tmp_path / "nope.jpg")


def test_list_images_sorted_relative_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ["b/2.png", "a.JPG", ".hidden/x.png", "notes.txt"]:
        (tmp_path / rel).write_bytes(b"x")
    assert list_images(tmp_path) == ["a.JPG", "b/2.png"]


def test_errors_table_roundtrip(tmp_path):
    table = ErrorsTable()
    table.add("x.jpg", "decode", "empty file")
    table.add("a.jpg", "faces", "no face found")
    table.write(tmp_path)
    back = ErrorsTable.read(tmp_path)
    assert len(back) == 2 and back.counts_by_stage() == {"decode": 1, "faces": 1}
    assert (tmp_path / "errors.csv").read_text().startswith("path,stage,reason")
