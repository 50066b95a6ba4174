"""FAISS neighbour search: k-NN without self, cross-set search, threshold graphs, IVF recall."""

from __future__ import annotations

import numpy as np
import pytest

from refface.mining import neighbors as nb


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(
    n_clusters: int, per: int, dim: int, noise: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_clusters, dim)))
    labels = np.repeat(np.arange(n_clusters), per)
    return unit(centres[labels] + noise * rng.normal(size=(labels.size, dim))), labels


def brute_pairs(x: np.ndarray, tau: float) -> set[tuple[int, int]]:
    d = 1.0 - x.astype(np.float64) @ x.T.astype(np.float64)
    i, j = np.nonzero(d < tau)
    return {(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if a != b}


def test_knn_matches_brute_force_and_excludes_self():
    x = unit(np.random.default_rng(1).normal(size=(300, 16)))
    sims, idx = nb.knn(x, 5, index="flat")
    assert sims.shape == idx.shape == (300, 5)
    assert not (idx == np.arange(300)[:, None]).any()
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, 1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_knn_with_exact_duplicates_drops_self_not_the_twin():
    x = unit(np.random.default_rng(2).normal(size=(50, 8)))
    x = np.concatenate([x, x[:10]])  # rows 50..59 duplicate rows 0..9
    _, idx = nb.knn(x, 3, index="flat")
    assert not (idx == np.arange(60)[:, None]).any()
    for i in range(10):
        assert 50 + i in idx[i] and i in idx[50 + i]


def test_knn_pads_when_fewer_vectors_than_k():
    x = unit(np.random.default_rng(3).normal(size=(4, 8)))
    sims, idx = nb.knn(x, 6, index="flat")
    assert idx.shape == (4, 6)
    assert (idx[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    assert set(idx[0, :3].tolist()) == {1, 2, 3}


def test_search_across_sets_finds_planted_neighbours():
    rng = np.random.default_rng(4)
    base = unit(rng.normal(size=(500, 32)))
    pick = rng.choice(500, 20, replace=False)
    query = unit(base[pick] + 0.01 * rng.normal(size=(20, 32)))
    sims, idx = nb.search(query, base, 1, batch_size=7)
    np.testing.assert_array_equal(idx[:, 0], pick)
    assert (sims[:, 0] > 0.99).all()
    with pytest.raises(ValueError, match="dim"):
        nb.search(query[:, :16], base, 1)


def test_threshold_graph_equals_brute_force_pairs():
    x, _ = clustered(10, 12, 24, noise=0.06, seed=5)
    tau = 0.05
    g = nb.threshold_graph(x, tau, batch_size=37).tocoo()
    got = set(zip(g.row.tolist(), g.col.tolist(), strict=True))
    expected = brute_pairs(x, tau)
    assert 0 < len(expected) < 10 * 12 * 11  # some, not all, same-cluster pairs are inside tau
    assert got == expected
    assert (g.tocsr() != g.T.tocsr()).nnz == 0 and g.diagonal().sum() == 0
    # data is the similarity 1 - distance of each edge
    np.testing.assert_allclose(g.data, np.sum(x[g.row] * x[g.col], axis=1), atol=1e-5)


def test_threshold_graph_by_growing_knn_matches_range_search():
    # Clusters of 30 with k0=4: every row saturates and k must grow (the GPU code path).
    x, _ = clustered(6, 30, 16, noise=0.12, seed=6)
    tau = 0.15
    by_range = nb.threshold_graph(x, tau, method="range")
    by_knn = nb.threshold_graph(x, tau, method="knn", k0=4)
    assert by_range.nnz > 6 * 30 * 4  # rows really had more than k0 neighbours
    assert (by_range != by_knn).nnz == 0


def test_threshold_graph_rejects_bad_threshold():
    x = unit(np.random.default_rng(0).normal(size=(5, 4)))
    with pytest.raises(ValueError, match="cosine distance"):
        nb.threshold_graph(x, 0.0)
    with pytest.raises(ValueError, match="method"):
        nb.threshold_graph(x, 0.3, method="bogus")


def test_ivf_recall_against_exact_is_measured_and_high():
    x, _ = clustered(200, 25, 64, noise=0.15, seed=7)
    exact_s, exact_i = nb.knn(x, 10, index="flat")
    ivf = nb.build_index(x, "ivf", nprobe=16)
    assert ivf.kind == "ivf" and ivf.nlist == nb.default_nlist(len(x))
    _, approx_i = nb.knn(x, 10, built=ivf)
    recall = nb.recall_at_k(approx_i, exact_i)
    _, probe1 = nb.knn(x, 10, built=nb.build_index(x, "ivf", nprobe=1))
    low = nb.recall_at_k(probe1, exact_i)
    assert 0.9 <= recall <= 1.0
    assert low < recall - 0.05  # more lists visited, better recall: the knob works


def test_recall_at_k_counts_overlap():
    exact = np.array([[1, 2, 3], [0, 2, -1]])
    approx = np.array([[3, 9, 1], [2, 0, 5]])
    assert nb.recall_at_k(approx, exact) == pytest.approx((2 + 2) / 5)


def test_choose_index_auto_and_validation():
    assert nb.choose_index(10) == "flat"
    assert nb.choose_index(nb.EXACT_MAX - 1) == "flat"
    assert nb.choose_index(nb.EXACT_MAX) == "ivf"
    assert nb.choose_index(10, "ivf") == "ivf"
    with pytest.raises(ValueError, match="unknown index"):
        nb.choose_index(10, "hnsw")
    assert nb.default_nlist(1_000_000) == 2048
    assert nb.default_nlist(10) == 1
    assert nb.default_nlist(10_000_000) == 8192  # the sharded planner's lists at 10M


def test_knn_graph_is_symmetric_without_self_loops():
    x, _ = clustered(5, 10, 16, noise=0.1, seed=8)
    g = nb.knn_graph(x, 3)
    assert (g != g.T).nnz == 0 and g.diagonal().sum() == 0
    assert (np.diff(g.indptr) >= 3).all()
