"""Audit sets from their sources: dataset roots (embeddings reused), split lists and reference CSVs
(resolved inside their root, or staged and mined), plain folders (mined), and their image hashes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.audit.config import AuditConfig, AuditSet
from refface.manifests.errors import ErrorsTable
from refface.manifests.layout import EMBEDDINGS_META, IDENTITIES, IMAGES
from refface.manifests.references import read_references
from refface.manifests.root import DatasetRoot
from refface.manifests.splits import read_split_list
from refface.mining.phash import HASH_COLUMNS, hash_frame, hash_images
from refface.mining.pipeline import MiningConfig, mine_folder

log = logging.getLogger(__name__)


def parse_set_specs(specs: list[str]) -> dict[str, str]:
    """``["train=a.txt", "test=dir"]`` -> ``{"train": "a.txt", "test": "dir"}``; clear errors on bad specs."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ValueError(f"--set takes NAME=SOURCE (e.g. train=out/ffhq/train_image.txt), got {spec!r}")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"set name {name!r} must be letters, digits, '-' or '_'")
        if name in out:
            raise ValueError(f"set {name!r} given twice")
        out[name] = source
    if len(out) < 2:
        raise ValueError("an audit needs at least two sets: --set NAME=SOURCE --set NAME=SOURCE")
    return out


def find_dataset_root(path: Path, levels: int = 3) -> Path | None:
    """The mined dataset root holding ``path`` (itself or up to ``levels`` parents), if any."""
    here = path if path.is_dir() else path.parent
    for _ in range(levels + 1):
        if DatasetRoot(here).has_embeddings():
            return here
        if here.parent == here:
            break
        here = here.parent
    return None


def root_image_dir(root: Path) -> Path | None:
    """The existing image folder a dataset root's relative paths point into (resolved), else None."""
    folder = DatasetRoot(root).image_root()
    return folder.resolve() if folder is not None and folder.is_dir() else None


def _load_root(root: Path) -> dict:
    """Images, embeddings and model facts of one dataset root (cached per call site)."""
    dataset = DatasetRoot(root)
    emb = dataset.embeddings()
    images = pd.read_parquet(dataset / IMAGES, columns=["path"])
    model = {
        "model": emb.model,
        "fingerprint": emb.fingerprint,
        "metric": emb.metric,
        "identity_threshold": emb.identity_threshold,
        "tta": emb.tta,
    }
    return {
        "keys": [str(p) for p in images["path"]],
        "vectors": np.asarray(emb.vectors, dtype=np.float32),
        "row_paths": [str(p) for p in emb.paths],
        "model": model,
        "image_dir": root_image_dir(root),
        "identity": root_identities(root, [str(p) for p in emb.paths]),
    }


def root_identities(root: Path, row_paths: list[str]) -> np.ndarray | None:
    """The builder's identity label of every embedding row, from ``identities.parquet``.

    None when the table is missing, older than the embeddings or does not cover every row: then
    the audit clusters the sets itself with the same method.
    """
    table = root / IDENTITIES
    emb = root / EMBEDDINGS_META  # written last with the vectors, single file or shards
    if not table.exists() or (emb.exists() and table.stat().st_mtime_ns < emb.stat().st_mtime_ns):
        return None
    df = pd.read_parquet(table, columns=["path", "identity"])
    labels = dict(zip(df["path"].astype(str), df["identity"].astype(np.int64), strict=True))
    if len(labels) != len(df) or any(p not in labels for p in row_paths):
        log.info("%s: identities.parquet does not cover the embeddings; clustering instead", root)
        return None
    return np.array([labels[p] for p in row_paths], dtype=np.int64)


def _subset_from_root(
    name: str, source: str, kind: str, root: Path, wanted: list[str] | None, image_root: str | None
) -> AuditSet:
    data = _load_root(root)
    keys_all = data["keys"]
    index = {k: i for i, k in enumerate(keys_all)}
    errors: list[tuple[str, str]] = []
    if wanted is None:
        keys = keys_all
    else:
        # Lists may name files by base name only (published FFHQ lists do); match those when unique.
        by_base: dict[str, list[str]] = {}
        for k in keys_all:
            by_base.setdefault(os.path.basename(k), []).append(k)
        keys = []
        for w in dict.fromkeys(wanted):
            if w in index:
                keys.append(w)
            elif len(by_base.get(os.path.basename(w), [])) == 1:
                keys.append(by_base[os.path.basename(w)][0])
            else:
                errors.append((w, f"not an image of dataset root {root}"))
    pos = {k: i for i, k in enumerate(keys)}
    rows = [r for r, p in enumerate(data["row_paths"]) if p in pos]
    owner = np.array([pos[data["row_paths"][r]] for r in rows], dtype=np.int64)
    base = Path(image_root) if image_root else data["image_dir"]
    paths = [str(base / k) if base is not None else None for k in keys]
    if base is None:
        log.warning("%s: dataset root %s does not record its image folder; hashing skipped", name, root)
    return AuditSet(
        name=name,
        source=source,
        kind=kind,
        keys=keys,
        paths=paths,
        vectors=data["vectors"][rows] if rows else np.zeros((0, data["vectors"].shape[1]), np.float32),
        owner=owner,
        model=data["model"],
        root=str(root),
        errors=errors,
        identity=data["identity"][rows] if data["identity"] is not None else None,
    )


