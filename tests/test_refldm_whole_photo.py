"""Whole-photo ReF-LDM restore: every face aligned, restored, pasted back; the rest of the photo untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from common.tiny_refldm import TINY, _one_thread  # noqa: F401  (autouse fixture)

from refface.manifests.atomic import write_json
from refface.manifests.io import read_image, write_png
from refface.mining.align import ffhq_template
from refface.mining.detect import Face
from refface.train.refldm.config import load_config
from refface.train.refldm.model import RefLDMUNet
from refface.train.refldm.vqgan import build_vqgan
from refface.train.refldm.whole_photo import align_faces, paste_back, restore_photos

PHOTO = "gfpgan_inputs/unlabeled/whole_imgs__10045.png"  # several people (see the photos' README)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random ReF-LDM model folder (32x32 faces)."""
    cfg, _ = load_config(TINY)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, stage="refldm"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    RefLDMUNet.from_unet_config(cfg.unet).save_pretrained(out / "unet")
    build_vqgan(cfg.vqgan).save_pretrained(out / "vqgan")
    write_json(out / "refldm.json", {"config": cfg.to_dict()})
    return out


def _face_at(x: float, y: float, scale: float) -> Face:
    """A face whose landmarks are the FFHQ template scaled by ``scale`` and moved to (x, y)."""
    pts = ffhq_template(512) * scale + np.array([x, y])
    return Face(bbox=np.r_[pts.min(0) - 20, pts.max(0) + 20], score=1.0, landmarks=pts)


