"""Leakage audit: exact, near-duplicate and same-identity pairs between image sets, and cross-split references."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1
# Strongest first: a pair gets the first kind that holds.
LEAK_KINDS = ("exact", "near_duplicate", "same_identity")
REFERENCE_KIND = "reference_cross_split"
LEAKS_COLUMNS = [
    "set_a",
    "set_b",
    "kind",
    "image_a",
    "image_b",
    "similarity",
    "distance",
    "phash_distance",
    "mirrored",
    "path_a",
    "path_b",
]
SOURCE_KINDS = ("root", "split_list", "references", "folder", "memory")
METRICS = ("cosine", "euclidean")
IDENTITY_RULES = ("cluster", "pair")
# Perceptual hashes are 64 bits; 10 differing bits is the usual "same picture" bar for DCT hashes.
DEFAULT_PHASH_DISTANCE = 10


@dataclass
class AuditConfig:
    """How the audit decides what a leak is (flags of ``refface audit`` map onto these one to one).

    Attributes:
        identity_rule: ``cluster`` (default): two faces are the same person when the builder's
            identity clustering (``refface.mining.cluster``, its default method and cut) of the two
            sets together puts them in one cluster, so a split made from those clusters audits
            clean; ``pair``: any cross pair closer than the identity threshold (ReF-LDM's raw rule;
            with weak embedders such as dlib it flags look-alikes, about 1% of unrelated pairs).
        identity_threshold: same-identity distance bar in the embedder's metric (the builder's rule:
            ``distance < threshold``); None = the value recorded with the embeddings.
        near_dup_threshold: a near-duplicate's faces must also be closer than this embedding distance;
            None = a quarter of the identity threshold (0.1 for ArcFace at 0.4, ReF-LDM's bar).
        phash_distance: perceptual-hash Hamming distance (of 64 bits, image or its mirror) at or below
            which two images are near-duplicates, when their faces are also within the near-duplicate
            bar (or either image has no face to compare). Both are required: aligned faces of
            different people can hash alike, and with dlib different photos of one person can sit
            inside the embedding bar.
        max_leak_rate: the audit fails (non-zero exit) when any pair of sets leaks more than this
            fraction of images, or any reference list crosses splits.
        detector: face detector used when a plain folder has to be mined.
        embedder: face embedder used when a plain folder has to be mined; must match the other sets.
        workers: worker processes for hashing and mining.
        index: FAISS index kind ("auto", "flat", "ivf"), as in the mining core.
        sheet_pairs: leaked pairs shown side by side in the report, per pair of sets.
        hist_sample: images per set whose nearest same-set neighbour feeds the histogram.
        hash_images: decode images for content and perceptual hashes (off only for embedding-only audits).
        image_root: folder that split lists and reference CSVs outside a dataset root are relative to.
        cache_dir: where hashes and mined folders are kept between runs; None = ``<out>/cache``.
        seed: seed of the histogram sample.
    """

    identity_rule: str = "cluster"
    identity_threshold: float | None = None
    near_dup_threshold: float | None = None
    phash_distance: int = DEFAULT_PHASH_DISTANCE
    max_leak_rate: float = 0.0
    detector: str = "dlib"
    embedder: str = "dlib"
    workers: int = 2
    index: str = "auto"
    sheet_pairs: int = 24
    hist_sample: int = 5000
    hash_images: bool = True
    image_root: str | None = None
    cache_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.identity_threshold is not None and self.identity_threshold <= 0:
            raise ValueError(f"identity_threshold must be > 0, got {self.identity_threshold}")
        if self.near_dup_threshold is not None and self.near_dup_threshold < 0:
            raise ValueError(f"near_dup_threshold must be >= 0, got {self.near_dup_threshold}")
        if not 0 <= self.phash_distance <= 64:
            raise ValueError(f"phash_distance counts differing bits of 64, got {self.phash_distance}")
        if not 0 <= self.max_leak_rate <= 1:
            raise ValueError(f"max_leak_rate is a fraction in [0, 1], got {self.max_leak_rate}")
        if self.identity_rule not in IDENTITY_RULES:
            raise ValueError(
                f"identity_rule must be one of {', '.join(IDENTITY_RULES)}, got {self.identity_rule!r}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class AuditSet:
    """One image set as the audit sees it.

    ``keys`` name the images (paths relative to their image root), ``paths`` locate them on disk
    (None when unknown), ``vectors`` hold one row per face with ``owner`` the image index of each row;
    ``identity`` holds the dataset root's own identity label per face row when its
    ``identities.parquet`` is current (-1 = singleton).
    """

    name: str
    source: str
    kind: str
    keys: list[str]
    paths: list[str | None]
    vectors: np.ndarray
    owner: np.ndarray
    model: dict = field(default_factory=dict)
    root: str | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)
    hashes: pd.DataFrame | None = None
    identity: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown set kind {self.kind!r}")
        if len(self.keys) != len(self.paths):
            raise ValueError(f"set {self.name}: {len(self.keys)} keys but {len(self.paths)} paths")
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.owner = np.asarray(self.owner, dtype=np.int64)
        if vectors.ndim != 2 or len(vectors) != len(self.owner):
            raise ValueError(
                f"set {self.name}: vectors {vectors.shape} do not match {len(self.owner)} owner rows"
            )
        self.vectors = vectors

    @property
    def n_images(self) -> int:
        return len(self.keys)


# ----------------------------------------------------------------------------- thresholds


def distance_to_dot(distance: float, metric: str) -> float:
    """The inner-product bar equivalent to ``distance < threshold`` for unit vectors in ``metric``."""
    if metric == "cosine":
        return 1.0 - float(distance)
    if metric == "euclidean":
        return 1.0 - float(distance) ** 2 / 2.0
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def dot_to_distance(dot: np.ndarray, metric: str) -> np.ndarray:
    dot = np.asarray(dot, dtype=np.float64)
    if metric == "cosine":
        return 1.0 - dot
    return np.sqrt(np.maximum(2.0 - 2.0 * dot, 0.0))


@dataclass(frozen=True)
class Thresholds:
    """Resolved bars of one audit, in the embedder's metric and as inner products."""

    metric: str
    identity: float
    near_duplicate: float
    phash_distance: int
    rule: str = "pair"
    cluster_method: str = ""
    cluster_threshold: float = 0.0

    @property
    def identity_dot(self) -> float:
        return distance_to_dot(self.identity, self.metric)

    @property
    def near_duplicate_dot(self) -> float:
        return distance_to_dot(self.near_duplicate, self.metric)


def resolve_thresholds(model: dict, config: AuditConfig) -> Thresholds:
    """Thresholds from the config, falling back to what the embeddings record."""
    from refface.mining.references import NEAR_DUPLICATE_RATIO

    metric = str(model.get("metric") or "cosine")
    identity = config.identity_threshold
    if identity is None:
        identity = model.get("identity_threshold")
    if identity is None:
        raise ValueError(
            "no identity threshold: the embeddings record none; pass --identity-threshold "
            "(a distance in the embedder's metric, e.g. 0.4 cosine for ArcFace)"
        )
    near = config.near_dup_threshold
    if near is None:
        near = NEAR_DUPLICATE_RATIO * float(identity)
    if near > identity:
        raise ValueError(f"near-duplicate bar {near} is looser than the identity bar {identity}; lower it")
    rule = config.identity_rule
    method, cut = "", 0.0
    if rule == "cluster":
        from types import SimpleNamespace

        from refface.mining.cluster import DEFAULT_METHOD, cosine_threshold, default_threshold

        method = DEFAULT_METHOD
        if config.identity_threshold is not None:
            cut = cosine_threshold(float(identity), metric)
        else:
            # The builder's cut for this model (average linkage has its own measured cut per model).
            cut = default_threshold(SimpleNamespace(**{**model, "identity_threshold": identity}), method)
    return Thresholds(
        metric, float(identity), float(near), int(config.phash_distance), rule, method, float(cut)
    )


# ----------------------------------------------------------------------------- sources


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


def is_dataset_root(path: Path) -> bool:
    return path.is_dir() and (path / "embeddings.json").exists() and (path / "images.parquet").exists()


def find_dataset_root(path: Path, levels: int = 3) -> Path | None:
    """The dataset root holding ``path`` (itself or up to ``levels`` parents), if any."""
    here = path if path.is_dir() else path.parent
    for _ in range(levels + 1):
        if is_dataset_root(here):
            return here
        if here.parent == here:
            break
        here = here.parent
    return None


def root_image_dir(root: Path) -> Path | None:
    """The image folder a dataset root's relative paths point into, as its stage manifests record it."""
    import json

    candidates = []
    stages = root / ".stages"
    if stages.is_dir():
        for manifest in sorted(stages.glob("*.json")):
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            for section in (data, data.get("inputs") or {}, data.get("config") or {}):
                if isinstance(section, dict):
                    for key in ("image_root", "images_root", "image_dir", "images"):
                        value = section.get(key)
                        if isinstance(value, str):
                            candidates.append(value)
    for value in candidates:
        p = Path(value)
        p = p if p.is_absolute() else (root / p)
        if p.is_dir():
            return p.resolve()
    return None


def _load_root(root: Path) -> dict:
    """Images, embeddings and model facts of one dataset root (cached per call site)."""
    from refface.mining.embed import load_embeddings

    emb = load_embeddings(root)
    images = pd.read_parquet(root / "images.parquet", columns=["path"])
    image_dir = root_image_dir(root)
    model = {
        "model": getattr(emb, "model", None),
        "fingerprint": getattr(emb, "fingerprint", None),
        "metric": getattr(emb, "metric", "cosine"),
        "identity_threshold": getattr(emb, "identity_threshold", None),
    }
    return {
        "keys": [str(p) for p in images["path"]],
        "vectors": np.asarray(emb.vectors, dtype=np.float32),
        "row_paths": [str(p) for p in emb.paths],
        "model": model,
        "image_dir": image_dir,
        "identity": root_identities(root, [str(p) for p in emb.paths]),
    }


def root_identities(root: Path, row_paths: list[str]) -> np.ndarray | None:
    """The builder's identity label of every embedding row, from ``identities.parquet``.

    None when the table is missing, older than the embeddings or does not cover every row: then
    the audit clusters the sets itself with the same method.
    """
    table = root / "identities.parquet"
    emb = root / "embeddings.json"  # written last with the vectors, single file or shards
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
    from refface.mining.pipeline import MiningConfig, mine_folder

    mine_folder(
        folder,
        cache,
        MiningConfig(detector=config.detector, embedder=config.embedder, workers=config.workers),
    )
    return cache


def _listed_paths(source: Path, kind: str) -> list[str]:
    if kind == "split_list":
        from refface.manifests.splits import read_split_list

        return read_split_list(source)
    from refface.manifests.references import read_references

    df = read_references(source)
    out: list[str] = []
    for gt, refs in zip(df["gt_image"], df["ref_image"], strict=True):
        out.append(str(gt))
        out.extend(str(r) for r in refs)
    return list(dict.fromkeys(out))


def source_kind(source: Path) -> str:
    """What a SOURCE names: a dataset root, a split list, a reference CSV or a plain folder."""
    if source.is_dir():
        return "root" if is_dataset_root(source) else "folder"
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
    root = find_dataset_root(src)
    if root is not None:
        return _subset_from_root(name, str(src), kind, root, wanted, config.image_root)
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
    mined.errors.extend(_unreadable(Path(mined.root)))
    return mined


def _unreadable(mined_root: Path) -> list[tuple[str, str]]:
    """Images a mined folder could not decode: they are missing from the set, so they are reported."""
    from refface.manifests.errors import ErrorsTable

    decoded = set(pd.read_parquet(mined_root / "images.parquet", columns=["path"])["path"].astype(str))
    return [(r.path, r.reason) for r in ErrorsTable.read(mined_root).rows if r.path not in decoded]


# ----------------------------------------------------------------------------- pair search


def embedding_pairs(
    query: np.ndarray, base: np.ndarray, min_dot: float, index: str = "auto", k0: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (query row, base row) pair with inner product above ``min_dot``, via FAISS k-NN.

    Each query row is searched with a growing k until its k-th neighbour falls below the bar
    (k-NN instead of range search so a GPU index works too).

    Returns:
        (query rows, base rows, similarities, nearest similarity of each query row).
    """
    from refface.mining.neighbors import build_index, search

    nq, nb = len(query), len(base)
    nearest = np.full(nq, -np.inf, dtype=np.float32)
    if nq == 0 or nb == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, np.empty(0, np.float32), nearest
    built = build_index(base, index)
    rows, cols, sims = [], [], []
    todo = np.arange(nq)
    k = min(k0, nb)
    first = True
    while todo.size:
        s, i = search(query[todo], built, k)
        if first:
            nearest[:] = s[:, 0]
            first = False
        inside = (s > min_dot) & (i >= 0)
        saturated = inside[:, -1] if k < nb else np.zeros(todo.size, dtype=bool)
        done = ~saturated
        rows.append(np.repeat(todo[done], inside[done].sum(axis=1)))
        cols.append(i[done][inside[done]])
        sims.append(s[done][inside[done]])
        todo = todo[saturated]
        k = min(nb, k * 4)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32), nearest


def brute_force_pairs(
    query: np.ndarray, base: np.ndarray, min_dot: float, block: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same pair search as :func:`embedding_pairs` by blocked numpy matmul (the baseline)."""
    rows, cols, sims = [], [], []
    for start in range(0, len(query), block):
        s = query[start : start + block] @ base.T
        r, c = np.nonzero(s > min_dot)
        rows.append(r + start)
        cols.append(c)
        sims.append(s[r, c])
    if not rows:
        empty = np.empty(0, np.int64)
        return empty, empty, np.empty(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)


def nearest_same_set(vectors: np.ndarray, sample: int, seed: int, index: str = "auto") -> np.ndarray:
    """Similarity of (a sample of) faces to their nearest other face in the same set."""
    from refface.mining.neighbors import build_index, knn, search

    n = len(vectors)
    if n < 2:
        return np.empty(0, np.float32)
    if n <= sample:
        sims, _ = knn(vectors, 1, index=index)
        return sims[:, 0]
    pick = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    sims, idx = search(vectors[pick], build_index(vectors, index), 2)
    # Drop the query itself (first column unless an exact duplicate tied with it).
    own = idx[:, 0] == pick
    return np.where(own, sims[:, 1], sims[:, 0]).astype(np.float32)


def _image_level(a: AuditSet, b: AuditSet, rows, cols, sims) -> pd.DataFrame:
    df = pd.DataFrame({"ia": a.owner[rows], "ib": b.owner[cols], "similarity": sims.astype(np.float64)})
    if df.empty:
        return df
    return df.groupby(["ia", "ib"], as_index=False)["similarity"].max()


def _pair_similarity(a: AuditSet, b: AuditSet, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Best face-to-face inner product of each image pair; NaN where either image has no face."""
    out = np.full(len(ia), np.nan)
    if len(ia) == 0:
        return out
    faces_a = pd.Series(range(len(a.owner))).groupby(a.owner).apply(list).to_dict()
    faces_b = pd.Series(range(len(b.owner))).groupby(b.owner).apply(list).to_dict()
    for n, (x, y) in enumerate(zip(ia, ib, strict=True)):
        fa, fb = faces_a.get(int(x)), faces_b.get(int(y))
        if fa and fb:
            out[n] = float((a.vectors[fa] @ b.vectors[fb].T).max())
    return out


def hash_pairs(a: AuditSet, b: AuditSet, max_distance: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact (same decoded pixels) and perceptually close image pairs between two hashed sets.

    Returns:
        (exact pairs ``ia, ib``, close pairs ``ia, ib, phash_distance, mirrored``).
    """
    from refface.mining.phash import hamming_pairs

    empty_exact = pd.DataFrame({"ia": [], "ib": []}, dtype=np.int64)
    empty_close = pd.DataFrame({"ia": [], "ib": [], "phash_distance": [], "mirrored": []})
    if a.hashes is None or b.hashes is None:
        return empty_exact, empty_close
    ha = a.hashes.assign(ia=np.arange(a.n_images))
    hb = b.hashes.assign(ib=np.arange(b.n_images))
    # Same decoded pixels; files that do not decode at all still match on identical bytes.
    by_pixels = ha.dropna(subset=["pixel_sha256"]).merge(
        hb.dropna(subset=["pixel_sha256"]), on="pixel_sha256"
    )
    undecoded_a = ha[ha["pixel_sha256"].isna()].dropna(subset=["file_sha256"])
    undecoded_b = hb[hb["pixel_sha256"].isna()].dropna(subset=["file_sha256"])
    by_bytes = undecoded_a.merge(undecoded_b, on="file_sha256")
    exact = pd.concat([by_pixels[["ia", "ib"]], by_bytes[["ia", "ib"]]]).drop_duplicates()
    ok_a = ha["pixel_sha256"].notna().to_numpy()
    ok_b = hb["pixel_sha256"].notna().to_numpy()
    ida, idb = np.nonzero(ok_a)[0], np.nonzero(ok_b)[0]
    codes_b = hb["phash"].to_numpy(np.uint64)[idb]
    found = []
    for mirrored, column in ((False, "phash"), (True, "phash_mirror")):
        i, j, d = hamming_pairs(ha[column].to_numpy(np.uint64)[ida], codes_b, max_distance)
        found.append(pd.DataFrame({"ia": ida[i], "ib": idb[j], "phash_distance": d, "mirrored": mirrored}))
    close = pd.concat(found, ignore_index=True)
    if close.empty:
        return exact.astype(np.int64), empty_close
    # Keep the closer of direct and mirrored match per pair (direct wins ties).
    close = close.sort_values(["ia", "ib", "phash_distance", "mirrored"]).drop_duplicates(["ia", "ib"])
    return exact.astype(np.int64), close.reset_index(drop=True)


def same_cluster_pairs(
    va: np.ndarray, vb: np.ndarray, th: Thresholds, index: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cross-set face pairs that the builder's identity clustering of both sets together joins.

    Returns:
        (rows of ``va``, rows of ``vb``, inner products), one entry per cross pair in a shared cluster.
    """
    from refface.mining.cluster import ClusterConfig, cluster

    if len(va) == 0 or len(vb) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    labels = cluster(
        np.concatenate([va, vb]),
        method=th.cluster_method,
        threshold=th.cluster_threshold,
        config=ClusterConfig(index=index),
    )
    return shared_label_pairs(va, vb, labels[: len(va)], labels[len(va) :])


def shared_label_pairs(
    va: np.ndarray, vb: np.ndarray, la: np.ndarray, lb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cross-set face pair whose identity labels agree (labels < 0 are singletons)."""
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    la, lb = np.asarray(la, dtype=np.int64), np.asarray(lb, dtype=np.int64)
    shared = np.intersect1d(la[la >= 0], lb[lb >= 0])
    if shared.size == 0:
        return empty
    rows, cols, sims = [], [], []
    order_a, order_b = np.argsort(la, kind="stable"), np.argsort(lb, kind="stable")
    start_a = np.searchsorted(la[order_a], shared)
    stop_a = np.searchsorted(la[order_a], shared, side="right")
    start_b = np.searchsorted(lb[order_b], shared)
    stop_b = np.searchsorted(lb[order_b], shared, side="right")
    for s_a, e_a, s_b, e_b in zip(start_a, stop_a, start_b, stop_b, strict=True):
        fa, fb = order_a[s_a:e_a], order_b[s_b:e_b]
        block = va[fa] @ vb[fb].T
        rows.append(np.repeat(fa, len(fb)))
        cols.append(np.tile(fb, len(fa)))
        sims.append(block.ravel())
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)


@dataclass
class PairResult:
    """Everything found between two sets; ``leaks`` is image-level, one row per leaked pair."""

    a: str
    b: str
    leaks: pd.DataFrame
    nearest_cross: np.ndarray
    stats: dict


def audit_pair(a: AuditSet, b: AuditSet, th: Thresholds, config: AuditConfig) -> PairResult:
    """Find and classify every leaked image pair between sets ``a`` and ``b``."""
    timings = {}
    start = time.perf_counter()
    # FAISS indexes the larger set and queries the smaller one.
    swap = len(a.vectors) > len(b.vectors)
    q, base = (b, a) if swap else (a, b)
    # Under the cluster rule this search feeds the histogram; its bar keeps the pair list short.
    bar = th.identity_dot if th.rule == "pair" else th.near_duplicate_dot
    rows, cols, sims, nearest = embedding_pairs(q.vectors, base.vectors, bar, config.index)
    if swap:
        rows, cols = cols, rows
    emb = _image_level(a, b, rows, cols, sims)
    timings["embedding_search_s"] = round(time.perf_counter() - start, 4)
    clustered = pd.DataFrame({"ia": [], "ib": [], "similarity": []})
    identity_source = ""
    if th.rule == "cluster":
        start = time.perf_counter()
        if a.root is not None and a.root == b.root and a.identity is not None and b.identity is not None:
            # Both sets come from one dataset root whose identities the builder already clustered.
            fa, fb, fs = shared_label_pairs(a.vectors, b.vectors, a.identity, b.identity)
            identity_source = f"{a.root}/identities.parquet"
        else:
            fa, fb, fs = same_cluster_pairs(a.vectors, b.vectors, th, config.index)
            identity_source = f"{th.cluster_method} clustering of both sets"
        clustered = _image_level(a, b, fa, fb, fs)
        emb = pd.concat([emb, clustered], ignore_index=True)
        if len(emb):
            emb = emb.groupby(["ia", "ib"], as_index=False)["similarity"].max()
        timings["identity_clustering_s"] = round(time.perf_counter() - start, 4)

    start = time.perf_counter()
    exact, close = hash_pairs(a, b, th.phash_distance)
    timings["hash_search_s"] = round(time.perf_counter() - start, 4)

    cand = pd.concat(
        [emb[["ia", "ib"]] if len(emb) else None, exact, close[["ia", "ib"]] if len(close) else None],
        ignore_index=True,
    )
    cand = (
        cand.drop_duplicates().astype(np.int64)
        if len(cand)
        else pd.DataFrame({"ia": [], "ib": []}, dtype=np.int64)
    )
    cand = cand.merge(emb, on=["ia", "ib"], how="left")
    missing = cand["similarity"].isna().to_numpy()
    if missing.any():
        # Pairs found only by hashes: compare their faces directly (few pairs, exact numbers).
        ia, ib = cand.loc[missing, "ia"].to_numpy(), cand.loc[missing, "ib"].to_numpy()
        cand.loc[missing, "similarity"] = _pair_similarity(a, b, ia, ib)
    cand = cand.merge(close, on=["ia", "ib"], how="left")
    exact_set = set(zip(exact["ia"].tolist(), exact["ib"].tolist(), strict=True))
    is_exact = np.array(
        [(x, y) in exact_set for x, y in zip(cand["ia"], cand["ib"], strict=True)], dtype=bool
    )
    sim = cand["similarity"].to_numpy(np.float64)
    has_face = ~np.isnan(sim)
    hash_close = cand["phash_distance"].notna().to_numpy()
    pair_rule = has_face & (sim > th.identity_dot)
    if th.rule == "cluster":
        in_cluster = set(
            zip(clustered["ia"].astype(int).tolist(), clustered["ib"].astype(int).tolist(), strict=True)
        )
        same_id = np.array(
            [(x, y) in in_cluster for x, y in zip(cand["ia"], cand["ib"], strict=True)], dtype=bool
        )
    else:
        same_id = pair_rule
    # Near-duplicate = the picture hashes alike AND the faces agree within the near-duplicate bar
    # (or there is no face to compare); either test alone misfires (see AuditConfig).
    near = hash_close & (~has_face | (sim > th.near_duplicate_dot))
    kind = np.where(
        is_exact, "exact", np.where(near, "near_duplicate", np.where(same_id, "same_identity", ""))
    )
    rejected = int((hash_close & ~is_exact & ~near).sum())
    cand["kind"] = kind
    leaks = cand[cand["kind"] != ""].copy()
    leaks["distance"] = dot_to_distance(leaks["similarity"].to_numpy(np.float64), th.metric)
    leaks["phash_distance"] = leaks["phash_distance"].fillna(-1).astype(np.int64)
    leaks["mirrored"] = leaks["mirrored"].to_numpy(dtype=float, na_value=0.0) > 0
    order = pd.Categorical(leaks["kind"], categories=list(LEAK_KINDS), ordered=True)
    leaks = (
        leaks.assign(_k=order.codes, _s=-leaks["similarity"].fillna(2.0))
        .sort_values(["_k", "_s", "ia", "ib"])
        .drop(columns=["_k", "_s"])
        .reset_index(drop=True)
    )
    stats = _pair_stats(a, b, leaks, th, rejected)
    stats["identities_from"] = identity_source if th.rule == "cluster" else "pairs under the identity bar"
    stats["timings"] = timings
    return PairResult(a.name, b.name, leaks, nearest, stats)


def count_components(edges_a: np.ndarray, edges_b: np.ndarray) -> int:
    """Connected components of the bipartite leak graph: each one is a person seen on both sides."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(edges_a) == 0:
        return 0
    ua, ia = np.unique(edges_a, return_inverse=True)
    ub, ib = np.unique(edges_b, return_inverse=True)
    n = len(ua) + len(ub)
    g = coo_matrix((np.ones(len(ia)), (ia, ib + len(ua))), shape=(n, n))
    return int(connected_components(g, directed=False)[0])


def thresholds_dict(th: Thresholds) -> dict:
    out = {
        "identity_rule": th.rule,
        "metric": th.metric,
        "identity_distance": th.identity,
        "near_duplicate_distance": th.near_duplicate,
        "phash_distance": th.phash_distance,
    }
    if th.rule == "cluster":
        out["cluster_method"] = th.cluster_method
        out["cluster_cosine_distance"] = th.cluster_threshold
    return out


def _pair_stats(a: AuditSet, b: AuditSet, leaks: pd.DataFrame, th: Thresholds, rejected: int) -> dict:
    la = leaks["ia"].nunique() if len(leaks) else 0
    lb = leaks["ib"].nunique() if len(leaks) else 0
    rate_a = la / a.n_images if a.n_images else 0.0
    rate_b = lb / b.n_images if b.n_images else 0.0
    by_kind = {k: int((leaks["kind"] == k).sum()) for k in LEAK_KINDS}
    return {
        "sets": [a.name, b.name],
        "images": {a.name: a.n_images, b.name: b.n_images},
        "faces": {a.name: len(a.vectors), b.name: len(b.vectors)},
        "leaked_images": {a.name: int(la), b.name: int(lb)},
        "leak_rates": {a.name: rate_a, b.name: rate_b},
        # The gate reads the worse side: a small test set fully contained in train is a 100% leak.
        "leak_rate": max(rate_a, rate_b),
        "leaked_identities": count_components(leaks["ia"].to_numpy(), leaks["ib"].to_numpy())
        if len(leaks)
        else 0,
        "leaked_pairs": int(len(leaks)),
        "pairs_by_kind": by_kind,
        "phash_matches_not_near_duplicates": rejected,
        "thresholds": thresholds_dict(th),
    }


# ----------------------------------------------------------------------------- references


def reference_cross_splits(root: Path) -> tuple[pd.DataFrame, dict]:
    """Reference rows of a dataset root whose target and reference sit in different splits.

    Looks for ``{split}_image.txt`` and ``{split}_references.csv`` in the root and its direct
    sub-folders (each folder checked on its own).
    """
    from refface.manifests.references import read_references
    from refface.manifests.splits import read_split_lists

    rows = []
    checked = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        splits = read_split_lists(folder)
        if not splits:
            continue
        split_of: dict[str, str] = {}
        for split, paths in splits.items():
            for p in paths:
                split_of[p] = split
        for csv in sorted(folder.glob("*_references.csv")):
            try:
                refs = read_references(csv)
            except ValueError as e:
                log.warning("%s", e)
                checked[str(csv)] = {"error": str(e)}
                continue
            n_bad = 0
            for gt, ref_list in zip(refs["gt_image"], refs["ref_image"], strict=True):
                for ref in ref_list:
                    sg, sr = split_of.get(str(gt)), split_of.get(str(ref))
                    if sg is not None and sr is not None and sg != sr:
                        n_bad += 1
                        rows.append(
                            {
                                "set_a": sg,
                                "set_b": sr,
                                "kind": REFERENCE_KIND,
                                "image_a": gt,
                                "image_b": ref,
                                "list": str(csv),
                            }
                        )
            checked[str(csv)] = {"rows": int(len(refs)), "cross_split_references": n_bad}
    return pd.DataFrame(rows, columns=["set_a", "set_b", "kind", "image_a", "image_b", "list"]), checked


# ----------------------------------------------------------------------------- the audit


def check_models(sets: list[AuditSet]) -> dict:
    """All sets must come from one embedder (same weights fingerprint); returns that model."""
    models = {s.name: s.model for s in sets if len(s.vectors)}
    prints = {name: (m.get("model"), m.get("fingerprint")) for name, m in models.items()}
    if len(set(prints.values())) > 1:
        listing = ", ".join(f"{n}: {m[0]} {str(m[1])[:12]}" for n, m in prints.items())
        raise ValueError(
            f"sets were embedded by different models ({listing}); embeddings from different models "
            "cannot be compared: re-mine the sets with one embedder"
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
    from refface.mining.phash import HASH_COLUMNS, hash_frame, hash_images

    rows = [dict.fromkeys(HASH_COLUMNS) for _ in range(s.n_images)]
    present = [i for i, p in enumerate(s.paths) if p is not None]
    if present:
        cache = cache_dir / "hashes.parquet" if cache_dir is not None else None
        found = hash_images([s.paths[i] for i in present], cache, workers, description=f"hashing {s.name}")
        for i, rec in zip(present, found.to_dict("records"), strict=True):
            rows[i] = rec
            if isinstance(rec["error"], str) and rec["error"]:
                s.errors.append((s.keys[i], rec["error"]))
    s.hashes = hash_frame(rows)


def run_audit(sets: list[AuditSet], config: AuditConfig, cache_dir: Path | None = None) -> dict:
    """Audit loaded sets: every pair of sets, plus reference lists of each dataset root involved.

    Returns:
        ``{"summary": dict, "leaks": DataFrame, "pairs": [PairResult], "same_nearest": {set: array},
        "thresholds": Thresholds, "references": DataFrame}``.
    """
    from refface.console import track

    model = check_models(sets)
    th = resolve_thresholds(model, config)
    if config.hash_images:
        for s in sets:
            attach_hashes(s, cache_dir, config.workers)
    same_nearest = {
        s.name: nearest_same_set(s.vectors, config.hist_sample, config.seed, config.index) for s in sets
    }
    pairs = [(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    results = [audit_pair(a, b, th, config) for a, b in track(pairs, "auditing pairs of sets")]
    roots = sorted({s.root for s in sets if s.root and s.kind != "folder"})
    ref_frames, ref_checked = [], {}
    for root in roots:
        frame, checked = reference_cross_splits(Path(root))
        ref_frames.append(frame)
        ref_checked[root] = checked
    references = pd.concat(ref_frames, ignore_index=True) if ref_frames else reference_cross_splits_empty()
    leaks = leaks_table(sets, results)
    summary = build_summary(sets, results, th, model, config, references, ref_checked)
    return {
        "summary": summary,
        "leaks": leaks,
        "pairs": results,
        "same_nearest": same_nearest,
        "thresholds": th,
        "references": references,
    }


def reference_cross_splits_empty() -> pd.DataFrame:
    return pd.DataFrame(columns=["set_a", "set_b", "kind", "image_a", "image_b", "list"])


def leaks_table(sets: list[AuditSet], results: list[PairResult]) -> pd.DataFrame:
    """All leaked pairs of all set pairs, in :data:`LEAKS_COLUMNS` order."""
    by_name = {s.name: s for s in sets}
    frames = []
    for r in results:
        a, b = by_name[r.a], by_name[r.b]
        df = r.leaks
        frames.append(
            pd.DataFrame(
                {
                    "set_a": r.a,
                    "set_b": r.b,
                    "kind": df["kind"],
                    "image_a": [a.keys[i] for i in df["ia"]],
                    "image_b": [b.keys[i] for i in df["ib"]],
                    "similarity": df["similarity"].round(6),
                    "distance": df["distance"].round(6),
                    "phash_distance": df["phash_distance"],
                    "mirrored": df["mirrored"],
                    "path_a": [a.paths[i] for i in df["ia"]],
                    "path_b": [b.paths[i] for i in df["ib"]],
                }
            )
        )
    if not frames:
        return pd.DataFrame(columns=LEAKS_COLUMNS)
    return pd.concat(frames, ignore_index=True)[LEAKS_COLUMNS]


def build_summary(
    sets: list[AuditSet],
    results: list[PairResult],
    th: Thresholds,
    model: dict,
    config: AuditConfig,
    references: pd.DataFrame,
    ref_checked: dict,
) -> dict:
    from refface import __version__

    worst = max((r.stats["leak_rate"] for r in results), default=0.0)
    n_cross_refs = int(len(references))
    failed_pairs = [f"{r.a}~{r.b}" for r in results if r.stats["leak_rate"] > config.max_leak_rate]
    return {
        "version": SUMMARY_VERSION,
        "refface_version": __version__,
        "model": {
            "model": model.get("model"),
            "fingerprint": model.get("fingerprint"),
            "metric": th.metric,
            "identity_threshold": th.identity,
        },
        "exact_duplicates_by": "sha256 of decoded RGB pixels (file bytes for files that do not decode)",
        "near_duplicates_by": (
            "64-bit DCT perceptual hash of the image or of its mirror within phash_distance bits AND face "
            "embeddings closer than the near-duplicate bar (hash alone when an image has no face)"
        ),
        "thresholds": {**thresholds_dict(th), "max_leak_rate": config.max_leak_rate},
        "sets": {
            s.name: {
                "source": s.source,
                "kind": s.kind,
                "root": s.root,
                "images": s.n_images,
                "faces": int(len(s.vectors)),
                "images_with_face": int(len(np.unique(s.owner))),
                "errors": len(s.errors),
            }
            for s in sets
        },
        "pairs": {f"{r.a}~{r.b}": r.stats for r in results},
        "references": {"checked": ref_checked, "cross_split_references": n_cross_refs},
        "worst_leak_rate": worst,
        "passed": not failed_pairs and n_cross_refs == 0,
        "failed_pairs": failed_pairs,
        "config": asdict(config),
    }


def write_outputs(out_dir: Path, result: dict, sets: list[AuditSet]) -> dict[str, str]:
    """Write summary.json, leaks.csv, errors.csv/parquet and report.html atomically into ``out_dir``."""
    from refface.builders.audit_report import write_report
    from refface.manifests.atomic import write_json, write_text
    from refface.manifests.errors import ErrorsTable

    out_dir.mkdir(parents=True, exist_ok=True)
    leaks = result["leaks"]
    refs = result["references"]
    if len(refs):
        extra = refs.drop(columns=["list"]).assign(similarity=np.nan, distance=np.nan, phash_distance=-1)
        extra = extra.assign(mirrored=False, path_a=None, path_b=None)[LEAKS_COLUMNS]
        leaks = pd.concat([leaks, extra], ignore_index=True)
    write_text(out_dir / "leaks.csv", leaks.to_csv(index=False, lineterminator="\n"))
    errors = ErrorsTable()
    for s in sets:
        for path, reason in s.errors:
            errors.add(f"{s.name}:{path}", "audit", reason)
    errors.write(out_dir)
    write_json(out_dir / "summary.json", result["summary"])
    write_report(out_dir / "report.html", result, sets)
    return {
        "summary": str(out_dir / "summary.json"),
        "leaks": str(out_dir / "leaks.csv"),
        "report": str(out_dir / "report.html"),
    }


def audit_sets(sets: dict[str, Any], out_dir: str | os.PathLike, config: AuditConfig | None = None) -> dict:
    """Audit named sets for leakage and write summary.json, leaks.csv and report.html into ``out_dir``.

    Args:
        sets: ``{name: source}``; a source is a split list (``*_image.txt``), a reference CSV, a
            dataset root (its embeddings are reused), a plain folder (mined into
            ``<cache>/mined/<name>``) or an already loaded :class:`AuditSet`.
        out_dir: output folder.
        config: audit settings; defaults to :class:`AuditConfig`.

    Returns:
        The summary dict (also written as ``summary.json``); ``summary["passed"]`` is the gate.
    """
    config = config or AuditConfig()
    if len(sets) < 2:
        raise ValueError("an audit needs at least two sets")
    out = Path(out_dir)
    cache = Path(config.cache_dir) if config.cache_dir else out / "cache"
    loaded = []
    for name, source in sets.items():
        loaded.append(source if isinstance(source, AuditSet) else resolve_set(name, source, cache, config))
    start = time.perf_counter()
    result = run_audit(loaded, config, cache)
    result["summary"]["timings"] = {"audit_s": round(time.perf_counter() - start, 3)}
    write_outputs(out, result, loaded)
    return result["summary"]
