"""Sharded embeddings: a folder of ``shard-NNNNNN.npy`` vector files (+ optional ``.parquet`` tables) and
an ``index.json`` written last, with a memory-mapped reader.

Layout (``<root>/embeddings_shards/`` by default)::

    shard-000000.npy        float32 (rows, D), L2-normalized; one file per chunk/partition
    shard-000000.parquet    row (global), image_id, path           (optional)
    index.json              version, dim, count, shards [{name, start, rows}], model metadata

``index.json`` is written last: a folder is valid only once it exists. Readers memory-map the
shards, so 10M x 512 (20 GB) never has to fit in one process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from refface.manifests.atomic import sha256_file, write_json, write_npy, write_parquet
from refface.manifests.layout import EMBEDDING_SHARDS_DIR

SHARDS_VERSION = 1


INDEX_FILE = "index.json"


DEFAULT_FOLDER = EMBEDDING_SHARDS_DIR


def vector_shard_name(i: int) -> str:
    return f"shard-{i:06d}"


# ------------------------------------------------------------------------------------ writing
def write_shard(
    folder: str | os.PathLike,
    i: int,
    vectors: np.ndarray,
    paths: list[str] | None = None,
    image_ids: list[int] | np.ndarray | None = None,
) -> str:
    """Write shard ``i`` (vectors, and a table when ``paths`` is given) atomically; returns its name.

    The table's ``row`` column is filled in by :func:`finish_shards`, which knows each shard's offset.
    """
    folder = Path(folder)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"a shard holds (rows, dim) vectors, got shape {vectors.shape}")
    name = vector_shard_name(i)
    if paths is not None:
        if len(paths) != len(vectors):
            raise ValueError(f"shard {i}: {len(paths)} paths for {len(vectors)} vectors")
        ids = np.full(len(paths), -1, np.int64) if image_ids is None else np.asarray(image_ids, np.int64)
        write_parquet(folder / f"{name}.parquet", pd.DataFrame({"image_id": ids, "path": list(paths)}))
    write_npy(folder / f"{name}.npy", vectors)
    return name


def finish_shards(folder: str | os.PathLike, meta: dict | None = None, checksums: bool = True) -> dict:
    """Write ``index.json`` over every ``shard-*.npy`` in the folder (last: it marks the folder valid).

    Shards must be numbered 0..S-1 without gaps and share one dimension. With ``checksums`` each
    shard's entry carries the sha256 of its file, so the index digests the vectors' content.
    """
    folder = Path(folder)
    files = sorted(folder.glob("shard-*.npy"))
    numbers = [int(f.stem.split("-")[1]) for f in files]
    if numbers != list(range(len(files))):
        missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        raise ValueError(f"{folder}: shards must be numbered 0..{len(files) - 1}; missing {missing[:5]}")
    shards, start, dim = [], 0, None
    for f in files:
        mm = np.load(f, mmap_mode="r")
        if dim is None:
            dim = int(mm.shape[1])
        elif mm.shape[1] != dim:
            raise ValueError(f"{f} has dim {mm.shape[1]}, other shards {dim}")
        entry = {"name": f.stem, "start": start, "rows": int(mm.shape[0])}
        if checksums:
            entry["sha256"] = sha256_file(f)
        shards.append(entry)
        start += int(mm.shape[0])
    index = {
        "version": SHARDS_VERSION,
        "dim": int(dim or 0),
        "count": start,
        "shards": shards,
        "has_tables": all((folder / f"{s['name']}.parquet").exists() for s in shards) and bool(shards),
        **(meta or {}),
    }
    write_json(folder / INDEX_FILE, index)
    return index


class ShardedEmbeddings:
    """Memory-mapped reader over a sharded embeddings folder (global row ids across shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / INDEX_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: the shards folder is incomplete (index.json is written last)"
            )
        self.meta = json.loads(path.read_text())
        if self.meta.get("version") != SHARDS_VERSION:
            raise ValueError(
                f"{path} has version {self.meta.get('version')}, this refface reads {SHARDS_VERSION}"
            )
        self.shards: list[dict] = self.meta["shards"]
        self.starts = np.array([s["start"] for s in self.shards], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def shard(self, s: int) -> np.ndarray:
        """Shard ``s`` as a read-only memory map (rows, dim)."""
        if s not in self._maps:
            mm = np.load(self.folder / f"{self.shards[s]['name']}.npy", mmap_mode="r")
            if mm.shape != (self.shards[s]["rows"], self.dim):
                raise ValueError(
                    f"{self.shards[s]['name']}.npy has shape {mm.shape}, index.json says otherwise"
                )
            self._maps[s] = mm
        return self._maps[s]

    def iter_shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(shard, start_row, memmap)`` in order."""
        for s, info in enumerate(self.shards):
            yield s, int(info["start"]), self.shard(s)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (global, any order, repeats allowed) as one float32 array."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids must be in [0, {len(self)})")
        out = np.empty((ids.size, self.dim), dtype=np.float32)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            local = ids[mask] - self.starts[s]
            # Sorted reads walk the file forwards; put rows back in the caller's order after.
            order = np.argsort(local, kind="stable")
            rows = np.asarray(self.shard(int(s))[local[order]])
            dest = np.flatnonzero(mask)[order]
            out[dest] = rows
        return out

    def dot(self, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``row(ids[j]) . vectors[j]`` for every j: exact scores of candidate pairs.

        Rows are read in ascending id order, shard by shard (the memory map is walked forwards and
        nothing is scattered back), and each score goes to its pair's place at the end: twice as
        fast as :meth:`take` followed by a row-wise product.
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids must be in [0, {len(self)})")
        if not ids.size:
            return np.empty(0, np.float32)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        which = np.searchsorted(self.starts, sorted_ids, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        scores = np.empty(ids.size, np.float32)
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, ids.size], strict=True):
            s = int(which[lo])
            rows = self.shard(s)[sorted_ids[lo:hi] - self.starts[s]]
            scores[lo:hi] = np.einsum("cd,cd->c", rows, vectors[order[lo:hi]])
        out = np.empty(ids.size, np.float32)
        out[order] = scores
        return out

    def paths(self) -> list[str]:
        """Every row's path (reads the shard tables; ValueError when the folder has none)."""
        if not self.meta.get("has_tables"):
            raise ValueError(f"{self.folder} holds vectors only (no shard tables with paths)")
        out: list[str] = []
        for info in self.shards:
            out += pd.read_parquet(self.folder / f"{info['name']}.parquet", columns=["path"])["path"].tolist()
        return out
