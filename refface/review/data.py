"""What the review page shows, computed from a built dataset root.

Per identity: its faces ordered by cosine distance to the cluster medoid (the member with the smallest
summed distance to the others), each face's distance, and the cluster's outlier bar: the larger of the
identity threshold and Tukey's upper fence (Q3 + 1.5 IQR) of the cluster's own distances, so a face is
flagged only when it is both farther than the same-identity bar and unusual for its cluster.

Cluster pairs whose average cross distance (exactly ``1 - mean_a . mean_b`` for unit vectors) lies under
``near_ratio x threshold`` are "possible same person" pairs; singletons whose average distance to a
cluster lies under the same bar are listed under the nearest such cluster. With known labels
(``path, identity`` CSV, partial is fine), a cluster holding faces of two or more labels shows each
label's group side by side: the same person under two sources' names, or two people joined.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.manifests.layout import IDENTITIES
from refface.manifests.references import read_references
from refface.manifests.root import DatasetRoot
from refface.mining.cluster import default_threshold
from refface.review.stage import CLUSTERED_FILE

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ReviewConfig:
    """Settings of ``refface review``.

    Attributes:
        near_ratio: cluster pairs (and singletons) with an average distance under ``near_ratio x
            threshold`` are shown as possible same person.
        max_pairs: most "possible same person" partners listed per identity (nearest first).
        thumb_size: side of the square JPEG thumbnails.
        max_refs_shown: longest reference list kept per target (train targets of a large identity list
            every other image of it).
        workers: processes writing thumbnails.
        labels: optional ``path, identity`` CSV of known labels (empty identity = unknown).
    """

    near_ratio: float = 1.25
    max_pairs: int = 3
    thumb_size: int = 96
    max_refs_shown: int = 24
    workers: int = 2
    labels: str | None = None

    def __post_init__(self) -> None:
        if self.near_ratio <= 0 or self.max_pairs < 0 or self.thumb_size < 16 or self.workers < 1:
            raise ValueError("near_ratio must be > 0, max_pairs >= 0, thumb_size >= 16, workers >= 1")


def clustered_identities(root: Path) -> pd.DataFrame:
    """The clustering's identities (before corrections): the numbers a corrections file refers to."""
    path = root / CLUSTERED_FILE if (root / CLUSTERED_FILE).exists() else root / IDENTITIES
    if not path.exists():
        raise FileNotFoundError(f"{root} has no identities.parquet: build or cluster the root first")
    return pd.read_parquet(path).drop_duplicates("path")


def root_threshold(root: Path, emb) -> float:
    """The identity bar the root was built with (build.json config), else the clustering default."""
    build = root / "build.json"
    config = json.loads(build.read_text()).get("config", {}) if build.exists() else {}
    if config.get("identity_threshold") is not None:
        return float(config["identity_threshold"])
    # As the builders' reference rule (identity_threshold_of): the method's cut, else ReF-LDM's rule.
    return default_threshold(emb, config.get("cluster_method") or "components")


def medoid_order(vectors: np.ndarray) -> tuple[int, np.ndarray]:
    """(medoid row, cosine distance of every row to it) for unit vectors."""
    if len(vectors) == 1:
        return 0, np.zeros(1, dtype=np.float32)
    sims = vectors @ vectors.T
    medoid = int(np.argmax(sims.sum(axis=1)))
    return medoid, np.clip(1.0 - sims[medoid], 0.0, 2.0)


def outlier_bar(distances: np.ndarray, threshold: float) -> float:
    """max(threshold, Q3 + 1.5 IQR of the distances to the medoid, medoid excluded)."""
    rest = np.sort(distances)[1:]
    if len(rest) < 4:
        return float(threshold)
    q1, q3 = np.percentile(rest, [25, 75])
    return float(max(threshold, q3 + 1.5 * (q3 - q1)))


def _near(query: np.ndarray, means: np.ndarray, bar: float, k: int, block: int = 2048):
    """For each query row: up to ``k`` (column, average distance) under ``bar``, nearest first."""
    out = []
    for start in range(0, len(query), block):
        dist = 1.0 - query[start : start + block] @ means.T
        for row in dist:
            cols = np.flatnonzero(row < bar)
            cols = cols[np.argsort(row[cols], kind="stable")][:k]
            out.append([(int(c), float(row[c])) for c in cols])
    return out


