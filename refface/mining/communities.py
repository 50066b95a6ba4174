"""Community detection on a similarity-weighted k-NN graph: Chinese whispers, Infomap and Leiden.

Published, untrained face-clustering methods, kept as named alternatives and as anchors of the
cluster-quality benchmark. Each takes the graph's undirected edges (rows, cols, weight) and
returns component ids (not canonical; see :func:`refface.mining.cluster.relabel`). Time and
memory grow with the edge count: O(N k) for a k-NN graph.
"""

from __future__ import annotations

import numpy as np


def undirected(rows: np.ndarray, cols: np.ndarray, weight: np.ndarray):
    """Each pair once (lo < hi), the largest weight of its copies; self loops dropped."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    weight = np.asarray(weight, dtype=np.float64)
    keep = rows != cols
    lo, hi, w = np.minimum(rows, cols)[keep], np.maximum(rows, cols)[keep], weight[keep]
    if lo.size == 0:
        return lo, hi, w
    key = lo * (int(hi.max()) + 1) + hi
    order = np.lexsort((-w, key))
    key, lo, hi, w = key[order], lo[order], hi[order], w[order]
    first = np.r_[True, key[1:] != key[:-1]]
    return lo[first], hi[first], w[first]


def chinese_whispers(
    n: int, rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, iterations: int = 30, seed: int = 0
) -> np.ndarray:
    """Chinese whispers (Biemann 2006, the face clustering of dlib's examples).

    Every face starts as its own class and repeatedly takes the class with the largest total edge
    weight among its neighbours. Updates run on a random half of the faces per round (all at once,
    vectorized over the edges), which avoids the two-colouring oscillation of fully synchronous
    label propagation; it stops when a round changes nothing.
    """
    lo, hi, w = undirected(rows, cols, weight)
    src = np.concatenate([lo, hi])
    dst = np.concatenate([hi, lo])
    ww = np.concatenate([w, w])
    labels = np.arange(n, dtype=np.int64)
    if src.size == 0:
        return labels
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        lab = labels[dst]
        key = src * n + lab
        order = np.argsort(key, kind="stable")
        key_s = key[order]
        starts = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
        total = np.add.reduceat(ww[order], starts)
        node = key_s[starts] // n
        cand = key_s[starts] % n
        # The heaviest class per node (ties to the smaller class id).
        pick = np.lexsort((cand, -total, node))
        node, cand = node[pick], cand[pick]
        head = np.r_[True, node[1:] != node[:-1]]
        best = labels.copy()
        best[node[head]] = cand[head]
        move = rng.random(n) < 0.5
        new = np.where(move, best, labels)
        if np.array_equal(new, labels) and np.array_equal(best, labels):
            break
        labels = new
    return labels


def _igraph(n: int, rows: np.ndarray, cols: np.ndarray, weight: np.ndarray):
    import igraph

    lo, hi, w = undirected(rows, cols, weight)
    graph = igraph.Graph(n=n, edges=np.stack([lo, hi], axis=1).tolist(), directed=False)
    graph.es["weight"] = w.tolist()
    return graph


def infomap(
    n: int, rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, trials: int = 4, seed: int = 0
) -> np.ndarray:
    """Infomap (Rosvall & Bergstrom 2008): the partition that minimizes the description length of
    a random walk on the weighted graph (igraph's implementation)."""
    import random

    graph = _igraph(n, rows, cols, weight)
    if graph.ecount() == 0:
        return np.arange(n, dtype=np.int64)
    random.seed(seed)  # igraph draws from Python's generator
    return np.asarray(graph.community_infomap(edge_weights="weight", trials=trials).membership, np.int64)


def leiden(
    n: int, rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, resolution: float, seed: int = 0
) -> np.ndarray:
    """Leiden (Traag et al. 2019) with the constant Potts model: a community must hold a mean edge
    weight above ``resolution`` (igraph's implementation)."""
    import random

    graph = _igraph(n, rows, cols, weight)
    if graph.ecount() == 0:
        return np.arange(n, dtype=np.int64)
    random.seed(seed)
    part = graph.community_leiden(
        objective_function="CPM", weights="weight", resolution=resolution, n_iterations=-1
    )
    return np.asarray(part.membership, np.int64)
