"""The impostor-distance model, the adaptive clustering built on it, the graph methods and the
precision-first reference rule."""

from __future__ import annotations

import numpy as np
import pytest

from refface.manifests.embeddings import Embeddings
from refface.mining import cluster as cl
from refface.mining.attach import AttachConfig, attach_lone_faces, merge_fragments
from refface.mining.communities import chinese_whispers, infomap, leiden, undirected
from refface.mining.impostor import fit_impostor_model
from refface.mining.metrics import score_labels
from refface.mining.references import (
    ReferenceConfig,
    estimated_reference_precision,
    select_references,
    stranger_chance,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def pool(n_ids: int, per: int, n_single: int, dim: int = 64, noise: float = 0.35, seed: int = 0):
    """Identities scattered around random centres like face embeddings: same person ~0.1 apart,
    strangers ~1 apart, plus lone faces."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_ids + n_single, dim)))
    labels = np.concatenate([np.repeat(np.arange(n_ids), per), n_ids + np.arange(n_single)])
    x = unit(centres[labels] + noise / np.sqrt(dim) * rng.normal(size=(labels.size, dim)))
    return x, labels


def knn_distances(x: np.ndarray, k: int) -> np.ndarray:
    d = 1.0 - x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k]


def test_impostor_model_counts_strangers_and_tightens_as_the_pool_grows():
    x, labels = pool(150, 4, 300)
    small = fit_impostor_model(knn_distances(x[:300], 64))
    large = fit_impostor_model(knn_distances(x, 64))
    assert small.exponent > 1 and large.exponent > 1
    # More strangers around every face: the radius at a fixed bound shrinks.
    assert np.median(large.radius(1.0)) < np.median(small.radius(1.0))
    # The model's expected strangers within a face's own radius is the bound, by construction,
    # and the labels agree it is not far off (the model counts ranks, which errs high).
    radius = large.radius(1.0, density=1.0)
    d = 1.0 - x.astype(np.float64) @ x.T.astype(np.float64)
    strangers = ((d < radius[:, None]) & (labels[:, None] != labels[None, :])).sum(axis=1)
    assert 0.05 < strangers.mean() <= 1.5
    np.testing.assert_allclose(large.expected(np.arange(len(x)), radius), 1.0)
    # density 0 gives every face the median radius
    assert np.unique(np.round(large.radius(1.0, density=0.0), 12)).size == 1
    with pytest.raises(ValueError, match="max_false_merge"):
        large.radius(0.0)


def test_cut_reaches_further_where_people_hold_many_photos():
    # Same number of faces: one pool of many-photo identities, one of lone faces and pairs.
    clumped, _ = pool(60, 8, 20, noise=0.45, seed=5)
    lone, _ = pool(50, 2, 400, noise=0.45, seed=6)
    cuts = []
    for x in (clumped, lone):
        d = knn_distances(x, 64)
        model = fit_impostor_model(d)
        cuts.append(model.cut(d, 0.3))
        share = model.false_share(d, np.array([cuts[-1]]))[0]
        assert share <= 0.3
    assert cuts[0] > cuts[1]
    with pytest.raises(ValueError, match="max_false_merge"):
        model.cut(d, 1.5)


def test_impostor_clustering_recovers_identities_with_singletons():
    x, labels = pool(60, 5, 200, noise=0.25)
    pred = cl.cluster(x, method="impostor")
    s = score_labels(labels, pred)
    assert s.pairwise_precision > 0.97 and s.pairwise_f > 0.95 and s.bcubed_f > 0.97, s
    assert (pred[-200:] == -1).mean() > 0.95  # lone faces stay alone


def neighbour_lists(lists: dict[int, list[tuple[int, float]]], n: int, k: int):
    """(idx, norm) arrays from per-face neighbour lists of (face, distance in radius units)."""
    idx = np.full((n, k), -1, dtype=np.int64)
    norm = np.full((n, k), np.inf)
    for i, row in lists.items():
        for r, (j, d) in enumerate(row):
            idx[i, r], norm[i, r] = j, d
    return idx, norm


def test_a_lone_face_joins_the_cluster_whose_members_point_back():
    # Cluster C = faces 0-3, cluster D = faces 7-8; faces 4, 5, 6 are alone.
    labels = np.array([0, 0, 0, 0, 4, 5, 6, 7, 7])
    c_row = lambda i, back, d=0.65: [(j, d) for j in range(4) if j != i] + back  # noqa: E731
    lists = {
        0: c_row(0, [(4, 1.1), (5, 1.6)]),
        1: c_row(1, [(4, 1.1), (6, 1.7)]),
        2: c_row(2, [(4, 1.15), (7, 1.8)]),
        3: c_row(3, [(7, 1.7), (8, 1.8)]),
        # 4: an unusual photo of C's person: its nearest are C's, and three of C's four list it.
        4: [(0, 1.05), (1, 1.1), (2, 1.1), (3, 1.15), (7, 1.5), (8, 1.6)],
        # 5: a stranger near C: it points at C, but only one of C's members points back.
        5: [(0, 1.05), (1, 1.1), (2, 1.1), (3, 1.15), (6, 1.5), (7, 1.6)],
        # 6: its nearest neighbours disagree (C and D).
        6: [(0, 1.05), (7, 1.1), (1, 1.1), (8, 1.15)],
        7: [(8, 0.5), (6, 1.1)],
        8: [(7, 0.5), (6, 1.15)],
    }
    idx, norm = neighbour_lists(lists, 9, 6)
    out = attach_lone_faces(labels, idx, norm, missing=2.0)
    assert out[4] == out[0] and len(set(out[:5].tolist())) == 1  # joined C
    assert out[5] not in out[[0, 4, 6, 7]] and out[6] not in out[[0, 5, 7]]  # still alone
    assert out[7] == out[8] != out[0]
    # Too far on average: C's member missing from its list counts as ``missing`` (mean 1.31).
    lists[4] = [(0, 1.05), (1, 1.1), (2, 1.1), (7, 1.5), (8, 1.6)]
    idx, norm = neighbour_lists(lists, 9, 6)
    assert attach_lone_faces(labels, idx, norm, missing=2.0)[4] != out[0]
    # A stricter agreement keeps face 4 out: 3 of 4 members point back.
    idx, norm = neighbour_lists({**lists, 4: [(0, 1.05), (1, 1.1), (2, 1.1), (3, 1.15)]}, 9, 6)
    assert attach_lone_faces(labels, idx, norm, 2.0)[4] == out[0]
    assert attach_lone_faces(labels, idx, norm, 2.0, AttachConfig(agree=0.8))[4] != out[0]
    # A cluster far tighter than the face's distance to it (members 0.5 apart, the face 1.1 on
    # average: more than lone_spread = 1.8 times) keeps it out.
    near = [(0, 1.05), (1, 1.1), (2, 1.1), (3, 1.15)]
    tight = {**lists, 4: near, **{i: c_row(i, lists[i][3:], 0.5) for i in range(4)}}
    idx, norm = neighbour_lists(tight, 9, 6)
    assert attach_lone_faces(labels, idx, norm, 2.0)[4] != out[0]
    with pytest.raises(ValueError, match="agree"):
        AttachConfig(agree=0.0).validate()


def test_two_unusual_photos_next_to_each_other_join_in_two_rounds():
    # Cluster C = faces 0-3; faces 4 and 5 are one person's unusual photos, 5 among 4's nearest.
    labels = np.array([0, 0, 0, 0, 4, 5])
    c_row = lambda i: [(j, 0.65) for j in range(4) if j != i] + [(5, 1.1), (4, 1.15)]  # noqa: E731
    lists = {i: c_row(i) for i in range(4)}
    lists[4] = [(0, 1.05), (5, 1.06), (1, 1.1), (2, 1.1), (3, 1.15)]
    lists[5] = [(0, 1.05), (1, 1.1), (2, 1.1), (4, 1.12), (3, 1.15)]
    idx, norm = neighbour_lists(lists, 6, 6)
    out = attach_lone_faces(labels, idx, norm, 2.0)
    assert len(set(out.tolist())) == 1
    once = attach_lone_faces(labels, idx, norm, 2.0, AttachConfig(lone_rounds=1))
    assert once[5] == once[0] != once[4]


def test_fragments_of_one_person_merge_but_tight_look_alikes_do_not():
    def block(a, b, d):
        return [(i, j, d) for i in a for j in b if i < j or a is not b]

    groups = {"A": [0, 1, 2], "B": [3, 4, 5], "C": [6, 7, 8], "D": [9, 10, 11], "E": [12, 13]}
    groups.update(F=[14, 15], G=[17, 18, 19, 20], H=[21, 22, 23, 24])
    edges = (
        # A and B: one person split in two; as far apart as their own photos are (1.0 vs 0.9).
        block(groups["A"], groups["A"], 0.9)
        + block(groups["B"], groups["B"], 0.9)
        + block(groups["A"], groups["B"], 1.0)
        # C and D: two tight look-alike strangers just as close (1.0) but far for their spread.
        + block(groups["C"], groups["C"], 0.5)
        + block(groups["D"], groups["D"], 0.5)
        + block(groups["C"], groups["D"], 1.0)
        # E and F: loose, but too far apart for two-photo fragments (1.08 radii).
        + block(groups["E"], groups["E"], 0.9)
        + block(groups["F"], groups["F"], 0.9)
        + block(groups["E"], groups["F"], 1.08)
        # G and H: as far apart, but four photos each: their mean is over 16 pairs.
        + block(groups["G"], groups["G"], 0.9)
        + block(groups["H"], groups["H"], 0.9)
        + block(groups["G"], groups["H"], 1.08)
        # 16: a lone face close to A (lone faces are the other rule's business).
        + [(16, j, 0.8) for j in groups["A"]]
    )
    rows, cols, dist = (np.array(v) for v in zip(*edges, strict=True))
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 7, 7, 7, 7, 8, 8, 8, 8])
    out = merge_fragments(labels, rows, cols, dist.astype(float), missing=2.0)
    assert len(set(out[:6].tolist())) == 1  # A + B
    assert out[6] != out[9] and out[12] != out[14]  # C, D and E, F stay apart
    assert len(set(out[6:9].tolist())) == 1 and len(set(out[9:12].tolist())) == 1
    assert out[16] not in out[:16] and out[17] == out[24] != out[0]  # G + H
    # A stricter spread bound keeps A and B apart too (1.0 / 0.9 = 1.11).
    strict = merge_fragments(labels, rows, cols, dist.astype(float), 2.0, AttachConfig(fragment_spread=1.1))
    assert strict[0] != strict[3]
    # A missing cross pair counts as ``missing``: with one A-B pair gone the mean is 1.11.
    drop = ~((rows == 0) & (cols == 3))
    partial = merge_fragments(labels, rows[drop], cols[drop], dist[drop].astype(float), 2.0)
    assert partial[0] != partial[3]


def test_second_pass_never_splits_a_cluster():
    x, labels = pool(60, 5, 200, noise=0.3, seed=3)
    full = cl.cluster(x, method="impostor")
    linkage = cl.cluster(x, method="impostor_linkage")
    # Every cluster of the linkage lies inside one final cluster; only lone faces move.
    moved = (full >= 0) & (linkage < 0)
    assert ((full >= 0) == ((linkage >= 0) | moved)).all()
    clustered = linkage >= 0
    pairs = {(a, b) for a, b in zip(linkage[clustered], full[clustered], strict=True)}
    assert len({a for a, _ in pairs}) == len(pairs)
    assert score_labels(labels, full).pairwise_recall >= score_labels(labels, linkage).pairwise_recall


def test_second_pass_adds_no_stranger_to_tight_clusters():
    # Lone strangers about 0.6 from tight identities (members 0.1 apart): in this pool the model's
    # radius (about 0.5) lets the linkage pair some strangers, but none of them is as close to an
    # identity as its members are to one another, so the second pass adds none.
    x, labels = pool(40, 8, 300, seed=2)
    lone = slice(320, 620)
    full = cl.cluster(x, method="impostor")
    linkage = cl.cluster(x, method="impostor_linkage")
    assert (full[lone] >= 0).sum() == (linkage[lone] >= 0).sum()
    assert score_labels(labels, full).pairwise_precision == score_labels(labels, linkage).pairwise_precision


def test_lower_false_merge_bound_is_stricter():
    x, labels = pool(80, 5, 150, noise=0.4, seed=2)
    loose = cl.cluster(x, method="impostor", config=cl.ClusterConfig(max_false_merge=0.9))
    strict = cl.cluster(x, method="impostor", config=cl.ClusterConfig(max_false_merge=0.02))
    assert score_labels(labels, strict).pairwise_precision >= score_labels(labels, loose).pairwise_precision
    assert (strict >= 0).sum() <= (loose >= 0).sum()  # fewer faces joined


@pytest.mark.parametrize("method", ["chinese_whispers", "infomap"])
def test_graph_methods_recover_identities(method):
    x, labels = pool(40, 6, 60, noise=0.25, seed=1)
    pred = cl.cluster(x, method=method, threshold=0.2)
    s = score_labels(labels, pred)
    assert s.pairwise_f > 0.97 and s.bcubed_f > 0.97, s


def test_community_functions_on_two_cliques_and_an_isolated_node():
    rows, cols = [], []
    for base in (0, 5):
        for i in range(base, base + 5):
            for j in range(i + 1, base + 5):
                rows.append(i)
                cols.append(j)
    rows.append(4)
    cols.append(5)  # one weak bridge
    w = np.ones(len(rows))
    w[-1] = 0.1
    r, c = np.array(rows), np.array(cols)
    for labels in (chinese_whispers(11, r, c, w), infomap(11, r, c, w), leiden(11, r, c, w, 0.5)):
        a, b = labels[:5], labels[5:10]
        assert len(set(a.tolist())) == 1 and len(set(b.tolist())) == 1 and a[0] != b[0]
        assert labels[10] not in (a[0], b[0])
    lo, hi, ww = undirected(np.array([1, 0, 2]), np.array([0, 1, 2]), np.array([0.5, 0.7, 1.0]))
    assert lo.tolist() == [0] and hi.tolist() == [1] and ww.tolist() == [0.7]


def test_defaults_are_selected_by_embedder():
    dlib = Embeddings(np.eye(3), list("abc"), "dlib_face_recognition_resnet_model_v1", "f", "cosine", 0.0884)
    arc = Embeddings(np.eye(3), list("abc"), "arcface:w600k_r50", "f", "cosine", 0.4)
    assert cl.model_family(dlib) == "dlib" and cl.model_family(arc) == "arcface"
    for emb in (dlib, arc):
        cfg = cl.resolve_config(emb)
        family = cl.MODEL_DEFAULTS[cl.model_family(emb)]
        assert cfg.method == family["method"] == "impostor"
        # The adaptive default carries no distance: nothing of dlib's scale reaches ArcFace.
        assert cfg.threshold is None and cfg.max_false_merge == family["max_false_merge"]
    # Fixed-cut methods take each model's own numbers.
    assert (
        cl.resolve_config(dlib, cl.ClusterConfig(method="average")).threshold
        == cl.AVERAGE_THRESHOLDS[dlib.model]
    )
    assert cl.resolve_config(arc, cl.ClusterConfig(method="average")).threshold == pytest.approx(0.4)
    # ReF-LDM's rule stays available by name: components at 0.4.
    ref = cl.resolve_config(dlib, cl.ClusterConfig(method="refldm"))
    assert ref.threshold == pytest.approx(0.4) and cl.CLUSTERERS["refldm"] is cl.components
    with pytest.raises(ValueError, match="max_false_merge"):
        cl.resolve_config(arc, cl.ClusterConfig(max_false_merge=0))


def test_a_pool_too_small_for_the_impostor_model_uses_the_fixed_cut():
    # Nine faces give no strangers past rank 24 to fit the model on: the adaptive cut would call
    # every pair a stranger and leave only singletons.
    x, labels = pool(n_ids=2, per=4, n_single=1, noise=0.3)
    emb = Embeddings(x, [str(i) for i in range(len(x))], "arcface:w600k_r50", "f", "cosine", 0.4)
    small = cl.resolve_config(emb, faces=len(x))
    assert small.method == "average" and small.threshold == pytest.approx(0.4)
    found = cl.cluster(emb)
    assert score_labels(labels, found).pairwise_f == 1.0
    big = cl.resolve_config(emb, faces=cl.min_impostor_pool(cl.ClusterConfig()))
    assert big.method == "impostor"


def chain(per: int = 6, seed: int = 3):
    """Identity A, identity B far from A, and a face C close to one A face only (a chain link)."""
    rng = np.random.default_rng(seed)
    dim = 16
    e = np.eye(dim)
    a = unit(e[0] + 0.15 * rng.normal(size=(per, dim)) / np.sqrt(dim))
    b = unit(e[1] + 0.15 * rng.normal(size=(per, dim)) / np.sqrt(dim))
    # C sits on the far side of a[0]: near it, but far from the rest of A on average.
    c = unit((2.2 * a[0] - 1.0 * e[0] + 0.9 * e[2])[None])
    return np.concatenate([a, b, c])


def test_reference_rule_rejects_chained_references():
    x = chain()
    labels = np.r_[np.zeros(6), np.ones(6), [0]].astype(int)  # C clustered with A (chained)
    d = 1.0 - x @ x.T
    bar = float(d[12, 0]) * 1.05  # C is within the bar of a[0] ...
    assert (d[12, 1:6] > bar).mean() > 0.5  # ... but not of most of A
    paths = [f"{i:02d}" for i in range(len(x))]
    loose = select_references(paths, x, labels, "cosine", bar, ReferenceConfig(within_threshold=False))
    assert 12 in loose[0]  # without the rule the chained face serves as a reference
    refs = select_references(paths, x, labels, "cosine", bar, ReferenceConfig())
    assert 12 not in refs  # the chained face gets no references
    assert all(12 not in r for r in refs.values())  # and serves as none
    assert refs[0] and all(r < 6 for r in refs[0])


def test_stranger_chance_and_the_precision_estimate():
    x, labels = pool(30, 5, 0, noise=0.3, seed=4)
    model = fit_impostor_model(knn_distances(x, 40), rank_start=10)
    d = 1.0 - x[:5].astype(np.float64) @ x[:5].T.astype(np.float64)
    chance = stranger_chance(d, model.scale[:5], model.exponent)
    assert chance.shape == (5, 5) and np.allclose(chance, chance.T) and (np.diag(chance) == 0).all()
    assert ((chance >= 0) & (chance <= 1)).all()
    # A pair twice as far has a larger chance (the count grows with distance).
    far = stranger_chance(2 * d, model.scale[:5], model.exponent)
    assert (far[~np.eye(5, dtype=bool)] >= chance[~np.eye(5, dtype=bool)]).all()
    paths = [f"{i:03d}" for i in range(len(x))]
    strict = select_references(
        paths,
        x,
        labels,
        "cosine",
        1.0,
        ReferenceConfig(max_false_reference=1e-9),
        impostor=(model.scale, model.exponent),
    )
    loose = select_references(
        paths,
        x,
        labels,
        "cosine",
        1.0,
        ReferenceConfig(max_false_reference=1.0),
        impostor=(model.scale, model.exponent),
    )
    assert sum(map(len, strict.values())) < sum(map(len, loose.values()))
    est = estimated_reference_precision(loose, x, labels, model.scale, model.exponent)
    assert est["pairs"] == sum(map(len, loose.values())) and 0 <= est["estimate"] <= 1
    with pytest.raises(ValueError, match="max_false_reference"):
        ReferenceConfig(max_false_reference=0)