def review_data(root: str | Path, config: ReviewConfig | None = None) -> dict:
    """Everything the page shows except thumbnails (face rows, clusters, pairs, references)."""
    config = config or ReviewConfig()
    root = Path(root)
    emb, paths, vectors = DatasetRoot(root).embeddings_by_path()
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    threshold = root_threshold(root, emb)
    table = clustered_identities(root)
    ident_of = dict(zip(table["path"].astype(str), table["identity"].astype(int), strict=True))
    split_of: dict[str, str] = {}
    if (root / "splits.parquet").exists():
        sp = pd.read_parquet(root / "splits.parquet", columns=["path", "split"])
        split_of = dict(zip(sp["path"].astype(str), sp["split"].astype(str), strict=True))
    labels = np.array([ident_of.get(p, -1) for p in paths], dtype=np.int64)
    n = len(paths)
    dist = np.zeros(n, dtype=np.float32)
    flagged = np.zeros(n, dtype=bool)
    ids = sorted({int(i) for i in labels if i >= 0})
    members_of = _group(labels)
    clusters: list[dict[str, Any]] = []
    means = np.zeros((len(ids), vectors.shape[1]), dtype=np.float32)
    for k, ident in enumerate(ids):
        rows = members_of[ident]
        medoid, d = medoid_order(vectors[rows])
        order = np.argsort(d, kind="stable")
        bar = outlier_bar(d, threshold)
        dist[rows] = d
        flagged[rows] = d > bar
        means[k] = vectors[rows].mean(axis=0)
        splits = Counter(split_of.get(paths[r], "") for r in rows).most_common(1)
        clusters.append(
            {
                "id": ident,
                "faces": [int(rows[j]) for j in order],
                "medoid": int(rows[medoid]),
                "bar": round(bar, 4),
                "split": splits[0][0] if splits else "",
                "flagged": int(flagged[rows].sum()),
                "near": [],
                "singletons": [],
            }
        )
    bar_near = config.near_ratio * threshold
    if len(ids) > 1 and config.max_pairs:
        for k, near in enumerate(_near(means, means, bar_near, config.max_pairs + 1)):
            clusters[k]["near"] = [[ids[c], round(d, 4)] for c, d in near if c != k][: config.max_pairs]
    singles = np.flatnonzero(labels < 0)
    if len(ids) and len(singles):
        for row, near in zip(singles, _near(vectors[singles], means, bar_near, 1), strict=True):
            if near:
                c, d = near[0]
                dist[row] = d
                clusters[c]["singletons"].append([int(row), round(d, 4)])
    for c in clusters:
        c["singletons"].sort(key=lambda s: (s[1], s[0]))
    known = read_labels(config.labels, root) if config.labels else {}
    for c in clusters:
        c["labels"] = label_groups(c["faces"], paths, known, vectors)
    index = {p: i for i, p in enumerate(paths)}
    refs: dict[str, list] = {}
    for split in SPLITS:
        csv = root / f"{split}_references.csv"
        if not csv.exists():
            continue
        df = read_references(csv)
        for gt, ref_list in zip(df["gt_image"], df["ref_image"], strict=True):
            if gt in index:
                shown = [index[r] for r in ref_list if r in index]
                refs[str(index[gt])] = [len(ref_list), shown[: config.max_refs_shown]]
    return {
        "version": 1,
        "root": str(root.resolve()),
        "threshold": round(threshold, 4),
        "near_ratio": config.near_ratio,
        "metric": "cosine",
        "paths": paths,
        "identity": labels.tolist(),
        "dist": [round(float(d), 4) for d in dist],
        "flagged": [int(f) for f in flagged],
        "split": [split_of.get(p, "") for p in paths],
        "clusters": clusters,
        "singletons": [int(s) for s in singles],
        "refs": refs,
        "face_labels": [known.get(p, "") for p in paths] if known else [],
    }


def read_labels(path: str | Path, root: str | Path | None = None) -> dict[str, str]:
    """{path: label} of a ``path, identity`` CSV; rows with an empty identity are left out.

    With ``root``, labels that name source photos are carried over to the root's own images through
    its ``sources.parquet`` (crop -> source photo), as builds from photos name aligned crops.
    """
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "path" not in table.columns or "identity" not in table.columns:
        raise ValueError(f"{path} needs columns path and identity")
    table = table[table["identity"].str.len() > 0]
    labels = dict(zip(table["path"], table["identity"], strict=True))
    sources = Path(root) / "sources.parquet" if root is not None else None
    if sources is not None and sources.exists():
        crops = pd.read_parquet(sources, columns=["path", "source"])
        moved = {
            str(p): labels[str(s)]
            for p, s in zip(crops["path"], crops["source"], strict=True)
            if str(s) in labels
        }
        labels = {**{p: v for p, v in labels.items() if p not in set(crops["source"].astype(str))}, **moved}
    return labels


def label_groups(faces: list[int], paths: list[str], known: dict[str, str], vectors: np.ndarray) -> list:
    """``[[label, [faces]], ...]`` (largest first) plus the groups' average distance to the largest,
    when the cluster holds two or more known labels; else ``[]``."""
    groups: dict[str, list[int]] = {}
    for i in faces:
        label = known.get(paths[i])
        if label:
            groups.setdefault(label, []).append(i)
    if len(groups) < 2:
        return []
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    head = vectors[ordered[0][1]].mean(axis=0)
    return [
        [label, members, round(float(1.0 - head @ vectors[members].mean(axis=0)), 4) if k else 0.0]
        for k, (label, members) in enumerate(ordered)
    ]


def _group(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(order)]
    return {
        int(sorted_labels[s]): order[s:e] for s, e in zip(starts, ends, strict=True) if sorted_labels[s] >= 0
    }
