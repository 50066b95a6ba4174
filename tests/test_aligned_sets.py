"""Flat eval names, FFHQ-alignment detection, the gt512 folder and the reference order options."""

from __future__ import annotations

import numpy as np
import pytest

from refface.builders.aligned import eval_names, is_ffhq_aligned, unique_stems
from refface.mining.align import ffhq_template
from refface.mining.references import ReferenceConfig, select_for_target


def test_unique_stems_keep_file_stems_and_join_clashing_paths():
    names = unique_stems(["a/img1.jpg", "b/img1.jpg", "b/img2.png", "00000/00000.png"])
    assert names == {
        "a/img1.jpg": "a__img1",
        "b/img1.jpg": "b__img1",
        "b/img2.png": "img2",
        "00000/00000.png": "00000",
    }
    assert eval_names(["x/1.jpg", "y/2.jpg"]) == {"x/1.jpg": "1.png", "y/2.jpg": "2.png"}


def test_ffhq_alignment_is_detected_from_landmarks():
    lm = ffhq_template(1024)
    assert is_ffhq_aligned(lm, 1024, 1024)
    assert is_ffhq_aligned(lm + 10, 1024, 1024)  # within 3% of the side
    assert not is_ffhq_aligned(lm * 0.7 + 100, 1024, 1024)
    assert not is_ffhq_aligned(ffhq_template(512), 512, 600)  # not square


def _refs(order: str, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    vectors = np.stack([base + rng.normal(scale=s, size=16) for s in np.linspace(0.2, 0.6, 8)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    config = ReferenceConfig(max_refs=5, ref_order=order, order_seed=seed, near_duplicate_distance=0.0)
    return select_for_target(0, list(range(8)), vectors, "cosine", 2.0, config, evaluation=True)


def test_reference_order_options():
    far, near = _refs("farthest"), _refs("nearest")
    assert len(far) == len(near) == 5 and 0 not in far
    assert far != near
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    vectors = np.stack([base + rng.normal(scale=s, size=16) for s in np.linspace(0.2, 0.6, 8)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dist = 1 - vectors[1:] @ vectors[0]
    assert near == [int(i) + 1 for i in np.argsort(dist)[:5]]  # ascending distance
    assert far[0] == int(np.argmax(dist)) + 1  # farthest-point order starts with the farthest view
    assert _refs("random") == _refs("random") != _refs("random", seed=1)
    with pytest.raises(ValueError, match="ref_order"):
        ReferenceConfig(ref_order="closest")


def test_gt_folder_is_flat_512_png(tmp_path):
    from PIL import Image

    from refface.builders.aligned import gt_folder_stage
    from refface.manifests.io import write_png
    from refface.manifests.references import write_references

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for rel in ("p1/a.jpg", "p2/a.jpg", "p2/b.png"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / rel) if rel.endswith(".jpg") else write_png(images / rel, arr)
    root = tmp_path / "root"
    root.mkdir()
    rows = [{"gt_image": g, "lq_image": "", "ref_image": ["p2/b.png"]} for g in ("p1/a.jpg", "p2/a.jpg")]
    write_references(root / "test_references.csv", rows, with_lq=True)
    gt_folder_stage(root, images)
    names = sorted(p.name for p in (root / "gt512").iterdir())
    assert names == ["p1__a.png", "p2__a.png"]
    for name in names:
        with Image.open(root / "gt512" / name) as img:
            assert img.size == (512, 512) and img.format == "PNG" and img.mode == "RGB"
