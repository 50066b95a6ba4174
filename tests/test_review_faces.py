"""Review page and corrections on the shared labeled photos: cross-source duplicates, precision 1.000."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from common.faces_root import build_faces_root

from refface.builders.ffhq_ref import FFHQRefConfig, build_ffhq_ref
from refface.builders.validate import label_agreement, validate_root
from refface.manifests.references import read_references
from refface.review.data import ReviewConfig
from refface.review.page import LABEL_CORRECTIONS, write_review

pytestmark = pytest.mark.faces
SPLITS = ("train", "val", "test")
# The same people under two sources' labels (deepface's neutral ids are LFW people).
KNOWN_DUPLICATES = [
    {"lfw/Angelina_Jolie", "deepface/person01"},
    {"lfw/Jennifer_Aniston", "deepface/person02"},
]


def precision(root: Path, labels: pd.DataFrame) -> dict:
    # Builds from photos name aligned crops; the builder writes the labels under those names.
    if (root / "labels.csv").exists():
        labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    return label_agreement({s: read_references(root / f"{s}_references.csv") for s in SPLITS}, labels)


def test_page_shows_cross_source_duplicates_and_label_corrections_reach_precision_one(
    faces_dir, faces_labels, tmp_path
):
    root = tmp_path / "root"
    shutil.copytree(build_faces_root(faces_dir), root / "mined")  # the mine stage then skips
    config = FFHQRefConfig(detector="dlib", labels=str(faces_dir / "labels.csv"), plots=False)
    build_ffhq_ref(faces_dir, root, config)
    before = precision(root, faces_labels)
    assert before["precision"] < 0.99, before

    summary = write_review(root, ReviewConfig(labels=str(faces_dir / "labels.csv")))
    text = (root / "review" / "data.js").read_text()
    data = json.loads(text[text.index("=") + 1 :].rstrip().rstrip(";"))
    mixed = [{g[0] for g in c["labels"]} for c in data["clusters"] if len(c["labels"]) > 1]
    for pair in KNOWN_DUPLICATES:
        assert any(pair <= labels for labels in mixed), (pair, mixed)
    assert summary["thumbnail errors"] == 0 and summary["faces"] == len(data["thumbs"])
    assert all((root / "review" / t).exists() for t in data["thumbs"])

    ids_before = pd.read_parquet(root / "identities.parquet")
    corrections = root / "review" / LABEL_CORRECTIONS
    build_ffhq_ref(faces_dir, root, FFHQRefConfig(**{**config.__dict__, "corrections": str(corrections)}))
    after = precision(root, faces_labels)
    print(f"reference precision before {before['precision']:.4f}, after corrections {after['precision']:.4f}")
    assert after["precision"] == 1.0 and after["pairs_labeled"] > 2000, after
    assert validate_root(root).ok
    # Exactly the identities that held two labels changed, plus the new ones split off them and the
    # existing ones a face moved into (a stray photo goes back to its own person's cluster).
    report = json.loads((root / "corrections.json").read_text())
    assert report["applied"] == report["rows"] and not report["unmatched"]
    ids_after = pd.read_parquet(root / "identities.parquet")
    merged = ids_before.merge(ids_after, on="path", suffixes=("_before", "_after"))
    moved = merged[merged["identity_before"] != merged["identity_after"]]
    mixed_ids = {c["id"] for c in data["clusters"] if len(c["labels"]) > 1}
    assert set(moved["identity_before"]) <= mixed_ids
    joined = set(moved["identity_after"]) & set(ids_before["identity"]) - {-1}
    assert set(report["changed_identities"]) == mixed_ids | set(report["new_identities"]) | joined
    assert "## Corrections" in (root / "card.md").read_text()
