"""What an audit is made of: its settings, the image sets it compares, the resolved thresholds and the
results it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from refface.mining.tta import DEFAULT_TTA

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
        tta: the embedder's test-time augmentation when a plain folder has to be mined (``none`` or
            ``flip``); must match the other sets.
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
    tta: str = DEFAULT_TTA
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


@dataclass
class PairResult:
    """Everything found between two sets; ``leaks`` is image-level, one row per leaked pair."""

    a: str
    b: str
    leaks: pd.DataFrame
    nearest_cross: np.ndarray
    stats: dict


@dataclass
class AuditResult:
    """Everything one audit found: the summary (also ``summary.json``), every leaked image pair,
    the per-pair results, each set's nearest same-set similarities (the histogram), the resolved
    thresholds and the reference rows that cross splits."""

    summary: dict
    leaks: pd.DataFrame
    pairs: list[PairResult]
    same_nearest: dict[str, np.ndarray]
    thresholds: Thresholds
    references: pd.DataFrame
