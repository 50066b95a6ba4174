"""Candidate pairs between two sets: embedding k-NN above a bar, perceptual/content hash matches and
faces that one identity clustering joins."""

from __future__ import annotations

import numpy as np
import pandas as pd

from refface.audit.config import AuditSet, Thresholds
from refface.mining.cluster import ClusterConfig, cluster
from refface.mining.neighbors import build_index, knn, search
from refface.mining.phash import hamming_pairs


def embedding_pairs(
    query: np.ndarray, base: np.ndarray, min_dot: float, index: str = "auto", k0: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (query row, base row) pair with inner product above ``min_dot``, via FAISS k-NN.

    Each query row is searched with a growing k until its k-th neighbour falls below the bar
    (k-NN instead of range search so a GPU index works too).

    Returns:
        (query rows, base rows, similarities, nearest similarity of each query row).
    """

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


def hash_pairs(a: AuditSet, b: AuditSet, max_distance: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact (same decoded pixels) and perceptually close image pairs between two hashed sets.

    Returns:
        (exact pairs ``ia, ib``, close pairs ``ia, ib, phash_distance, mirrored``).
    """

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
