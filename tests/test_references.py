"""Reference CSV format (ReF-LDM's) and reference selection rules on synthetic embeddings."""

from __future__ import annotations

import ast

import numpy as np
import pandas as pd
import pytest

from refface.manifests.layout import references_filename
from refface.manifests.references import format_ref_list, parse_ref_list, read_references, write_references
from refface.mining.references import (
    ReferenceConfig,
    distance_matrix,
    farthest_point_order,
    select_for_target,
    select_references,
)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def identity_vectors(rng, n_ids, per_id, dim=32, spread=0.15):
    """Clusters of unit vectors: each identity a random centre plus small noise."""
    centres = unit(rng.normal(size=(n_ids, dim)))
    vecs, labels = [], []
    for i, c in enumerate(centres):
        for _ in range(per_id):
            vecs.append(unit(c + spread * rng.normal(size=dim) / np.sqrt(dim)))
            labels.append(i)
    return np.asarray(vecs, dtype=np.float32), np.asarray(labels)


def test_ref_list_string_is_what_refldm_parses():
    text = format_ref_list(["01234.png", "05678.png"])
    assert text == "['01234.png', '05678.png']"
    assert ast.literal_eval(text) == ["01234.png", "05678.png"]
    assert parse_ref_list(text) == ["01234.png", "05678.png"]
    with pytest.raises(ValueError):
        parse_ref_list("01234.png")
    with pytest.raises(ValueError):
        parse_ref_list("[1, 2]")


def test_csv_roundtrip_matches_pandas_literal_eval_reading(tmp_path):
    rows = [
        {"gt_image": "00002.png", "lq_image": "00002.png", "ref_image": ["00003.png", "00004.png"]},
        {"gt_image": "00001.png", "lq_image": "lq/00001.jpg", "ref_image": ["00005.png"]},
    ]
    path = tmp_path / references_filename("test")
    write_references(path, rows, with_lq=True)
    text = path.read_text()
    assert text.splitlines()[0] == "gt_image,lq_image,ref_image"
    # Exactly how ReF-LDM's ImageRestorationDataset reads the file.
    df = pd.read_csv(path)
    refs = df["ref_image"].apply(ast.literal_eval)
    assert df["gt_image"].tolist() == ["00001.png", "00002.png"]  # sorted by target
    assert refs.tolist() == [["00005.png"], ["00003.png", "00004.png"]]
    back = read_references(path)
    assert back["ref_image"].tolist() == refs.tolist()
    train = tmp_path / "train_references.csv"
    write_references(train, rows, with_lq=False)
    assert train.read_text().splitlines()[0] == "gt_image,ref_image"


def test_read_references_rejects_bad_files(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("gt_image,refs\na.png,['b.png']\n")
    with pytest.raises(ValueError, match="missing column"):
        read_references(bad)
    bad.write_text("gt_image,ref_image\na.png,b.png\n")
    with pytest.raises(ValueError, match="row 2"):
        read_references(bad)
    # A saved pandas index column (as some published files carry) is ignored.
    ok = tmp_path / "y.csv"
    ok.write_text(",gt_image,ref_image\n0,a.png,\"['b.png']\"\n")
    assert read_references(ok)["ref_image"].tolist() == [["b.png"]]


def test_distance_conventions_agree_on_unit_vectors():
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(5, 8)))
    cos = distance_matrix(a, b, "cosine")
    euc = distance_matrix(a, b, "euclidean")
    np.testing.assert_allclose(euc**2, 2 * cos, atol=1e-9)
    with pytest.raises(ValueError):
        distance_matrix(a, b, "manhattan")


def test_farthest_point_order_spreads_out():
    # Two tight pairs around the target's two sides: the first two picks must come from different pairs.
    target = unit([1.0, 0.0, 0.0])
    cands = unit([[0.9, 0.4, 0.0], [0.9, 0.41, 0.0], [0.9, -0.4, 0.0], [0.9, -0.41, 0.0], [0.99, 0.05, 0.0]])
    order = farthest_point_order(target, cands)
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert {order[0] // 2, order[1] // 2} == {0, 1}
    assert order[-1] == 4 or order.index(4) > 1  # the near-target candidate is not picked early
    assert farthest_point_order(target, cands) == order


def test_eval_rules_exclude_near_duplicates_and_cap_refs():
    rng = np.random.default_rng(1)
    centre = unit(rng.normal(size=16))
    members = [centre]  # the target
    members.append(unit(centre + 1e-4 * rng.normal(size=16)))  # near-duplicate of the target
    members += [unit(centre + 0.35 * rng.normal(size=16) / 4) for _ in range(12)]
    vecs = np.asarray(members)
    d = distance_matrix(vecs[:1], vecs, "cosine")[0]
    threshold = float(d[2:].max()) + 0.01
    cfg = ReferenceConfig(min_refs=2, max_refs=9, near_duplicate_distance=0.005)
    refs = select_for_target(0, list(range(len(vecs))), vecs, "cosine", threshold, cfg, evaluation=True)
    assert 0 not in refs and 1 not in refs
    assert len(refs) == 9
    assert all(d[r] >= 0.005 for r in refs)
    train = select_for_target(0, list(range(len(vecs))), vecs, "cosine", threshold, cfg, evaluation=False)
    assert sorted(train) == list(range(1, len(vecs)))  # training keeps every other image
    few = select_for_target(0, [0, 1, 2], vecs, "cosine", threshold, cfg, evaluation=True)
    assert few == []  # one usable reference < min_refs


def test_default_near_duplicate_bar_is_a_quarter_of_the_threshold():
    assert ReferenceConfig().near_duplicate(0.4) == pytest.approx(0.1)
    assert ReferenceConfig(near_duplicate_distance=0.2).near_duplicate(0.4) == 0.2
    with pytest.raises(ValueError):
        ReferenceConfig(min_refs=3, max_refs=2)


def test_select_references_respects_identities_and_singletons():
    rng = np.random.default_rng(2)
    vecs, labels = identity_vectors(rng, n_ids=4, per_id=5)
    labels = labels.copy()
    labels[-1] = -1  # a singleton
    paths = [f"{i:05d}.png" for i in range(len(vecs))]
    threshold = 0.5
    refs = select_references(paths, vecs, labels, "cosine", threshold, ReferenceConfig(), evaluation=False)
    assert len(vecs) - 1 not in refs
    for t, rs in refs.items():
        assert t not in rs
        assert all(labels[r] == labels[t] for r in rs)
    # Byte-identical copies never reference each other.
    sha = [f"h{i}" for i in range(len(vecs))]
    sha[1] = sha[0]
    refs = select_references(paths, vecs, labels, "cosine", threshold, ReferenceConfig(), sha256=sha)
    assert 1 not in refs[0] and 0 not in refs[1]


def test_selection_is_independent_of_input_order():
    rng = np.random.default_rng(3)
    vecs, labels = identity_vectors(rng, n_ids=3, per_id=6, spread=0.6)
    paths = [f"{i:05d}.png" for i in range(len(vecs))]
    perm = rng.permutation(len(vecs))
    cfg = ReferenceConfig(near_duplicate_distance=0.05)
    a = select_references(paths, vecs, labels, "cosine", 0.6, cfg, evaluation=True)
    b = select_references(
        [paths[i] for i in perm], vecs[perm], labels[perm], "cosine", 0.6, cfg, evaluation=True
    )
    named_a = {paths[t]: [paths[r] for r in rs] for t, rs in a.items()}
    named_b = {paths[perm[t]]: [paths[perm[r]] for r in rs] for t, rs in b.items()}
    assert named_a == named_b and named_a
