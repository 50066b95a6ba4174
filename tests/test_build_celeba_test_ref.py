"""CelebA-Test-Ref mode: targets from one set, references from a separate pool."""

from __future__ import annotations

import shutil

import pandas as pd
from common.faces_root import build_faces_root

from refface.builders.celeba_test_ref import POOL_DIR, CelebATestRefConfig, build_celeba_test_ref
from refface.builders.validate import validate_root
from refface.manifests.references import read_references

TARGETS = [
    "lfw/Alvaro_Uribe/Alvaro_Uribe_0001.jpg",
    "lfw/Amelie_Mauresmo/Amelie_Mauresmo_0002.jpg",
    "face_recognition/obama/examples__obama-1080p.jpg",
    "lfw_distractors/Adrian_Fernandez/Adrian_Fernandez_0001.jpg",
]


def test_targets_get_pool_references_never_themselves(faces_dir, faces_labels, tmp_path):
    targets = tmp_path / "targets"
    lq = tmp_path / "lq"
    for rel in TARGETS:
        name = rel.replace("/", "__")
        (targets).mkdir(exist_ok=True)
        shutil.copy2(faces_dir / rel, targets / name)
        lq.mkdir(exist_ok=True)
        (lq / (name.rsplit(".", 1)[0] + ".png")).write_bytes((faces_dir / rel).read_bytes())
    root = tmp_path / "out"
    shutil.copytree(build_faces_root(faces_dir), root / POOL_DIR)
    summary = build_celeba_test_ref(
        targets, faces_dir, root, CelebATestRefConfig(lq=str(lq), identity_threshold=0.07)
    )
    df = read_references(root / "test_references.csv")
    assert summary["targets"] == 4
    label_of = dict(zip(faces_labels["path"], faces_labels["identity"], strict=True))
    source_of = {rel.replace("/", "__"): rel for rel in TARGETS}
    listed = set(df["gt_image"])
    # The singleton has no other photo in the pool: no references, even though its own copy is there.
    assert source_of and "lfw_distractors__Adrian_Fernandez__Adrian_Fernandez_0001.jpg" not in listed
    assert len(listed) == 3
    for gt, lq_name, refs in zip(df["gt_image"], df["lq_image"], df["ref_image"], strict=True):
        src = source_of[gt]
        assert src not in refs  # the target's own file is in the pool but never a reference
        assert 2 <= len(refs) <= 9
        assert all(label_of[r] == label_of[src] for r in refs)
        assert lq_name == gt.rsplit(".", 1)[0] + ".png"
    report = validate_root(root)
    assert report.ok, report.problems
    # Near-duplicates of the 1080p Obama photo (same picture at other resolutions) are excluded.
    obama = df.loc[df["gt_image"].str.contains("obama"), "ref_image"]
    assert obama.empty or not any("obama-720p" in r or "obama-480p" in r for r in obama.iloc[0])
    assert pd.read_csv(root / "test_references.csv").columns.tolist() == ["gt_image", "lq_image", "ref_image"]
