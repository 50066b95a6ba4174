"""Identity-disjoint splits: proportions, determinism, balance, split-list files."""

from __future__ import annotations

import pandas as pd
import pytest

from refface.manifests.layout import split_filename
from refface.manifests.splits import read_split_lists, write_split_lists
from refface.mining.splits import PAPER_IDENTITIES, SplitConfig, assign_splits, split_summary


def table(n_ids=200, per_id=4, singles=50):
    rows = []
    for i in range(n_ids):
        for j in range(per_id + (i % 3)):
            rows.append({"path": f"id{i:04d}/{j}.png", "identity": i})
    rows += [{"path": f"single/{k:04d}.png", "identity": -1} for k in range(singles)]
    return pd.DataFrame(rows)


def test_splits_are_identity_disjoint_and_cover_every_image():
    t = table()
    out = assign_splits(t, SplitConfig(seed=1))
    assert sorted(out["path"]) == sorted(t["path"])
    per_identity = out[out["identity"] >= 0].groupby("identity")["split"].nunique()
    assert (per_identity == 1).all()
    assert set(out.loc[out["identity"] < 0, "split"]) == {"train"}


def test_paper_proportions_by_default():
    out = assign_splits(table(n_ids=6523 // 10), SplitConfig())
    s = split_summary(out)
    total = 6523 // 10
    assert s["test"]["identities"] == round(total * PAPER_IDENTITIES["test"] / 6523)
    assert s["val"]["identities"] == round(total * PAPER_IDENTITIES["val"] / 6523)


def test_same_seed_same_split_other_seed_differs_and_order_does_not_matter():
    t = table()
    a = assign_splits(t, SplitConfig(seed=7))
    b = assign_splits(t.sample(frac=1.0, random_state=3), SplitConfig(seed=7))
    pd.testing.assert_frame_equal(a, b)
    # Relabeling identities (another clustering numbering) does not change the split either.
    relabeled = t.assign(identity=t["identity"].map(lambda i: 10_000 - i if i >= 0 else -1))
    c = assign_splits(relabeled, SplitConfig(seed=7))
    assert a["split"].tolist() == c["split"].tolist()
    d = assign_splits(t, SplitConfig(seed=8))
    assert a["split"].tolist() != d["split"].tolist()


def test_absolute_counts_and_eligibility():
    t = table(n_ids=30)
    out = assign_splits(t, SplitConfig(val_identities=3, test_identities=2), eligible=range(10))
    s = split_summary(out)
    assert s["val"]["identities"] == 3 and s["test"]["identities"] == 2
    assert set(out.loc[out["split"] != "train", "identity"]) <= set(range(10))
    small = assign_splits(t, SplitConfig(min_eval_size=100))
    assert set(small["split"]) == {"train"}


def test_balance_over_attribute_column():
    t = table(n_ids=120)
    # 100 identities of group "a", 20 of group "b": unbalanced sampling would give mostly "a".
    attr = pd.Series({p: ("b" if i < 20 else "a") for p, i in zip(t["path"], t["identity"], strict=True)})
    out = assign_splits(t, SplitConfig(test_identities=10, balance_column="race"), attributes=attr)
    test_ids = set(out.loc[out["split"] == "test", "identity"])
    groups = pd.Series(["b" if i < 20 else "a" for i in test_ids]).value_counts()
    assert groups["a"] == 5 and groups["b"] == 5


def test_config_validation():
    with pytest.raises(ValueError):
        SplitConfig(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError):
        SplitConfig(singleton_split="holdout")


def test_split_list_files_roundtrip(tmp_path):
    names = write_split_lists(tmp_path, {"train": ["b.png", "a.png"], "test": ["c.png"]})
    assert names == [split_filename(s) for s in ("train", "val", "test")]
    assert (tmp_path / "train_image.txt").read_text() == "a.png\nb.png\n"
    assert (tmp_path / "val_image.txt").read_text() == ""
    assert read_split_lists(tmp_path) == {"train": ["a.png", "b.png"], "val": [], "test": ["c.png"]}
