"""A dataset root: the names of the files every stage writes into it and the readers they share.

A root is a folder. Mining (``refface embed``) writes the images, faces and embeddings tables; the
builders add identities, splits, reference CSVs, ``build.json`` and the card; the attributes stage
adds ``attributes.parquet``. Image paths inside the tables are relative to the root's image folder
(:meth:`DatasetRoot.image_root`); :meth:`DatasetRoot.resolve` refuses a path that would leave it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pandas as pd

from refface.manifests.embeddings import (
    Embeddings,
    embeddings_files,
    embeddings_meta,
    load_embeddings,
)
from refface.manifests.layout import (
    ATTRIBUTES,
    BUILD,
    CARD,
    EMBEDDINGS_META,
    EMBEDDINGS_NPY,
    EMBEDDINGS_TABLE,
    FACES,
    IDENTITIES,
    IMAGES,
    SPLITS,
    SPLITS_TABLE,
    STAGES_DIR,
    references_filename,
    split_filename,
)
from refface.manifests.references import read_references

# Keys under which stage manifests record the folder their image paths are relative to.
IMAGE_DIR_KEYS = ("image_root", "images_root", "image_dir", "images")

__all__ = [
    "ATTRIBUTES",
    "BUILD",
    "CARD",
    "EMBEDDINGS_META",
    "EMBEDDINGS_NPY",
    "EMBEDDINGS_TABLE",
    "FACES",
    "IDENTITIES",
    "IMAGES",
    "SPLITS",
    "SPLITS_TABLE",
    "STAGES_DIR",
    "DatasetRoot",
    "PathEscapesRoot",
    "safe_relative",
]


class PathEscapesRoot(ValueError):
    """A table names a path outside the folder it must stay in (absolute, or with ``..``)."""


def safe_relative(rel: str) -> str:
    """``rel`` when it is a relative path that stays below its folder; :class:`PathEscapesRoot` else.

    Rejects absolute paths (POSIX or Windows, with or without a drive), empty paths and any ``..``
    component, before anything is opened.
    """
    text = str(rel)
    if not text.strip():
        raise PathEscapesRoot("empty image path")
    posix, win = PurePosixPath(text.replace("\\", "/")), PureWindowsPath(text)
    if posix.is_absolute() or win.is_absolute() or win.drive or text.startswith(("/", "\\", "~")):
        raise PathEscapesRoot(f"absolute path {text!r} refused: paths must be relative to the image root")
    if ".." in posix.parts:
        raise PathEscapesRoot(f"path {text!r} leaves the image root ('..' refused)")
    return text


@dataclass(frozen=True)
class DatasetRoot:
    """One dataset root folder and the readers of its files."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------------------ what it holds
    def has_embeddings(self) -> bool:
        """Mined: ``images.parquet`` and ``embeddings.json`` (the vectors' done-marker) exist."""
        return self.path.is_dir() and (self / EMBEDDINGS_META).exists() and (self / IMAGES).exists()

    def has_vector_files(self) -> bool:
        """Every file that holds the root's vectors exists, and ``embeddings.parquet`` beside them."""
        files = embeddings_files(self.path)
        return bool(files) and all((self / f).exists() for f in files) and (self / EMBEDDINGS_TABLE).exists()

    def has_references(self, split: str = "train") -> bool:
        """Built (or published): ``{split}_references.csv`` exists."""
        return self.path.is_dir() and (self / references_filename(split)).exists()

    def is_root(self) -> bool:
        """A dataset root: mined tables or any split's reference CSV."""
        return self.has_embeddings() or any(self.has_references(s) for s in SPLITS)

    def build_record(self) -> dict[str, Any]:
        """``build.json`` ({} when the root was not built by a builder)."""
        path = self / BUILD
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------------------------ image folder
    def image_root(self) -> Path | None:
        """The folder the root's image paths are relative to, or None when nothing records it.

        ``build.json``'s ``image_root`` (relative to the root when relative), else the image folder
        the stage manifests record (a root made only by ``refface embed``).
        """
        value = self.build_record().get("image_root")
        if value:
            path = Path(value)
            return path if path.is_absolute() else self.path / path
        return self.recorded_image_dir()

    def recorded_image_dir(self) -> Path | None:
        """The existing image folder the stage manifests in ``.stages/`` record, resolved; else None."""
        candidates = []
        stages = self / STAGES_DIR
        if stages.is_dir():
            for manifest in sorted(stages.glob("*.json")):
                try:
                    data = json.loads(manifest.read_text())
                except (OSError, ValueError):
                    continue
                for section in (data, data.get("inputs") or {}, data.get("config") or {}):
                    if isinstance(section, dict):
                        for key in IMAGE_DIR_KEYS:
                            value = section.get(key)
                            if isinstance(value, str):
                                candidates.append(value)
        for value in candidates:
            p = Path(value)
            p = p if p.is_absolute() else (self.path / p)
            if p.is_dir():
                return p.resolve()
        return None

    def resolve(self, rel: str, base: str | os.PathLike | None = None) -> Path:
        """``base / rel`` (base: the image root, else the root itself) for a path that stays inside.

        Raises:
            PathEscapesRoot: ``rel`` is absolute or climbs out with ``..``; nothing is opened.
        """
        folder = Path(base) if base is not None else (self.image_root() or self.path)
        return folder / safe_relative(rel)

    # ------------------------------------------------------------------------------ tables
    def image_paths(self) -> list[str]:
        """Every image of the root: ``images.parquet`` paths, else every target and reference of the
        reference CSVs (sorted). FileNotFoundError when the root has neither."""
        if (self / IMAGES).exists():
            return sorted(pd.read_parquet(self / IMAGES, columns=["path"])["path"].astype(str))
        paths: set[str] = set()
        for split in SPLITS:
            if self.has_references(split):
                df = self.references(split)
                paths.update(df["gt_image"])
                for refs in df["ref_image"]:
                    paths.update(refs)
        if not paths:
            raise FileNotFoundError(f"{self.path} has neither {IMAGES} nor reference CSVs")
        return sorted(paths)

    def references(self, split: str) -> pd.DataFrame:
        """``{split}_references.csv`` with ``ref_image`` parsed into lists (FileNotFoundError when absent)."""
        path = self / references_filename(split)
        if not path.exists():
            raise FileNotFoundError(f"no reference list for split {split!r}: {path} does not exist")
        return read_references(path)

    def split_list_path(self, split: str) -> Path:
        return self / split_filename(split)

    def embeddings(self, first_per_image: bool = False) -> Embeddings:
        """The root's face embeddings (``embeddings.npy`` or its shards, checked against the tables).

        ``first_per_image`` keeps only the first face row of each image path. A root written before
        ``embeddings.json`` existed (vectors and table only) reads with an empty model name.

        Raises:
            FileNotFoundError: the root holds no embeddings.
            ValueError: the files disagree (rows, dimension).
        """
        if (self / EMBEDDINGS_META).exists():
            emb = load_embeddings(self.path)
        elif (self / EMBEDDINGS_NPY).exists() and (self / EMBEDDINGS_TABLE).exists():
            emb = self._embeddings_without_meta()
        else:
            raise FileNotFoundError(
                f"{self / EMBEDDINGS_META} not found; run `refface embed IMAGES --out {self.path}` first"
            )
        if not first_per_image:
            return emb
        seen: dict[str, int] = {}
        for i, p in enumerate(emb.paths):
            seen.setdefault(p, i)
        keep = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
        if len(keep) == len(emb.paths):
            return emb
        return Embeddings(
            vectors=emb.vectors[keep],
            paths=[emb.paths[i] for i in keep],
            model=emb.model,
            fingerprint=emb.fingerprint,
            metric=emb.metric,
            identity_threshold=emb.identity_threshold,
            image_ids=[emb.image_ids[i] for i in keep] if emb.image_ids is not None else None,
            norms=emb.norms[keep] if emb.norms is not None else None,
            tta=emb.tta,
        )

    def embeddings_by_path(self) -> tuple[Embeddings, list[str], np.ndarray]:
        """(all embeddings, image paths sorted, the first face's vector of each path in that order)."""
        emb = self.embeddings()
        paths = [str(p) for p in emb.paths]
        first: dict[str, int] = {}
        for i, p in enumerate(paths):
            first.setdefault(p, i)
        rows = sorted(first.values(), key=lambda i: paths[i])
        return emb, [paths[i] for i in rows], np.asarray(emb.vectors, dtype=np.float32)[rows]

    def _embeddings_without_meta(self) -> Embeddings:
        matrix = np.load(self / EMBEDDINGS_NPY, mmap_mode="r")
        table = pd.read_parquet(self / EMBEDDINGS_TABLE)
        if len(table) != matrix.shape[0]:
            raise ValueError(
                f"{self.path}: {EMBEDDINGS_TABLE} has {len(table)} rows but {EMBEDDINGS_NPY} has {matrix.shape[0]}"
            )
        rows = table["row"].to_numpy() if "row" in table.columns else np.arange(len(table))
        return Embeddings(
            vectors=np.asarray(matrix[rows], dtype=np.float32),
            paths=table["path"].astype(str).tolist(),
            model="",
            fingerprint="",
        )

    def embedding_dim(self) -> int | None:
        """D of the root's embeddings without reading the vectors; None when it has none."""
        if (self / EMBEDDINGS_META).exists():
            return int(embeddings_meta(self.path)["dim"])
        if (self / EMBEDDINGS_NPY).exists():
            return int(np.load(self / EMBEDDINGS_NPY, mmap_mode="r").shape[1])
        return None

    def identities(self) -> pd.DataFrame | None:
        """``identities.parquet`` (path, identity, ...; -1 = singleton), or None before clustering."""
        path = self / IDENTITIES
        return pd.read_parquet(path) if path.exists() else None

    def identity_of(self) -> dict[str, int]:
        """{image path: identity} from ``identities.parquet``; {} when absent."""
        df = self.identities()
        if df is None:
            return {}
        return dict(zip(df["path"].astype(str), df["identity"].astype(int), strict=True))

    def attributes(self) -> pd.DataFrame | None:
        """``attributes.parquet``, or None when the attributes stage has not run."""
        path = self / ATTRIBUTES
        return pd.read_parquet(path) if path.exists() else None

    def attributes_of(self) -> dict[str, dict[str, Any]]:
        """{image path: attributes row}; {} before the attributes stage."""
        df = self.attributes()
        if df is None:
            return {}
        return {str(r["path"]): r for r in df.to_dict("records")}
