"""A small dataset root with planted identity geometry, for the review page and corrections tests.

Identities (cosine distances, threshold 0.4): six tight groups of four faces each, ``id0``..``id5``,
far from each other except ``id3`` and ``id4`` (average cross distance about 0.5: a "possible same
person" pair), plus lone faces: ``lone/near0.png`` about 0.5 from ``id0`` and ``lone/far.png`` far
from everything. Images are small distinct PNGs; ``build.json`` points at them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from refface.manifests.io import encode_png

DIM = 32
THRESHOLD = 0.4


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _image(seed: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def _mix(a: np.ndarray, b: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at cosine ``cos`` from unit ``a``, in the plane of ``a`` and ``b``."""
    b = _unit(b - (b @ a) * a)
    return cos * a + np.sqrt(1 - cos**2) * b


def make_review_root(path: Path, seed: int = 0) -> Path:
    """Images, images.parquet, embeddings (npy/parquet/json) and build.json; no identities yet."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((8, DIM)))
    centres[4] = _mix(centres[3], centres[4], 0.58)  # id3 ~ id4: a near pair
    rows: list[tuple[str, np.ndarray]] = []
    for ident in range(6):
        for j in range(4):
            v = _unit(centres[ident] + 0.09 * rng.standard_normal(DIM))
            rows.append((f"id{ident}/{j}.png", v))
    rows.append(("lone/near0.png", _mix(centres[0], centres[6], 0.58)))
    rows.append(("lone/far.png", centres[7]))
    images = path / "images"
    paths = []
    for k, (rel, _) in enumerate(rows):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(encode_png(_image(1000 + k)))
        paths.append(rel)
    vectors = np.stack([v for _, v in rows]).astype(np.float32)
    from refface.manifests.atomic import sha256_file

    pd.DataFrame(
        {
            "image_id": range(len(paths)),
            "path": paths,
            "sha256": [sha256_file(images / p) for p in paths],
            "width": 40,
            "height": 40,
        }
    ).to_parquet(path / "images.parquet", index=False)
    np.save(path / "embeddings.npy", vectors)
    pd.DataFrame({"row": range(len(paths)), "image_id": range(len(paths)), "path": paths}).to_parquet(
        path / "embeddings.parquet", index=False
    )
    meta = {
        "model": "test",
        "dim": DIM,
        "fingerprint": "e" * 64,
        "metric": "cosine",
        "identity_threshold": 0.4,
    }
    (path / "embeddings.json").write_text(json.dumps(meta))
    (path / "build.json").write_text(json.dumps({"image_root": str(images.resolve())}))
    return path


def image_paths(root: Path) -> list[str]:
    return sorted(pd.read_parquet(root / "images.parquet")["path"].astype(str))
