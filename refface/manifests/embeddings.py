"""The embeddings files of a dataset root: ``embeddings.npy`` (or a sharded folder), ``embeddings.parquet``
(row, image_id, path, norm) and ``embeddings.json`` (model, fingerprint, metric, threshold; written last)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.manifests.atomic import sha256_file, write_json, write_npy, write_parquet
from refface.manifests.embedding_shards import (
    DEFAULT_FOLDER,
    INDEX_FILE,
    ShardedEmbeddings,
    finish_shards,
    vector_shard_name,
    write_shard,
)
from refface.manifests.layout import EMBEDDINGS_META, EMBEDDINGS_NPY, EMBEDDINGS_TABLE

# ReF-LDM's rule: two ArcFace embeddings are the same person when cosine distance < 0.4.
ARCFACE_THRESHOLD = 0.4


@dataclass
class Embeddings:
    """L2-normalized face embeddings with the model that made them.

    ``metric`` is the distance convention (``cosine``: 1 - dot on these unit vectors) and
    ``identity_threshold`` the default same-person threshold in that distance. ``tta`` is the
    embedder's test-time augmentation (``none`` or ``flip``); ``embeddings.json`` names it only
    when it is not ``none``.
    """

    vectors: np.ndarray
    paths: list[str]
    model: str
    fingerprint: str
    metric: str = "cosine"
    identity_threshold: float = ARCFACE_THRESHOLD
    image_ids: list[int] | None = None
    norms: np.ndarray | None = field(default=None, repr=False)
    tta: str = "none"

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32).reshape(len(self.paths), -1)
        if self.image_ids is not None and len(self.image_ids) != len(self.paths):
            raise ValueError("image_ids and paths differ in length")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.paths)


def check_same_model(a: Embeddings, b: Embeddings) -> None:
    """Raise ValueError when two embedding sets come from different model weights."""
    if a.fingerprint != b.fingerprint or a.dim != b.dim:
        raise ValueError(
            f"refusing to mix embeddings of different models: {a.model} ({a.fingerprint[:12]}, dim {a.dim}) "
            f"vs {b.model} ({b.fingerprint[:12]}, dim {b.dim}); re-embed one set with the other's model"
        )


def concat_embeddings(parts: list[Embeddings]) -> Embeddings:
    """Concatenate embedding sets of the same model (ValueError when the fingerprints differ)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    for other in parts[1:]:
        check_same_model(first, other)
    ids = None
    if all(p.image_ids is not None for p in parts):
        ids = [i for p in parts for i in p.image_ids]  # type: ignore[union-attr]
    norms = None
    if all(p.norms is not None for p in parts):
        norms = np.concatenate([p.norms for p in parts if p.norms is not None])
    return Embeddings(
        vectors=np.concatenate([p.vectors for p in parts]).reshape(-1, first.dim),
        paths=[x for p in parts for x in p.paths],
        model=first.model,
        fingerprint=first.fingerprint,
        metric=first.metric,
        identity_threshold=first.identity_threshold,
        image_ids=ids,
        norms=norms,
        tta=first.tta,
    )


def save_embedding_tables(
    root: str | os.PathLike,
    paths: list[str],
    image_ids: list[int] | None,
    norms: np.ndarray | None,
    meta: dict,
) -> list[str]:
    """Write ``embeddings.parquet`` (row, image_id, path[, norm]) and ``embeddings.json`` (last).

    ``meta``: model, dim, fingerprint, metric, identity_threshold, and for vectors kept outside
    ``embeddings.npy`` the layout (see :data:`SHARDED_LAYOUT`). Returns the relative paths written.
    """
    root = Path(root)
    table: dict[str, Any] = {"row": np.arange(len(paths), dtype=np.int64)}
    table["image_id"] = np.asarray(image_ids if image_ids is not None else [-1] * len(paths), dtype=np.int64)
    table["path"] = list(paths)
    if norms is not None:
        table["norm"] = np.asarray(norms, dtype=np.float32)
    write_parquet(root / EMBEDDINGS_TABLE, pd.DataFrame(table))
    write_json(root / EMBEDDINGS_META, {**meta, "count": len(paths), "normalized": True})
    return [EMBEDDINGS_TABLE, EMBEDDINGS_META]


def save_embeddings(root: str | os.PathLike, emb: Embeddings) -> list[str]:
    """Write ``embeddings.npy``/``.parquet``/``.json`` into a dataset root (atomically).

    The JSON is written last. Returns the relative paths written.
    """
    root = Path(root)
    write_npy(root / EMBEDDINGS_NPY, np.ascontiguousarray(emb.vectors, dtype=np.float32))
    meta = {
        "model": emb.model,
        "dim": emb.dim,
        "fingerprint": emb.fingerprint,
        "metric": emb.metric,
        "identity_threshold": emb.identity_threshold,
    }
    if emb.tta != "none":
        meta["tta"] = emb.tta
    return [EMBEDDINGS_NPY, *save_embedding_tables(root, emb.paths, emb.image_ids, emb.norms, meta)]


# embeddings.json of a root whose vectors are sharded: {"layout": "sharded", "shards": <folder>}.
SHARDED_LAYOUT = "sharded"


def embeddings_meta(root: str | os.PathLike) -> dict:
    """``embeddings.json`` of a dataset root (FileNotFoundError naming the command that writes it)."""
    meta_path = Path(root) / EMBEDDINGS_META
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found; run `refface embed IMAGES --out {root}` first")
    return json.loads(meta_path.read_text())


