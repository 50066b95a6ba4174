"""A tiny dataset root in the exact on-disk formats (images, embeddings, identities, reference CSVs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from refface.manifests.io import encode_png

EMB_DIM = 8


def _image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random image with noise: compresses like a photo, differs per seed."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(xx * rng.uniform(2, 6)), np.cos(yy * rng.uniform(2, 6)), xx * yy], -1)
    img = (base * 0.5 + 0.5) * 200 + rng.normal(0, 10, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_tiny_root(path: Path, size: int = 48, corrupt_ref: bool = False) -> Path:
    """A dataset root in the exact on-disk formats: 4 identities x 3 images (+1 JPEG), train/val CSVs.

    Identities 0-2 are train (every image a target, the others its references), identity 3 is val
    with fixed LQ files under ``lq/``. With ``corrupt_ref`` one reference file is garbage.
    """
    rng = np.random.default_rng(0)
    root = path
    images = root / "images"
    rows, paths = [], []
    for ident in range(4):
        (images / f"id{ident}").mkdir(parents=True, exist_ok=True)
        for j in range(3):
            rel = f"id{ident}/img{j}.png"
            (images / rel).write_bytes(encode_png(_image(rng, size)))
            paths.append(rel)
            rows.append((rel, ident))
    # One JPEG source to exercise re-encoding to the shard codec.
    from PIL import Image

    Image.fromarray(_image(rng, size)).save(images / "id0" / "img3.jpg", quality=90)
    paths.append("id0/img3.jpg")
    rows.append(("id0/img3.jpg", 0))
    if corrupt_ref:
        (images / "id1" / "img2.png").write_bytes(b"not an image")
    (root / "build.json").write_text(json.dumps({"image_root": "images"}))
    pd.DataFrame({"image_id": range(len(paths)), "path": paths}).to_parquet(root / "images.parquet")
    emb = rng.normal(size=(len(paths), EMB_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.save(root / "embeddings.npy", emb)
    pd.DataFrame({"row": range(len(paths)), "image_id": range(len(paths)), "path": paths}).to_parquet(
        root / "embeddings.parquet"
    )
    meta = {
        "model": "test",
        "dim": EMB_DIM,
        "fingerprint": "0" * 64,
        "metric": "cosine",
        "identity_threshold": 0.4,
    }
    (root / "embeddings.json").write_text(json.dumps(meta))
    ident_df = pd.DataFrame(rows, columns=["path", "identity"])
    ident_df["cluster_size"] = ident_df.groupby("identity")["path"].transform("size")
    ident_df.to_parquet(root / "identities.parquet")

    def refs_of(rel: str, ident: int) -> list[str]:
        return [p for p, i in rows if i == ident and p != rel]

    train = [(p, repr(refs_of(p, i))) for p, i in rows if i < 3]
    pd.DataFrame(train, columns=["gt_image", "ref_image"]).to_csv(root / "train_references.csv", index=False)
    (root / "lq").mkdir(exist_ok=True)
    val = []
    for p, i in rows:
        if i == 3:
            lq = f"lq/{Path(p).stem}.png"
            (root / lq).write_bytes(encode_png(_image(rng, size)))
            val.append((p, lq, repr(refs_of(p, i))))
    pd.DataFrame(val, columns=["gt_image", "lq_image", "ref_image"]).to_csv(
        root / "val_references.csv", index=False
    )
    return root
