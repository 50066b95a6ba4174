"""Content hashes for duplicate search: pixel sha256, perceptual hashes (and of the mirror), Hamming pairs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.manifests.atomic import sha256_file, write_parquet
from refface.manifests.errors import ImageError
from refface.manifests.io import read_image
from refface.stages import map_chunks

HASH_COLUMNS = ["path", "file_sha256", "pixel_sha256", "phash", "phash_mirror", "width", "height", "error"]
# 8x8 DCT perceptual hash = 64 bits, stored as one unsigned 64-bit integer per image.
HASH_BITS = 64


def pixel_sha256(rgb: np.ndarray) -> str:
    """sha256 of decoded 8-bit RGB pixels and their shape.

    Two files hold the same picture (a PNG re-save of a JPEG, stripped metadata, another
    container) exactly when this matches, whatever their bytes.
    """
    h = hashlib.sha256()
    h.update(f"{rgb.shape[0]}x{rgb.shape[1]}x{rgb.shape[2] if rgb.ndim == 3 else 1}\0".encode())
    h.update(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _bits_to_u64(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(np.asarray(bits, dtype=bool).ravel()).tobytes(), "big")


def phash_pair(rgb: np.ndarray) -> tuple[int, int]:
    """64-bit DCT perceptual hash of the image and of its left-right mirror, as unsigned ints."""
    import imagehash
    from PIL import Image

    img = Image.fromarray(rgb)
    # Hash the grey image once per orientation; the mirror hash is what catches flipped copies.
    direct = imagehash.phash(img, hash_size=8)
    mirror = imagehash.phash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hash_size=8)
    return _bits_to_u64(direct.hash), _bits_to_u64(mirror.hash)


def hash_one(path: str | os.PathLike) -> dict:
    """Hash one image file; decoding problems land in ``error`` instead of raising."""
    row: dict[str, Any] = {c: None for c in HASH_COLUMNS}
    row["path"] = str(path)
    try:
        row["file_sha256"] = sha256_file(path)
    except OSError as e:
        row["error"] = f"cannot read file: {e.strerror or e}"
        return row
    try:
        rgb = read_image(path)
    except ImageError as e:
        row["error"] = str(e)
        return row
    row["pixel_sha256"] = pixel_sha256(rgb)
    direct, mirror = phash_pair(rgb)
    row["phash"], row["phash_mirror"] = direct, mirror
    row["height"], row["width"] = int(rgb.shape[0]), int(rgb.shape[1])
    return row


def hash_chunk(paths: Sequence[str]) -> list[dict]:
    """Picklable unit of work for :func:`refface.stages.map_chunks`."""
    return [hash_one(p) for p in paths]


def hash_images(
    paths: Sequence[str],
    cache: str | os.PathLike | None = None,
    workers: int = 1,
    chunk_size: int = 64,
    description: str = "hashing images",
) -> pd.DataFrame:
    """Hash every image in ``paths`` (absolute), reusing a cache of earlier results.

    The cache is a parquet table keyed by path, file size and mtime, so unchanged files are
    never decoded twice and a killed run keeps what it finished.

    Returns:
        DataFrame with :data:`HASH_COLUMNS`, one row per input path in input order; ``phash``
        columns are uint64 (0 where the image could not be decoded, see ``error``).
    """
    paths = [str(p) for p in paths]
    stats = {}
    for p in paths:
        try:
            st = os.stat(p)
            stats[p] = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stats[p] = "missing"
    # Records of files outside this call stay in the cache, so one cache serves many sets.
    kept: dict[str, dict] = {}
    cache_path = Path(cache) if cache else None
    if cache_path is not None and cache_path.exists():
        kept = {rec["path"]: rec for rec in pd.read_parquet(cache_path).to_dict("records")}
    cached = {p: rec for p, rec in kept.items() if p in stats and stats[p] == rec.get("stat")}
    todo = [p for p in dict.fromkeys(paths) if p not in cached]
    if todo:
        parts_dir = cache_path.with_suffix(".parts") if cache_path is not None else None

        def part_path(i: int) -> Path:
            return parts_dir / f"{i:06d}.parquet"  # type: ignore[operator]

        def write_part(path: Path, rows: list[dict]) -> None:
            write_parquet(path, hash_frame(rows))

        def read_part(path: Path) -> list[dict]:
            return pd.read_parquet(path).to_dict("records")

        kwargs: dict[str, Any] = {}
        if parts_dir is not None:
            # The part files are keyed by chunk number, so they are only valid for this todo list.
            parts_dir.mkdir(parents=True, exist_ok=True)
            marker = parts_dir / "todo.sha256"
            digest = hashlib.sha256("\n".join(f"{p}\0{stats[p]}" for p in todo).encode()).hexdigest()
            if not marker.exists() or marker.read_text() != digest:
                for old_part in parts_dir.glob("*.parquet"):
                    old_part.unlink()
                marker.write_text(digest)
            kwargs = {"part_path": part_path, "write_part": write_part, "read_part": read_part}
        results = map_chunks(hash_chunk, todo, chunk_size, workers=workers, description=description, **kwargs)
        for rows in results:
            for rec in rows:
                cached[rec["path"]] = {**rec, "stat": stats[rec["path"]]}
        if cache_path is not None:
            kept.update(cached)
            write_parquet(cache_path, hash_frame([kept[p] for p in sorted(kept)]))
            for old_part in parts_dir.glob("*"):  # type: ignore[union-attr]
                old_part.unlink()
            parts_dir.rmdir()  # type: ignore[union-attr]
    return hash_frame([cached[p] for p in paths])[HASH_COLUMNS]


def _int_or_zero(v) -> int:
    return 0 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)


def hash_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows of :func:`hash_one` as a frame with uint64 hash columns (0 = no hash)."""
    # Columns are built from the raw values: letting pandas infer a column of big ints with gaps
    # would go through float64 and lose the low bits of the 64-bit hashes.
    extra = sorted({k for r in rows for k in r} - set(HASH_COLUMNS))
    data: dict[str, Any] = {}
    for col in HASH_COLUMNS + extra:
        values = [r.get(col) for r in rows]
        if col in ("phash", "phash_mirror"):
            data[col] = np.array([_int_or_zero(v) for v in values], dtype=np.uint64)
        elif col in ("width", "height"):
            data[col] = np.array([_int_or_zero(v) for v in values], dtype=np.int64)
        else:
            data[col] = pd.Series(
                [None if isinstance(v, float) and np.isnan(v) else v for v in values], dtype=object
            )
    return pd.DataFrame(data)


def hamming_pairs(
    codes_a: np.ndarray, codes_b: np.ndarray, max_distance: int, block: int = 1 << 21
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j) with Hamming distance between 64-bit codes ``a[i]`` and ``b[j]`` <= ``max_distance``.

    Blocked so at most ``block`` XORed codes (8 bytes each) exist at once; popcount runs in numpy's C loop.

    Returns:
        (i, j, distance) int64 arrays.
    """
    a = np.ascontiguousarray(codes_a, dtype=np.uint64)
    b = np.ascontiguousarray(codes_b, dtype=np.uint64)
    rows, cols, dists = [], [], []
    if a.size == 0 or b.size == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    step = max(1, block // max(1, b.size))
    for start in range(0, a.size, step):
        x = a[start : start + step, None] ^ b[None, :]
        d = np.bitwise_count(x)
        i, j = np.nonzero(d <= max_distance)
        rows.append(i + start)
        cols.append(j)
        dists.append(d[i, j])
    return (
        np.concatenate(rows).astype(np.int64),
        np.concatenate(cols).astype(np.int64),
        np.concatenate(dists).astype(np.int64),
    )
