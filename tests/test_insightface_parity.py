"""refface's SCRFD decoding, norm_crop alignment and ArcFace preprocessing against insightface itself.

insightface (installed for the tests from requirements-test.txt) runs its own ``model_zoo.SCRFD``,
``model_zoo.ArcFaceONNX`` and ``utils.face_align`` on tiny random ONNX models with the real models'
signatures; refface must give the same boxes and landmarks (<= 1e-4 px), identical crops and the
same embeddings (<= 1e-5). The 0.4 identity rule of FFHQ-Ref was defined on insightface's output.
"""

from __future__ import annotations

import numpy as np
import pytest
from common.tiny_arcface import build_tiny_arcface
from common.tiny_scrfd import build_tiny_scrfd
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align

from refface.mining.align import ARCFACE_DST, arcface_crop
from refface.mining.detect import Face, ScrfdDetector
from refface.mining.embed import ArcFaceEmbedder


class _InsightFace:
    """What insightface's FaceAnalysis hands ArcFaceONNX.get: an object with ``kps``."""

    def __init__(self, kps):
        self.kps = kps


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """An RGB test image: smooth gradients plus noise, so crops and detections are not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    base = np.stack([128 + 100 * np.sin(xx / 13 + c) * np.cos(yy / 17 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _tilted_landmarks(seed: int, scale: float, centre: tuple[float, float]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-0.6, 0.6)
    c, s = np.cos(angle), np.sin(angle)
    pts = (ARCFACE_DST - ARCFACE_DST.mean(axis=0)) @ np.array([[c, -s], [s, c]]).T * scale
    pts += np.array(centre) + rng.normal(0, 1.5, (5, 2))
    return pts.astype(np.float32)  # detectors hand over float32 landmarks


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface_models")
    return {
        "scrfd_fixed": build_tiny_scrfd(root / "det_fixed.onnx", size=160, seed=0),
        "scrfd_dynamic": build_tiny_scrfd(root / "det_dynamic.onnx", size=None, seed=1),
        "arcface": build_tiny_arcface(root / "w600k_r50.onnx", seed=2),
        "arcface_mxnet": build_tiny_arcface(root / "mxnet_r100.onnx", seed=3, self_normalizing=True),
    }


def _insightface_scrfd(path, size: int) -> SCRFD:
    det = SCRFD(str(path))
    det.prepare(-1, input_size=(size, size))  # FaceAnalysis.prepare(det_size=...) does the same
    return det


@pytest.mark.parametrize("model", ["scrfd_fixed", "scrfd_dynamic"])
@pytest.mark.parametrize("shape", [(200, 300), (310, 170), (160, 160), (97, 641)])
def test_scrfd_boxes_scores_and_landmarks_match_insightface(models, model, shape):
    img = _image(*shape, seed=sum(shape))
    theirs = _insightface_scrfd(models[model], 160)
    dets, kpss = theirs.detect(_bgr(img))
    ours = ScrfdDetector(models[model], input_size=160)(img)
    assert len(dets) >= 5, "the tiny detector should find several boxes for NMS to work on"
    assert len(ours) == len(dets)
    np.testing.assert_allclose(np.array([f.bbox for f in ours]), dets[:, :4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array([f.landmarks for f in ours]), kpss, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array([f.score for f in ours]), dets[:, 4], atol=1e-6, rtol=0)


def test_scrfd_thresholds_match_insightface(models):
    img = _image(240, 180, seed=7)
    theirs = _insightface_scrfd(models["scrfd_fixed"], 160)
    theirs.prepare(-1, det_thresh=0.7, nms_thresh=0.2)
    dets, kpss = theirs.detect(_bgr(img))
    ours = ScrfdDetector(models["scrfd_fixed"], input_size=160, threshold=0.7, nms_threshold=0.2)(img)
    assert len(ours) == len(dets) > 0
    np.testing.assert_allclose(np.array([f.bbox for f in ours]), dets[:, :4], atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [112, 128, 224])
@pytest.mark.parametrize("seed", range(4))
def test_norm_crop_is_identical_to_insightface(size, seed):
    img = _image(260, 340, seed=seed)
    lm = _tilted_landmarks(seed, scale=1.0 + seed * 0.7, centre=(120 + 30 * seed, 140 - 10 * seed))
    ours = arcface_crop(img, lm, size)
    theirs = face_align.norm_crop(_bgr(img), lm, image_size=size)
    np.testing.assert_array_equal(ours, theirs[:, :, ::-1])


@pytest.mark.parametrize("model", ["arcface", "arcface_mxnet"])
def test_arcface_embedding_matches_insightface(models, model):
    img = _image(240, 320, seed=11)
    lm = _tilted_landmarks(11, scale=1.4, centre=(150, 120))
    theirs = ArcFaceONNX(str(models[model]))
    raw = theirs.get(_bgr(img), _InsightFace(lm))
    emb = ArcFaceEmbedder(models[model])
    assert (emb.input_mean, emb.input_std) == (theirs.input_mean, theirs.input_std)
    vectors, norms = emb.embed_crops([emb.crop(img, Face(bbox=np.zeros(4), score=1.0, landmarks=lm))])
    np.testing.assert_allclose(vectors[0], raw / np.linalg.norm(raw), atol=1e-5, rtol=0)
    np.testing.assert_allclose(norms[0], np.linalg.norm(raw), rtol=1e-5)


def test_batched_arcface_features_match_insightface(models):
    crops = list(np.random.default_rng(5).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8))
    raw = ArcFaceONNX(str(models["arcface"])).get_feat([_bgr(c) for c in crops])
    vectors, _ = ArcFaceEmbedder(models["arcface"], batch_size=4).embed_crops(crops)
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5, rtol=0)


def test_detect_align_embed_end_to_end_matches_insightface(models):
    """The buffalo_l path of FaceAnalysis: SCRFD, then ArcFace on the first face's landmarks."""
    img = _image(300, 260, seed=21)
    dets, kpss = _insightface_scrfd(models["scrfd_fixed"], 160).detect(_bgr(img))
    theirs = ArcFaceONNX(str(models["arcface"]))
    faces = ScrfdDetector(models["scrfd_fixed"], input_size=160)(img)
    emb = ArcFaceEmbedder(models["arcface"])
    for i in range(3):
        raw = theirs.get(_bgr(img), _InsightFace(kpss[i]))
        crop = emb.crop(img, faces[i])
        np.testing.assert_array_equal(crop, face_align.norm_crop(_bgr(img), kpss[i])[:, :, ::-1])
        vectors, _ = emb.embed_crops([crop])
        np.testing.assert_allclose(vectors[0], raw / np.linalg.norm(raw), atol=1e-5, rtol=0)
