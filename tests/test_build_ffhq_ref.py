"""FFHQ-Ref builder on the shared labeled photos used as an FFHQ stand-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common.faces_root import build_faces_root
from common.outputs import dataset_files

from refface.builders.ffhq_ref import FFHQRefConfig, build_ffhq_ref
from refface.builders.validate import label_agreement, validate_root
from refface.manifests.references import read_references
from refface.manifests.splits import read_split_lists

SPLITS = ("train", "val", "test")


def config(faces_dir: Path, **overrides) -> FFHQRefConfig:
    # The shared photos are not FFHQ-aligned: detect with dlib, as the mining fixture does.
    return FFHQRefConfig(detector="dlib", labels=str(faces_dir / "labels.csv"), **overrides)


def seeded_root(faces_dir: Path, out: Path) -> Path:
    """A fresh output root that starts from the cached mining outputs (the mine stage then skips)."""
    shutil.copytree(build_faces_root(faces_dir), out / "mined")
    return out


def crop_labels(root: Path, labels: pd.DataFrame) -> pd.DataFrame:
    """The photo labels under the crop names the build wrote (via sources.parquet)."""
    sources = pd.read_parquet(root / "sources.parquet").rename(columns={"source": "photo"})
    return sources[["path", "photo"]].merge(labels.rename(columns={"path": "photo"}), on="photo")


@pytest.fixture(scope="module")
def built(faces_dir, tmp_path_factory):
    root = seeded_root(faces_dir, tmp_path_factory.mktemp("ffhq") / "root")
    summary = build_ffhq_ref(faces_dir, root, config(faces_dir))
    return root, summary


def test_outputs_and_formats(built, faces_dir):
    root, summary = built
    for name in [
        "identities.parquet",
        "splits.parquet",
        "card.md",
        "build.json",
        "embeddings.npy",
        "images.parquet",
    ]:
        assert (root / name).exists(), name
    for split in SPLITS:
        df = pd.read_csv(root / f"{split}_references.csv")
        expected = ["gt_image", "ref_image"] if split == "train" else ["gt_image", "lq_image", "ref_image"]
        assert list(df.columns) == expected
        assert len(df) > 0, split
    for plot in ["cluster_sizes", "refs_per_target", "ref_distances", "split_sizes"]:
        assert (root / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    build = json.loads((root / "build.json").read_text())
    # Photos are not FFHQ-aligned: the dataset is built on the aligned crops.
    assert Path(build["image_root"]) == (root / "aligned").resolve()
    assert Path(build["source_root"]) == faces_dir.resolve()
    from refface.manifests.io import list_images

    # The input fingerprint is the photos', the image count the crops'.
    assert build["model"]["fingerprint"] and build["inputs"]["images"] == len(list_images(faces_dir))
    assert summary["images"] == len(pd.read_parquet(root / "images.parquet"))
    assert {"align", "identities", "splits", "references", "card"} <= set(build["timings"])
    assert "errors" in build and build["config"]["detector"] == "dlib"


def test_every_csv_path_is_an_aligned_512_png_and_eval_sets_are_flat(built):
    from PIL import Image

    root, _ = built
    seen = set()
    for split in SPLITS:
        df = read_references(root / f"{split}_references.csv")
        seen.update(df["gt_image"])
        seen.update(r for lst in df["ref_image"] for r in lst)
        if split != "train":
            # Flat unique names: the LQ file, the official inference's result and the gt512/ file.
            assert (df["lq_image"] == df["gt_image"]).all() and not df["gt_image"].str.contains("/").any()
            for name in df["lq_image"]:
                assert Image.open(root / "gt512" / name).size == (512, 512)
    for path in seen:
        with Image.open(root / "aligned" / path) as img:
            assert img.format == "PNG" and img.size == (512, 512), path


def test_split_lists_cover_every_crop_and_are_identity_disjoint(built, faces_dir):
    from refface.manifests.io import list_images

    root, _ = built
    lists = read_split_lists(root)
    listed = [p for s in SPLITS for p in lists[s]]
    assert sorted(listed) == sorted(pd.read_parquet(root / "images.parquet")["path"])
    # Every photo either has a crop or an errors row (no face, unreadable).
    sources = set(pd.read_parquet(root / "sources.parquet")["source"])
    errors = set(pd.read_csv(root / "errors.csv")["path"].astype(str))
    assert all(p in sources or p in errors or str(faces_dir / p) in errors for p in list_images(faces_dir))
    assigned = pd.read_parquet(root / "splits.parquet")
    per_id = assigned[assigned["identity"] >= 0].groupby("identity")["split"].nunique()
    assert (per_id == 1).all()


def test_references_agree_with_labels_and_singletons_get_none(built, faces_labels):
    root, _ = built
    refs = {s: read_references(root / f"{s}_references.csv") for s in SPLITS}
    labels = crop_labels(root, faces_labels)
    agree = label_agreement(refs, labels[["path", "identity", "source"]])
    print(f"reference precision vs labels: {agree}")
    assert agree["pairs_labeled"] > 500
    # Across sources one person may carry two labels (deepface person01 is LFW's Angelina Jolie).
    assert agree["precision_same_source"] >= 0.98, agree
    assert agree["precision"] >= 0.9, agree
    assert agree["targets_labeled_singleton_with_refs"] == 0
    # The card scores the same from the labels the build wrote under the crop names.
    written = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    assert label_agreement(refs, written) == agree
    distractors = set(labels.loc[labels["photo"].str.startswith("lfw_distractors/"), "path"])
    for df in refs.values():
        assert not df["gt_image"].isin(distractors).any()
        assert not any(r in distractors for lst in df["ref_image"] for r in lst)


def test_eval_reference_rules(built):
    root, _ = built
    from refface.builders.ffhq_ref import reference_radii
    from refface.manifests.root import DatasetRoot
    from refface.mining.references import distance_matrix

    emb, paths, vectors = DatasetRoot(root).embeddings_by_path()
    row = {p: i for i, p in enumerate(paths)}
    # Per-face radii from the impostor clustering: a pair's bar is their geometric mean.
    radius = reference_radii(root, emb, paths, config(Path(".")))
    assert np.ndim(radius) == 1 and (radius > 0).all()
    for split in ("val", "test"):
        df = read_references(root / f"{split}_references.csv")
        for gt, lst in zip(df["gt_image"], df["ref_image"], strict=True):
            assert 2 <= len(lst) <= 9 and gt not in lst
            refs = [row[r] for r in lst]
            d = distance_matrix(vectors[[row[gt]]], vectors[refs], "cosine")[0]
            bar = np.sqrt(radius[row[gt]] * radius[refs])
            assert (d >= 0.25 * bar - 1e-9).all() and (d < bar).all()


def test_validate_passes_and_card_reports_precision(built):
    root, _ = built
    report = validate_root(root)
    assert report.ok, report.problems
    card = (root / "card.md").read_text()
    assert "precision" in card and "## Splits" in card


def test_rerun_does_no_work_and_seed_controls_split(built, faces_dir, tmp_path):
    root, _ = built
    before = {p: p.stat().st_mtime_ns for p in (root / ".stages").glob("*.json")}
    build_ffhq_ref(faces_dir, root, config(faces_dir))
    assert {p: p.stat().st_mtime_ns for p in (root / ".stages").glob("*.json")} == before

    other = tmp_path / "seed1"
    shutil.copytree(root, other)
    build_ffhq_ref(faces_dir, other, config(faces_dir, seed=1, workers=1))
    assert (other / "test_image.txt").read_bytes() != (root / "test_image.txt").read_bytes()
    # Back to seed 0 with another worker count: byte-identical to the first build.
    build_ffhq_ref(faces_dir, other, config(faces_dir, seed=0, workers=1))
    assert dataset_files(other) == dataset_files(root)


def test_builders_pass_the_test_time_augmentation_to_mining():
    from refface.builders.celeba_test_ref import CelebATestRefConfig
    from refface.builders.ffhq_ref import mining_config
    from refface.builders.reface_hq import RefaceHQConfig

    for config in (FFHQRefConfig(tta="none"), CelebATestRefConfig(tta="none"), RefaceHQConfig(tta="none")):
        assert mining_config(config).tta == "none", type(config).__name__
        assert "tta" not in mining_config(config).stage_config()
    for config in (FFHQRefConfig(), CelebATestRefConfig(), RefaceHQConfig()):
        assert mining_config(config).stage_config()["tta"] == "flip", type(config).__name__