def _mine(folder: Path, cache: Path, config: AuditConfig) -> Path:
    """Mine a plain folder into ``cache`` (resumable: the pipeline skips finished stages)."""

    mine_folder(
        folder,
        cache,
        MiningConfig(
            detector=config.detector, embedder=config.embedder, tta=config.tta, workers=config.workers
        ),
    )
    return cache


def _listed_paths(source: Path, kind: str) -> list[str]:
    if kind == "split_list":
        return read_split_list(source)

    df = read_references(source)
    out: list[str] = []
    for gt, refs in zip(df["gt_image"], df["ref_image"], strict=True):
        out.append(str(gt))
        out.extend(str(r) for r in refs)
    return list(dict.fromkeys(out))


def source_kind(source: Path) -> str:
    """What a SOURCE names: a dataset root, a split list, a reference CSV or a plain folder."""
    if source.is_dir():
        return "root" if DatasetRoot(source).has_embeddings() else "folder"
    if source.is_file() and source.suffix == ".txt":
        return "split_list"
    if source.is_file() and source.suffix == ".csv":
        return "references"
    if not source.exists():
        raise ValueError(f"set source not found: {source}")
    raise ValueError(
        f"cannot audit {source}: expected a split list (*_image.txt), a reference CSV (gt_image, ref_image), "
        "a dataset root (images.parquet + embeddings.json) or a folder of images"
    )


def resolve_set(name: str, source: str | os.PathLike, cache_dir: Path, config: AuditConfig) -> AuditSet:
    """Turn one ``NAME=SOURCE`` into an :class:`AuditSet`, mining a plain folder when needed."""
    src = Path(source).expanduser()
    kind = source_kind(src)
    if kind == "root":
        return _subset_from_root(name, str(src), kind, src, None, config.image_root)
    if kind == "folder":
        root = _mine(src, cache_dir / "mined" / name, config)
        out = _subset_from_root(name, str(src), kind, root, None, None)
        if out.paths and out.paths[0] is None:
            out.paths = [str(src / k) for k in out.keys]
        out.errors.extend(_unreadable(root))
        return out
    wanted = _listed_paths(src, kind)
    listed_root = find_dataset_root(src)
    if listed_root is not None:
        return _subset_from_root(name, str(src), kind, listed_root, wanted, config.image_root)
    # A list outside any dataset root: its paths are relative to --image-root (or the list's folder).
    base = Path(config.image_root) if config.image_root else src.parent
    staged = cache_dir / "listed" / name / "images"
    if staged.exists():
        # A previous run may have listed other files: only this list's images may be mined.
        keep = {str(staged / rel) for rel in wanted}
        for link in staged.rglob("*"):
            if link.is_symlink() and str(link) not in keep:
                link.unlink()
    errors = []
    for rel in wanted:
        target = base / rel
        link = staged / rel
        if not target.is_file():
            errors.append((rel, f"listed image not found under {base}"))
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(target.resolve(), link)
    mined = _subset_from_root(
        name, str(src), kind, _mine(staged, cache_dir / "mined" / name, config), None, None
    )
    mined.paths = [str(base / k) for k in mined.keys]
    mined.errors.extend(errors)
    if mined.root is not None:
        mined.errors.extend(_unreadable(Path(mined.root)))
    return mined


def _unreadable(mined_root: Path) -> list[tuple[str, str]]:
    """Images a mined folder could not decode: they are missing from the set, so they are reported."""

    decoded = set(pd.read_parquet(mined_root / IMAGES, columns=["path"])["path"].astype(str))
    return [(r.path, r.reason) for r in ErrorsTable.read(mined_root).rows if r.path not in decoded]


def check_models(sets: list[AuditSet]) -> dict:
    """All sets must come from one embedder (same weights fingerprint, same test-time
    augmentation); returns that model."""
    models = {s.name: s.model for s in sets if len(s.vectors)}
    prints = {
        name: (m.get("model"), m.get("fingerprint"), m.get("tta", "none")) for name, m in models.items()
    }
    if len(set(prints.values())) > 1:
        listing = ", ".join(f"{n}: {m[0]} {str(m[1])[:12]} tta {m[2]}" for n, m in prints.items())
        raise ValueError(
            f"sets were embedded differently ({listing}); embeddings from different models or "
            "augmentations cannot be compared: re-mine the sets with one embedder and one --tta"
        )
    dims = {s.vectors.shape[1] for s in sets if len(s.vectors)}
    if len(dims) > 1:
        raise ValueError(f"embedding dimensions differ between sets: {sorted(dims)}")
    if models:
        return next(iter(models.values()))
    # No set has a face: thresholds still come from whatever model the sets name.
    return next((s.model for s in sets if s.model), {})


def attach_hashes(s: AuditSet, cache_dir: Path | None, workers: int) -> None:
    """Hash the set's images (cached); undecodable images become error rows."""

    rows: list[dict[str, Any]] = [dict.fromkeys(HASH_COLUMNS) for _ in range(s.n_images)]
    present = [i for i, p in enumerate(s.paths) if p is not None]
    if present:
        cache = cache_dir / "hashes.parquet" if cache_dir is not None else None
        found = hash_images(
            [str(s.paths[i]) for i in present], cache, workers, description=f"hashing {s.name}"
        )
        for i, rec in zip(present, found.to_dict("records"), strict=True):
            rows[i] = rec
            if isinstance(rec["error"], str) and rec["error"]:
                s.errors.append((s.keys[i], rec["error"]))
    s.hashes = hash_frame(rows)