def test_paste_back_changes_only_the_masked_pixels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    faces = align_faces(img, [_face_at(20, 30, 0.2), _face_at(250, 120, 0.25)], 64)
    assert all(f.crop.shape == (64, 64, 3) for f in faces)
    restored = [np.full((64, 64, 3), 255, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    out, union = paste_back(img, restored, faces)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out[union == 0], img[union == 0])
    # Each face's centre now shows its restored crop.
    for face, value in zip(faces, (255, 0), strict=True):
        cx, cy = (face.bbox[:2] + face.bbox[2:]) / 2
        assert np.all(out[int(cy), int(cx)] == value)
    assert 0 < float((union > 0).mean()) < 0.5


@pytest.mark.slow
def test_whole_photo_restore_pastes_every_face(tmp_path, faces_dir, model_dir):
    from refface.mining.detect import DlibDetector

    photo = faces_dir / PHOTO
    img = read_image(photo)
    n_faces = len(DlibDetector()(img))
    assert n_faces >= 2
    # References: one unaligned photo and one aligned crop.
    refs = [
        faces_dir / "gfpgan_inputs/unlabeled/whole_imgs__Blake_Lively.jpg",
        faces_dir / "gfpgan_inputs/unlabeled/cropped_faces__Adele_crop.png",
    ]
    counts = restore_photos(photo, tmp_path / "out", checkpoint=model_dir, refs=refs, steps=2)
    assert counts["photos"] == 1 and counts["faces"] == n_faces and counts["errors"] == 0
    out = read_image(tmp_path / "out" / f"{photo.stem}.png")
    assert out.shape == img.shape
    assert len(list((tmp_path / "out" / "faces").glob("*.png"))) == n_faces
    # Recompute the masks: outside them the photo is untouched; inside each face something changed.
    import cv2

    from refface.train.refldm.whole_photo import soft_mask

    faces = align_faces(img, DlibDetector()(img), 32)
    union = np.zeros(img.shape[:2], np.float32)
    for f in faces:
        inv = cv2.invertAffineTransform(f.matrix)
        mask = cv2.warpAffine(soft_mask(32), inv, img.shape[1::-1], flags=cv2.INTER_LINEAR, borderValue=0.0)
        union = np.maximum(union, mask)
        inside = mask > 0.99
        assert inside.any() and not np.array_equal(out[inside], img[inside])
    assert np.array_equal(out[union <= 0], img[union <= 0])
    # A rerun skips the finished photo.
    again = restore_photos(photo, tmp_path / "out", checkpoint=model_dir, refs=refs, steps=2)
    assert again["skipped"] == 1 and again["faces"] == 0


def test_reference_without_a_face_is_reported(tmp_path, model_dir):
    from refface.train.refldm.whole_photo import reference_crops

    class NoFaces:
        def __call__(self, img):
            return []

    write_png(tmp_path / "wide.png", np.zeros((20, 40, 3), np.uint8))
    write_png(tmp_path / "square.png", np.full((40, 40, 3), 7, np.uint8))
    crops, bad = reference_crops([tmp_path / "wide.png", tmp_path / "square.png"], NoFaces(), 32)
    assert len(crops) == 1 and crops[0].shape == (40, 40, 3)  # square: taken as aligned
    assert bad == [(str(tmp_path / "wide.png"), "no face found in the reference")]


def test_cli_whole_photo_without_faces_keeps_the_photo(tmp_path, model_dir):
    from typer.testing import CliRunner

    from refface.cli import app

    img = np.full((60, 90, 3), 40, np.uint8)
    write_png(tmp_path / "blank.png", img)
    res = CliRunner().invoke(
        app,
        ["restore", str(tmp_path / "blank.png"), "--whole-photo", "--checkpoint", str(model_dir), "--output",
         str(tmp_path / "out"), "--steps", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert np.array_equal(read_image(tmp_path / "out" / "blank.png"), img)
    assert "no face found" in (tmp_path / "out" / "errors.csv").read_text()
    res = CliRunner().invoke(
        app, ["restore", str(tmp_path / "blank.png"), "--model", "mgfr", "--whole-photo", "--checkpoint",
              str(model_dir), "--output", str(tmp_path / "o2")],
    )  # fmt: skip
    assert res.exit_code != 0 and "refldm" in res.output


class RecordingRestorer:
    """Stands in for the ReF-LDM restorer: returns the LQ faces and records each face's references."""

    size = 32

    def __init__(self):
        self.refs: list[int] = []

    def resize(self, img):
        import cv2

        return cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def __call__(self, lqs, refs, keys):
        self.refs += [len(r) for r in refs]
        return list(lqs)


@pytest.mark.slow
def test_each_reference_goes_to_the_face_it_resembles(tmp_path, faces_dir):
    import cv2

    from refface.mining.detect import DlibDetector
    from refface.train.refldm.whole_photo import assign_references

    # Two people side by side; the references are two other photos of the one on the right.
    left = read_image(faces_dir / "deepface/person02/img12.jpg")
    right = read_image(faces_dir / "deepface/person01/img1.jpg")
    h = min(left.shape[0], right.shape[0])
    both = [cv2.resize(im, (round(im.shape[1] * h / im.shape[0]), h)) for im in (left, right)]
    write_png(tmp_path / "pair.png", np.concatenate(both, axis=1))
    refs = [faces_dir / "deepface/person01/img10.jpg", faces_dir / "deepface/person01/img11.jpg"]
    counts = {}
    for match in ("nearest", "all"):
        rec = RecordingRestorer()
        counts[match] = restore_photos(
            tmp_path / "pair.png",
            tmp_path / match,
            checkpoint="unused",
            refs=refs,
            ref_match=match,
            restorer=rec,
        )
        assert counts[match]["faces"] == 2 and counts[match]["errors"] == 0
        if match == "nearest":
            # Face i of the restorer is the detector's face i: the right-hand one holds both references.
            found = DlibDetector()(read_image(tmp_path / "pair.png"))
            right_face = int(np.argmax([f.bbox[0] for f in found]))
            assert rec.refs[right_face] == 2 and rec.refs[1 - right_face] == 0
        else:
            assert rec.refs == [2, 2]
    assert counts["nearest"]["faces_with_refs"] == 1 and counts["all"]["faces_with_refs"] == 2
    # The matching itself: nearest face by cosine similarity, ties to the first.
    faces = np.eye(3)[:2]
    assert assign_references(faces, np.array([[0.1, 0.9, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])) == [
        [1, 2],
        [0],
    ]
    assert assign_references(np.zeros((0, 3)), np.eye(3)) == []
    with pytest.raises(ValueError, match="ref_match"):
        restore_photos(tmp_path / "pair.png", tmp_path / "x", checkpoint="unused", ref_match="best")
    with pytest.raises(ValueError, match="test-time augmentation"):
        restore_photos(tmp_path / "pair.png", tmp_path / "x", checkpoint="unused", tta="mirror")
    # Plain embeddings (a training set mined with --tta none) match the same way.
    rec = RecordingRestorer()
    restore_photos(
        tmp_path / "pair.png", tmp_path / "plain", checkpoint="unused", refs=refs, tta="none", restorer=rec
    )
    assert sorted(rec.refs) == [0, 2]
