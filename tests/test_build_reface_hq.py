"""Reface-HQ-style builder on the shared identity folders."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from common.faces_root import build_faces_root
from PIL import Image

from refface.builders.reface_hq import RefaceHQConfig, build_reface_hq, curate
from refface.builders.validate import label_agreement, validate_root
from refface.manifests.references import read_references

SPLITS = ("train", "val", "test")
# Small crops keep the test fast; the alignment is the same at any size (512 by default).
CROP = 128


@pytest.fixture(scope="module")
def built(faces_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reface") / "root"
    # Start from the cached mining outputs; the builder's own mine stage then skips.
    shutil.copytree(build_faces_root(faces_dir), root / "mined")
    summary = build_reface_hq(
        faces_dir,
        root,
        # LFW's 250 px photos are soft at any crop size: this build checks identity curation, not quality.
        RefaceHQConfig(
            labels=str(faces_dir / "labels.csv"), identity_threshold=0.07, crop_size=CROP, min_sharpness=None
        ),
    )
    return root, summary


def test_layout_crops_and_tables(built):
    root, summary = built
    sources = pd.read_parquet(root / "sources.parquet")
    assert len(sources) == summary["kept"] > 500
    for rel in sources["path"].head(20):
        identity, name = rel.split("/")
        assert name.endswith(".png") and name[:-4].isdigit()
        with Image.open(root / "images" / rel) as im:
            assert im.size == (CROP, CROP)
    # Numbering is 0..n-1 within each identity.
    for _, group in sources.groupby("identity_name"):
        assert sorted(int(p.split("/")[1][:-4]) for p in group["path"]) == list(range(len(group)))
    for split in SPLITS:
        assert (root / f"{split}_references.csv").exists() and (root / f"{split}_image.txt").exists()


def test_dropped_report_names_reasons(built):
    root, _ = built
    dropped = pd.read_csv(root / "dropped.csv")
    assert (dropped["reason"].str.len() > 0).all()
    # face_recognition/obama holds the same photo at several resolutions: near/exact duplicates go.
    obama = dropped[dropped["path"].str.startswith("face_recognition/obama/")]
    assert obama["reason"].str.contains("duplicate").sum() >= 3
    kept = pd.read_parquet(root / "sources.parquet")
    assert not set(kept["source"]) & set(dropped["path"])


def test_references_agree_with_labels(built, faces_labels):
    root, _ = built
    refs = {s: read_references(root / f"{s}_references.csv") for s in SPLITS}
    sources = pd.read_parquet(root / "sources.parquet")
    known = faces_labels.rename(columns={"path": "photo", "source": "origin"})
    moved = sources.merge(known, left_on="source", right_on="photo")
    moved = moved[["path", "identity", "origin"]].rename(columns={"origin": "source"})
    agree = label_agreement(refs, moved)
    print(f"reface-hq reference precision vs labels: {agree}")
    assert agree["precision_same_source"] >= 0.98 and agree["pairs_labeled"] > 500
    assert agree["targets_labeled_singleton_with_refs"] == 0
    assert validate_root(root).ok


def test_curate_flags_outliers_merges_folders_and_drops_duplicates():
    rng = np.random.default_rng(0)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    a, b = unit(rng.normal(size=16)), unit(rng.normal(size=16))
    vecs = [unit(a + 0.2 * unit(rng.normal(size=16))) for _ in range(4)]  # folder x: person a
    vecs += [unit(b + 0.05 * unit(rng.normal(size=16)))]  # folder x: a stranger (outlier)
    vecs += [unit(a + 0.2 * unit(rng.normal(size=16))) for _ in range(3)]  # folder y: person a again
    vecs += [vecs[0] + 1e-5]  # folder y: near-duplicate of x/0
    paths = [f"x/{i}.jpg" for i in range(5)] + [f"y/{i}.jpg" for i in range(4)]
    faces = pd.DataFrame({"path": paths, "x0": 0.0, "y0": 0.0, "x1": 100.0, "y1": 100.0, "det_score": 1.0})
    faces.loc[2, ["x1", "y1"]] = 10.0  # a tiny face
    sha = [f"h{i}" for i in range(9)]
    sha[6] = sha[5]  # exact duplicate bytes
    config = RefaceHQConfig(near_duplicate_distance=0.01, min_face_size=40)
    kept, dropped = curate(faces, np.asarray(vecs), sha, 0.3, config)
    reasons = dict(zip(dropped["path"], dropped["reason"], strict=True))
    assert "too small" in reasons["x/2.jpg"]
    assert "far from its folder" in reasons["x/4.jpg"]
    assert "exact duplicate of y/0.jpg" in reasons["y/1.jpg"]
    assert "near-duplicate of x/0.jpg" in reasons["y/3.jpg"]
    assert set(kept["identity_name"]) == {"x"}  # y merged into x
    assert set(kept["folder"]) == {"x", "y"}


def test_default_face_size_bar_is_half_the_crop():
    assert RefaceHQConfig().face_size_bar == 256
    assert RefaceHQConfig(crop_size=1024).face_size_bar == 512
    assert RefaceHQConfig(min_face_size=100).face_size_bar == 100
    with pytest.raises(ValueError, match="max_niqe needs niqe_params"):
        RefaceHQConfig(max_niqe=5.0)


@pytest.mark.slow
def test_planted_small_and_blurred_faces_are_rejected_with_reasons(faces_dir, tmp_path):
    import cv2

    from refface.manifests.io import read_image, write_png

    src = faces_dir / "deepface"
    folders = tmp_path / "folders"
    for person in ("person01", "person11"):
        shutil.copytree(src / person, folders / person)
    # A large face made small (its box falls under 512 / 2) and a large face blurred.
    img = read_image(src / "person01" / "img1.jpg")
    small = cv2.resize(img, (img.shape[1] // 4, img.shape[0] // 4), interpolation=cv2.INTER_AREA)
    write_png(folders / "person01" / "planted_small.png", small)
    img = read_image(src / "person11" / "img33.jpg")
    write_png(folders / "person11" / "planted_blur.png", cv2.GaussianBlur(img, (0, 0), 12))
    root = tmp_path / "root"
    build_reface_hq(folders, root, RefaceHQConfig(plots=False))

    errors = pd.read_parquet(root / "errors.parquet").set_index("path")
    assert errors.loc["person01/planted_small.png", "stage"] == "hq/face_size"
    assert "face too small" in errors.loc["person01/planted_small.png", "reason"]
    assert "< 256 px" in errors.loc["person01/planted_small.png", "reason"]
    assert errors.loc["person11/planted_blur.png", "stage"] == "hq/sharpness"
    assert errors.loc["person11/planted_blur.png", "reason"].startswith("blurred: face sharpness")
    # Every rejection is in dropped.csv too, and card.md counts them per kind.
    dropped = pd.read_csv(root / "dropped.csv").set_index("path")
    assert {"person01/planted_small.png", "person11/planted_blur.png"} <= set(dropped.index)
    card = (root / "card.md").read_text()
    for stage in ("hq/face_size", "hq/sharpness"):
        assert f"| {stage} | {int((errors['stage'] == stage).sum())} |" in card

    # The large, sharp originals are kept as aligned 512 crops.
    sources = pd.read_parquet(root / "sources.parquet")
    assert {"person01/img1.jpg", "person11/img33.jpg"} <= set(sources["source"])
    faces = pd.read_parquet(root / "mined" / "faces.parquet").drop_duplicates("path").set_index("path")
    quality = pd.read_parquet(root / "quality.parquet").set_index("path")
    for rel, source in zip(sources["path"], sources["source"], strict=True):
        with Image.open(root / "images" / rel) as im:
            assert im.size == (512, 512)
        box = faces.loc[source]
        assert np.sqrt((box["x1"] - box["x0"]) * (box["y1"] - box["y0"])) >= 256
        assert quality.loc[source, "sharpness"] >= 150
    assert not (root / "images" / ".staging").exists()


def test_niqe_filter_reuses_the_evaluation_metric(faces_dir, tmp_path):
    import cv2

    from refface.builders.reface_hq import REJECT_NIQE, REJECT_SHARPNESS, _crop_chunk, quality_rejections
    from refface.evaluation.metrics import fit_niqe_params
    from refface.manifests.io import read_image, write_png
    from refface.mining.align import FFHQ_TEMPLATE_512

    demo = faces_dir.parent / "refldm_demo"
    if not demo.is_dir():
        pytest.skip(f"{demo} not found")
    # A pristine model fit on sharp aligned faces, saved in BasicSR's npz layout.
    params = fit_niqe_params([read_image(demo / f"ref{i}.png") for i in range(4)])
    npz = tmp_path / "niqe_pris_params.npz"
    np.savez(npz, mu_pris_param=params["mu"], cov_pris_param=params["cov"])
    sharp = read_image(demo / "gt.png")
    write_png(tmp_path / "sharp.png", sharp)
    write_png(tmp_path / "soft.png", cv2.GaussianBlur(sharp, (0, 0), 4))
    # The demo images are FFHQ-aligned 512 crops: the FFHQ template's 5 points re-align them in place.
    lm = [float(v) for v in np.asarray(FFHQ_TEMPLATE_512).ravel()]
    items = [
        (i, str(tmp_path / f"{n}.png"), lm, str(tmp_path / f"crop{i}.png"), 512, str(npz))
        for i, n in enumerate(("sharp", "soft"))
    ]
    (r_sharp, e1, s1, n1), (r_soft, e2, s2, n2) = _crop_chunk(items)
    assert e1 is None and e2 is None and np.isfinite([n1, n2]).all()
    assert n2 > n1 and s2 < s1  # blur raises NIQE (worse) and lowers sharpness
    quality = pd.DataFrame({"row": [0, 1], "error": [None, None], "sharpness": [s1, s2], "niqe": [n1, n2]})
    config = RefaceHQConfig(niqe_params=str(npz), max_niqe=(n1 + n2) / 2, min_sharpness=None)
    assert quality_rejections(quality, config) == {
        1: (REJECT_NIQE, f"low quality: NIQE {n2:.2f} > {(n1 + n2) / 2:g}")
    }
    config = RefaceHQConfig(min_sharpness=(s1 + s2) / 2)
    assert quality_rejections(quality, config)[1][0] == REJECT_SHARPNESS and 0 not in quality_rejections(
        quality, config
    )


def test_corrections_apply_after_curation(built, faces_dir, tmp_path):
    import json

    root, _ = built
    other = tmp_path / "root"
    shutil.copytree(root, other)
    config = RefaceHQConfig(
        labels=str(faces_dir / "labels.csv"), identity_threshold=0.07, crop_size=CROP, min_sharpness=None
    )
    ids = pd.read_parquet(other / "identities.parquet")
    by_id = ids[ids["identity"] >= 0].groupby("identity")["path"].apply(sorted)
    (a, members_a), (b, members_b) = list(by_id.items())[:2]
    csv = tmp_path / "corrections.csv"
    csv.write_text(
        f"path,action,value\n{members_a[0]},move,{b}\n{members_b[-1]},drop,\nnot/there.png,drop,\n"
    )
    summary = build_reface_hq(faces_dir, other, replace(config, corrections=str(csv)))
    after = dict(pd.read_parquet(other / "identities.parquet")[["path", "identity"]].values)
    assert after[members_a[0]] == b and after[members_b[-1]] == -1
    listed = {p for s in SPLITS for p in (other / f"{s}_image.txt").read_text().split()}
    assert members_b[-1] not in listed and summary["images"] == len(listed)
    build = json.loads((other / "build.json").read_text())
    assert build["corrections"]["applied"] == 2
    assert [u["path"] for u in build["corrections"]["unmatched"]] == ["not/there.png"]
    assert validate_root(other).ok
    # Untouched identities are the curation's own.
    before = dict(ids[["path", "identity"]].values)
    assert all(after[p] == i for p, i in before.items() if i not in (a, b))
