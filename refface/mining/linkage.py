"""Sparse average linkage: agglomerative clustering on a k-NN distance graph in O(edges) memory."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def reduce_pairs(rows: np.ndarray, cols: np.ndarray, *values: np.ndarray):
    """Sum ``values`` over duplicate (row, col) pairs."""
    if rows.size == 0:
        return (rows, cols, *values)
    m = int(max(rows.max(), cols.max())) + 1
    key = rows * m + cols
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    out = [rows[order][starts], cols[order][starts]]
    out += [np.add.reduceat(v[order], starts) for v in values]
    return tuple(out)


def average_linkage_graph(
    n: int,
    rows: np.ndarray,
    cols: np.ndarray,
    dist: np.ndarray,
    threshold: float,
    missing: float,
) -> np.ndarray:
    """Average-linkage clusters from a sparse distance graph, cut at ``threshold``.

    Pairs absent from the graph count as ``missing`` apart. Average linkage is reducible, so
    merging every pair of clusters that are each other's nearest neighbour, round after round,
    gives exactly the greedy agglomerative result (the nearest-neighbour-chain argument) while
    each round is a handful of vectorized passes over the edges: memory and time grow with the
    edge count, never with N^2.

    Args:
        n: number of items.
        rows, cols, dist: undirected edges (each pair once or twice; duplicates are merged).
        threshold: merge while the average distance between two clusters is below this.
        missing: distance assumed for pairs without an edge (>= the graph's radius).

    Returns:
        Component ids (not canonical; see :func:`relabel`).
    """
    keep = rows != cols
    r = np.minimum(rows[keep], cols[keep]).astype(np.int64)
    c = np.maximum(rows[keep], cols[keep]).astype(np.int64)
    r, c, count, dsum = reduce_pairs(r, c, np.ones(r.size), dist[keep].astype(np.float64))
    # An edge listed from both sides is one pair.
    dsum = dsum / count
    count = np.ones_like(count)
    labels = np.arange(n, dtype=np.int64)
    size = np.ones(n, dtype=np.float64)
    rounds = 0
    while r.size:
        rounds += 1
        pair_n = size[r] * size[c]
        avg = (dsum + (pair_n - count) * missing) / pair_n
        ok = avg < threshold
        if not ok.any():
            break
        mutual, best = mutual_nearest(r[ok], c[ok], avg[ok], size.size)
        if mutual.size == 0:  # cannot happen for a reducible linkage; guard against float ties
            break
        # Merge each mutual pair (lo, hi) into lo and compact the ids.
        target = np.arange(size.size, dtype=np.int64)
        target[best[mutual]] = mutual
        alive = np.ones(size.size, bool)
        alive[best[mutual]] = False
        compact = np.cumsum(alive) - 1
        target = compact[target]
        labels = target[labels]
        size = np.asarray(np.bincount(target, weights=size, minlength=int(alive.sum())), dtype=np.float64)
        r, c = target[r], target[c]
        inner = r == c
        r, c, count, dsum = r[~inner], c[~inner], count[~inner], dsum[~inner]
        lo, hi = np.minimum(r, c), np.maximum(r, c)
        r, c, count, dsum = reduce_pairs(lo, hi, count, dsum)
    log.debug("average linkage: %d rounds, %d clusters", rounds, size.size)
    return labels


def mutual_nearest(a: np.ndarray, b: np.ndarray, value: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of groups that are each other's nearest among the candidate pairs ``(a, b)``.

    Args:
        a, b, value: candidate pairs (each once, either order) and their distances.
        n: number of groups (ids are 0..n-1).

    Returns:
        ``(mutual, best)``: the smaller id of each mutual pair, and every group's nearest
        candidate (-1 where it has none), so ``best[mutual]`` are their partners. Ties go to the
        smaller id, for determinism.
    """
    x = np.concatenate([a, b])
    y = np.concatenate([b, a])
    v = np.concatenate([value, value])
    order = np.lexsort((y, v, x))
    x, y = x[order], y[order]
    firsts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    best = np.full(n, -1, dtype=np.int64)
    best[x[firsts]] = y[firsts]
    heads = x[firsts]
    return heads[(best[best[heads]] == heads) & (heads < best[heads])], best
