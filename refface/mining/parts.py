"""The mining stage's part files (one pickle per chunk of images, under ``<root>/.parts/mine/``) and
what is assembled from them part by part, so that no stage holds every row in memory: the images and
faces tables, the memory-mapped embedding matrix, the embedding shards."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from refface.manifests.atomic import write_bytes
from refface.manifests.embedding_shards import INDEX_FILE, finish_shards, write_shard

IMAGES_COLUMNS = ["image_id", "path", "sha256", "width", "height"]
FACES_COLUMNS = ["image_id", "path", "n_faces", "face_index", "x0", "y0", "x1", "y1", "det_score", "lm"]
IMAGES_DTYPES = {"image_id": "int64"}
FACES_DTYPES = {"image_id": "int64", "n_faces": "int64", "face_index": "int64"}


def write_part(path: Path, value: dict) -> None:
    write_bytes(path, pickle.dumps(value, protocol=4))


def read_part(path: Path) -> dict:
    # Part files are written by this module into the user's own dataset root.
    return pickle.loads(path.read_bytes())


def stream_vectors(path: Path, shape: tuple[int, int], n_chunks: int, part_path) -> np.ndarray:
    """Copy every part's vectors into one memory-mapped file, a part at a time.

    The embeddings never sit in memory whole (10M x 512 float32 is 20 GB); the returned array is
    a read-only map that ``save_embeddings`` streams to ``embeddings.npy``.
    """
    if shape[0] == 0:
        return np.zeros(shape, np.float32)  # a zero-length file cannot be mapped
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    row = 0
    for i in range(n_chunks):
        vectors = read_part(part_path(i))["vectors"]
        out[row : row + len(vectors)] = vectors
        row += len(vectors)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def write_vector_shards(
    folder: Path, n_chunks: int, chunks_per_shard: int, part_path, meta: dict
) -> list[str]:
    """One shard per partition of ``chunks_per_shard`` consecutive chunks, read part by part.

    Only one shard's vectors are in memory at a time. Partitions without faces write no shard,
    so shards stay numbered without gaps. Returns the relative paths written (index.json last).
    """
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for first in range(0, n_chunks, chunks_per_shard):
        parts = [read_part(part_path(i)) for i in range(first, min(n_chunks, first + chunks_per_shard))]
        faces = [f for p in parts for f in p["faces"]]
        if not faces:
            continue
        vectors = np.concatenate([p["vectors"] for p in parts if len(p["vectors"])])
        names.append(
            write_shard(
                folder, len(names), vectors, [f["path"] for f in faces], [f["image_id"] for f in faces]
            )
        )
    finish_shards(folder, meta)
    return [f"{folder.name}/{n}.{ext}" for n in names for ext in ("npy", "parquet")] + [
        f"{folder.name}/{INDEX_FILE}"
    ]


def _frame(rows: list[dict], columns: list[str], dtypes: dict) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns).astype(dtypes)


def tables_from_parts(n_chunks: int, part_path) -> tuple[pd.DataFrame, pd.DataFrame, list, np.ndarray, int]:
    """Images and faces tables, error rows, norms and the vector dimension, read part by part.

    Each part becomes a small data frame at once: a column store holds 10M face rows in a few
    GB, where the same rows as Python dicts would need several times that.
    """
    image_frames, face_frames, norm_parts, errors = [], [], [], []
    dim = 0
    for i in range(n_chunks):
        part = read_part(part_path(i))
        if part["images"]:
            image_frames.append(_frame(part["images"], IMAGES_COLUMNS, IMAGES_DTYPES))
        if part["faces"]:
            face_frames.append(_frame(part["faces"], FACES_COLUMNS, FACES_DTYPES))
        errors += part["errors"]
        norm_parts.append(part["norms"])
        if len(part["vectors"]):
            dim = part["vectors"].shape[1]
    images = (
        pd.concat(image_frames, ignore_index=True)
        if image_frames
        else _frame([], IMAGES_COLUMNS, IMAGES_DTYPES)
    )
    faces = (
        pd.concat(face_frames, ignore_index=True) if face_frames else _frame([], FACES_COLUMNS, FACES_DTYPES)
    )
    norms = np.concatenate(norm_parts) if norm_parts else np.zeros((0,), np.float32)
    return images, faces, errors, norms, dim