def embeddings_files(root: str | os.PathLike) -> list[str]:
    """Relative paths of the files that hold a root's vectors: ``embeddings.npy``, or the shards
    folder's ``index.json`` and shard files; [] when the root has no embeddings."""
    root = Path(root)
    if not (root / EMBEDDINGS_META).exists():
        return [EMBEDDINGS_NPY] if (root / EMBEDDINGS_NPY).exists() else []
    meta = embeddings_meta(root)
    if meta.get("layout") != SHARDED_LAYOUT:
        return [EMBEDDINGS_NPY]
    index = json.loads((root / meta["shards"] / INDEX_FILE).read_text())
    folder = meta["shards"]
    return [f"{folder}/{INDEX_FILE}", *(f"{folder}/{s['name']}.npy" for s in index["shards"])]


def embeddings_digest(root: str | os.PathLike) -> str | None:
    """Content digest of a root's vectors (None without any): the sha256 of ``embeddings.npy``, or
    of a sharded root's ``index.json``, which lists every shard's sha256."""
    files = embeddings_files(root)
    if not files or not (Path(root) / files[0]).exists():
        return None
    return sha256_file(Path(root) / files[0])


def load_vectors(root: str | os.PathLike, meta: dict | None = None) -> np.ndarray:
    """A root's (N, D) float32 vectors in memory, from ``embeddings.npy`` or its shards."""
    root = Path(root)
    meta = meta if meta is not None else embeddings_meta(root)
    if meta.get("layout") != SHARDED_LAYOUT:
        return np.load(root / EMBEDDINGS_NPY)
    reader = ShardedEmbeddings(root / meta["shards"])
    if not reader.n_shards:
        return np.zeros((0, int(meta["dim"])), np.float32)
    return np.concatenate([np.asarray(mm) for _, _, mm in reader.iter_shards()])


def load_embeddings(root: str | os.PathLike, expect_fingerprint: str | None = None) -> Embeddings:
    """Read a dataset root's embeddings into memory, from ``embeddings.npy`` or its shards.

    ValueError on inconsistent files or another model's fingerprint. Roots too big for memory
    are read shard by shard with :class:`refface.manifests.embedding_shards.ShardedEmbeddings` instead.
    """
    root = Path(root)
    meta = embeddings_meta(root)
    vectors = load_vectors(root, meta)
    table = pd.read_parquet(root / EMBEDDINGS_TABLE)
    if len(table) != len(vectors) or vectors.shape[1] != meta["dim"]:
        raise ValueError(
            f"{root}: embedding vectors {vectors.shape} do not match embeddings.parquet ({len(table)} rows) "
            f"/ embeddings.json (dim {meta['dim']}); rebuild with `refface embed`"
        )
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise ValueError(
            f"{root} holds embeddings of {meta['model']} ({meta['fingerprint'][:12]}), not of the expected "
            f"model ({expect_fingerprint[:12]}); refusing to mix models"
        )
    return Embeddings(
        vectors=vectors.astype(np.float32, copy=False),
        paths=table["path"].astype(str).tolist(),
        model=meta["model"],
        fingerprint=meta["fingerprint"],
        metric=meta["metric"],
        identity_threshold=float(meta["identity_threshold"]),
        image_ids=table["image_id"].astype(int).tolist(),
        norms=table["norm"].to_numpy(np.float32) if "norm" in table else None,
        tta=meta.get("tta", "none"),
    )


def shard_embeddings(
    root: str | os.PathLike, out: str | os.PathLike | None = None, rows_per_shard: int = 1_000_000
) -> ShardedEmbeddings:
    """Split a dataset root's ``embeddings.npy``/``.parquet`` into shards (read memory-mapped).

    Args:
        root: dataset root written by ``refface embed``.
        out: shards folder; default ``<root>/embeddings_shards``.
        rows_per_shard: vectors per shard file.

    Returns:
        The reader over the new folder. Shards already written are kept (the split is resumable).
    """
    root = Path(root)
    out = Path(out) if out else root / DEFAULT_FOLDER
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be at least 1")
    meta_path = root / EMBEDDINGS_META
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found; run `refface embed IMAGES --out {root}` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("layout") == SHARDED_LAYOUT:
        # Mined with `refface embed --shard-rows`: the shards are already there.
        existing = root / meta["shards"]
        if out.resolve() != existing.resolve():
            raise ValueError(f"{root} already holds sharded embeddings in {existing}; read that folder")
        return ShardedEmbeddings(existing)
    vectors = np.load(root / EMBEDDINGS_NPY, mmap_mode="r")
    table = pd.read_parquet(root / EMBEDDINGS_TABLE, columns=["image_id", "path"])
    if len(table) != len(vectors):
        raise ValueError(f"{root}: embeddings.npy has {len(vectors)} rows, embeddings.parquet {len(table)}")
    for s, start in enumerate(range(0, len(vectors), rows_per_shard)):
        if (out / f"{vector_shard_name(s)}.npy").exists():
            continue
        stop = min(len(vectors), start + rows_per_shard)
        part = table.iloc[start:stop]
        write_shard(
            out, s, vectors[start:stop], part["path"].astype(str).tolist(), part["image_id"].to_numpy()
        )
    keep = ("model", "fingerprint", "metric", "identity_threshold")
    finish_shards(out, {k: meta[k] for k in keep if k in meta})
    return ShardedEmbeddings(out)


# ------------------------------------------------------------------------------------ reading
