"""Cluster metrics: contingency-based pairwise and BCubed scores equal their brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from refface.mining import metrics as m


def brute_pairwise(true, pred):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(true)), 2):
        same_t, same_p = true[i] == true[j], pred[i] == pred[j]
        tp += same_t and same_p
        fp += same_p and not same_t
        fn += same_t and not same_p
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r


def brute_bcubed(true, pred):
    true, pred = np.asarray(true), np.asarray(pred)
    ps, rs = [], []
    for i in range(len(true)):
        both = np.sum((pred == pred[i]) & (true == true[i]))
        ps.append(both / np.sum(pred == pred[i]))
        rs.append(both / np.sum(true == true[i]))
    return float(np.mean(ps)), float(np.mean(rs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_and_bcubed_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 7, size=60)
    pred = rng.integers(0, 9, size=60)
    p, r, f = m.pairwise_prf(true, pred)
    bp, br = brute_pairwise(true, pred)
    assert (p, r) == pytest.approx((bp, br))
    assert f == pytest.approx(2 * bp * br / (bp + br))
    p, r, _ = m.bcubed_prf(true, pred)
    assert (p, r) == pytest.approx(brute_bcubed(true, pred))


def test_perfect_clustering_scores_one_whatever_the_label_names():
    true = ["ann", "ann", "bob", "bob", "bob", "cy"]
    pred = [5, 5, 2, 2, 2, -1]
    s = m.score_labels(true, pred)
    assert s.pairwise_f == s.bcubed_f == pytest.approx(1.0)
    assert s.nmi == pytest.approx(1.0)
    assert (s.n_clusters, s.n_identities, s.n_items) == (3, 3, 6)


def test_singletons_are_their_own_clusters_not_one_pool():
    true = ["a", "a", "b", "b"]
    s = m.score_labels(true, [-1, -1, -1, -1])
    assert s.pairwise_precision == 1.0 and s.pairwise_recall == 0.0 and s.pairwise_f == 0.0
    assert s.bcubed_precision == 1.0 and s.bcubed_recall == pytest.approx(0.5)
    assert s.n_clusters == 4
    np.testing.assert_array_equal(m.explode_singletons(np.array([-1, 0, -1, 0])), [1, 0, 2, 0])


def test_one_giant_cluster_has_full_recall_and_low_precision():
    true = np.repeat(np.arange(10), 5)
    s = m.score_labels(true, np.zeros(50, dtype=int))
    assert s.pairwise_recall == 1.0
    assert s.pairwise_precision == pytest.approx(10 * 10 / (50 * 49 / 2))
    assert s.bcubed_precision == pytest.approx(0.1)
    assert s.nmi == pytest.approx(0.0)


def test_evaluate_assignments_excludes_unlabeled_and_counts_missing_as_singletons():
    labels = {"a1.jpg": "A", "a2.jpg": "A", "b1.jpg": "B", "b2.jpg": "B", "u.jpg": "", "n.jpg": "nan"}
    assignments = {"a1.jpg": 0, "a2.jpg": 0, "b1.jpg": 1, "u.jpg": 0, "n.jpg": 1, "extra.jpg": 3}
    s = m.evaluate_assignments(assignments, labels)
    assert s.n_items == 4
    assert s.n_unclustered == 1  # b2.jpg had no face
    assert s.n_unlabeled == 3  # u.jpg, n.jpg, extra.jpg are not scored
    assert s.pairwise_precision == 1.0 and s.pairwise_recall == pytest.approx(0.5)


def test_contingency_is_sparse_and_rejects_mismatched_lengths():
    n_ij, ti, pj = m.contingency(np.array([0, 0, 1, 1, 1]), np.array([3, 3, 3, 4, 4]))
    assert sorted(zip(ti.tolist(), pj.tolist(), n_ij.tolist(), strict=True)) == [
        (0, 3, 2),
        (1, 3, 1),
        (1, 4, 2),
    ]
    with pytest.raises(ValueError, match="length"):
        m.contingency(np.zeros(3, int), np.zeros(4, int))
