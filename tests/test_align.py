"""Alignment: similarity fits, ArcFace crop geometry, FFHQ crops and their golden file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from refface.mining.align import (
    ARCFACE_DST,
    FFHQ_TEMPLATE_512,
    arcface_crop,
    arcface_template,
    ffhq_crop,
    ffhq_template,
    similarity_matrix,
    transform_points,
    umeyama,
)

DATA = Path(__file__).parent / "data"


def _load_golden_module():
    spec = importlib.util.spec_from_file_location("regen", DATA / "regenerate_align_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _similar(points: np.ndarray, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * scale
    return points @ rot.T + np.array(shift)


def test_umeyama_recovers_an_exact_similarity():
    src = _similar(ARCFACE_DST, 0.3, 2.5, (40.0, -7.0))
    matrix = similarity_matrix(src, ARCFACE_DST)
    np.testing.assert_allclose(transform_points(src, matrix), ARCFACE_DST, atol=1e-9)
    # Pure similarity: equal scale on both axes, no shear.
    a = matrix[:, :2]
    np.testing.assert_allclose(a @ a.T, np.eye(2) * (1 / 2.5) ** 2, atol=1e-12)


def test_umeyama_agrees_with_opencv_least_squares_similarity():
    import cv2

    rng = np.random.default_rng(3)
    src = _similar(ARCFACE_DST, -0.2, 1.7, (10.0, 30.0)) + rng.normal(0, 1.5, (5, 2))
    ours = umeyama(src, ARCFACE_DST)[:2]
    # With all points as inliers (huge threshold), RANSAC's final refit is the least-squares similarity.
    cv, _ = cv2.estimateAffinePartial2D(src, ARCFACE_DST, method=cv2.RANSAC, ransacReprojThreshold=1e6)
    np.testing.assert_allclose(ours, cv, atol=1e-3)


def test_degenerate_landmarks_are_refused():
    with pytest.raises(ValueError, match="degenerate"):
        umeyama(np.ones((5, 2)), ARCFACE_DST)
    with pytest.raises(ValueError, match="NaN"):
        similarity_matrix(np.full((5, 2), np.nan), ARCFACE_DST)


def test_arcface_crop_puts_a_marked_landmark_on_the_template():
    img = np.zeros((300, 300, 3), np.uint8)
    lm = _similar(ARCFACE_DST, 0.25, 2.0, (60.0, 40.0))
    x, y = np.rint(lm[2]).astype(int)
    img[y - 2 : y + 3, x - 2 : x + 3] = 255  # a bright dot on the nose
    crop = arcface_crop(img, lm)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    ys, xs = np.nonzero(crop[..., 0] > 60)
    assert abs(xs.mean() - ARCFACE_DST[2, 0]) < 1.0 and abs(ys.mean() - ARCFACE_DST[2, 1]) < 1.0


def test_templates_scale_like_insightface_and_facexlib():
    np.testing.assert_allclose(arcface_template(224), ARCFACE_DST * 2)
    t128 = arcface_template(128)
    np.testing.assert_allclose(t128[:, 0], ARCFACE_DST[:, 0] + 8.0)
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        arcface_template(100)
    np.testing.assert_allclose(ffhq_template(1024), FFHQ_TEMPLATE_512 * 2)
    with pytest.raises(ValueError):
        ffhq_template(0)


def test_ffhq_crop_any_size_with_grey_border():
    img = np.full((64, 64, 3), 10, np.uint8)
    lm = FFHQ_TEMPLATE_512 / 8.0  # the FFHQ template of a 64-px crop
    same = ffhq_crop(img, lm, 64)
    assert np.all(same == 10)  # identity transform: every pixel comes from the image
    big = ffhq_crop(img[:40, :40], lm, 256)  # the crop reaches past the image's bottom-right
    assert big.shape == (256, 256, 3)
    assert tuple(big[0, 0]) == (10, 10, 10)
    assert tuple(big[-1, -1]) == (135, 133, 132)


def test_golden_ffhq_crop_matches():
    # ArcFace crops are checked against insightface itself (test_insightface_parity.py); FFHQ crops
    # have no insightface counterpart, so this file guards them against unintended changes.
    regen = _load_golden_module()
    img, lm = regen.golden_input()
    ffhq = ffhq_crop(img, lm, 96)
    # One grey level of slack: OpenCV builds may round bilinear sums differently.
    assert np.abs(ffhq.astype(int) - np.load(DATA / "align_golden_ffhq96.npy").astype(int)).max() <= 1
