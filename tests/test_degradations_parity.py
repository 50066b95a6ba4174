"""Parity with BasicSR's ``degradations`` functions: kernels, images and parameter distributions."""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import pytest
from scipy import stats

from refface.degradations import Degrader, apply_params, get_preset, ops, prepare_input
from refface.degradations.kernels import KERNEL_TYPES, make_kernel, sample_kernel_params
from refface.degradations.reference import (
    basicsr_blur_downsample,
    basicsr_degrade,
    basicsr_kernel,
    load_basicsr_degradations,
)

N_DRAWS = 10_000
KS_ALPHA = 1e-3


@pytest.fixture(scope="module")
def bsr():
    # BasicSR comes with the test requirements (requirements-test.txt): missing, the tests fail.
    return load_basicsr_degradations()


@pytest.fixture(scope="module", autouse=True)
def _quiet_opencv():
    # BasicSR hands float arrays to imencode; OpenCV 5 warns on every call.
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    yield
    cv2.utils.logging.setLogLevel(level)


@pytest.fixture(scope="module")
def images(faces_dir):
    """Four real photos from the shared set."""
    import pandas as pd

    from refface.manifests.io import read_image

    labels = pd.read_csv(faces_dir / "labels.csv", dtype=str)
    return [read_image(faces_dir / p) for p in labels["path"].iloc[[0, 40, 200, 500]]]


@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_same_kernel_for_same_params(bsr, kind):
    rng = np.random.default_rng(7)
    for _ in range(25):
        params = sample_kernel_params(
            rng, [kind], [1.0], (0.2, 16), (0.2, 16), betag_range=(0.5, 4), betap_range=(1, 2)
        )
        for size in (21, 41):
            ours = make_kernel(params, size)
            theirs = basicsr_kernel(bsr, {**params, "kernel_size": size})
            assert ours.shape == (size, size)
            np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
            assert abs(ours.sum() - 1) < 1e-9


@pytest.mark.parametrize("preset", ["refldm-severe", "refldm-moderate", "gfpgan-train", "difface-test"])
def test_same_output_image_for_same_params(bsr, images, preset):
    """The exact path is bit-identical to BasicSR's calls (JPEG included); the fast path ≥ 45 dB."""
    degrader = Degrader(preset, seed=11)
    for i, img in enumerate(images):
        prepared, _ = prepare_input(img, degrader.config)
        lq, params = degrader.degrade(img, f"img{i}")
        reference = basicsr_degrade(bsr, prepared, params)
        exact = apply_params(prepared, params, fast=False)
        np.testing.assert_array_equal(exact, reference)
        assert ops.psnr(lq, reference) >= 45.0


@pytest.mark.parametrize("preset", ["refldm-severe", "refldm-moderate", "gfpgan-train"])
def test_fused_blur_downsample_within_one_level(bsr, images, preset):
    degrader = Degrader(preset, seed=5)
    for i in range(12):
        img = images[i % len(images)]
        prepared, _ = prepare_input(img, degrader.config)
        params = degrader.sample(f"k{i}")
        h, w = prepared.shape[:2]
        kernel = make_kernel(params, params["kernel_size"])
        ours = ops.blur_downsample(prepared, kernel, ops.lq_size(w, h, params["scale"]))[:, :, ::-1]
        theirs = basicsr_blur_downsample(bsr, prepared, params)
        assert ours.shape == theirs.shape
        # The bound is DEFAULT_TOLERANCE grey levels (0.02); "within 1 level" holds with margin.
        assert np.abs(ours - theirs).max() * 255 <= ops.DEFAULT_TOLERANCE + 1e-3


def _capture(monkeypatch, module, name):
    """Record the values a module's ``np.random.<name>`` returns."""
    seen: list = []
    original = getattr(np.random, name)

    def wrapper(*args, **kwargs):
        value = original(*args, **kwargs)
        seen.append(value)
        return value

    monkeypatch.setattr(module.np.random, name, wrapper)
    return seen


def _ks_same(a, b) -> float:
    return stats.ks_2samp(np.asarray(a, float), np.asarray(b, float)).pvalue


# 10k kernels drawn per preset from both samplers (~5 s each on 2 shared cores).
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["refldm-moderate", "refldm-severe", "gfpgan-train"])
def test_kernel_parameter_distributions_match_basicsr(bsr, monkeypatch, preset):
    """KS tests over 10k draws: σx, σy, θ, kernel type share and the kernels' centre weight."""
    cfg = get_preset(preset)
    np.random.seed(0)
    random.seed(0)
    theirs = {"iso": [], "aniso": [], "center": []}
    uniforms = _capture(monkeypatch, bsr, "uniform")
    for _ in range(N_DRAWS):
        uniforms.clear()
        kernel = bsr.random_mixed_kernels(
            list(cfg.kernel_list),
            list(cfg.kernel_prob),
            cfg.kernel_size,
            cfg.blur_sigma,
            cfg.blur_sigma,
            [-math.pi, math.pi],
            noise_range=None,
        )
        theirs["iso" if len(uniforms) == 1 else "aniso"].append([float(u) for u in uniforms])
        theirs["center"].append(kernel[cfg.kernel_size // 2, cfg.kernel_size // 2])
    monkeypatch.undo()

    rng = np.random.default_rng(0)
    ours = [
        sample_kernel_params(rng, cfg.kernel_list, cfg.kernel_prob, cfg.blur_sigma, cfg.blur_sigma)
        for _ in range(N_DRAWS)
    ]
    ours_center = [make_kernel(p, cfg.kernel_size)[cfg.kernel_size // 2, cfg.kernel_size // 2] for p in ours]
    ours_iso = [p for p in ours if p["kernel_type"] == "iso"]
    ours_aniso = [p for p in ours if p["kernel_type"] == "aniso"]

    # Kernel type shares: two binomial samples with the same p.
    table = [[len(ours_iso), len(ours_aniso)], [len(theirs["iso"]), len(theirs["aniso"])]]
    assert stats.chi2_contingency(table).pvalue > KS_ALPHA
    assert _ks_same([p["sigma_x"] for p in ours_iso], [u[0] for u in theirs["iso"]]) > KS_ALPHA
    assert _ks_same([p["sigma_x"] for p in ours_aniso], [u[0] for u in theirs["aniso"]]) > KS_ALPHA
    assert _ks_same([p["sigma_y"] for p in ours_aniso], [u[1] for u in theirs["aniso"]]) > KS_ALPHA
    assert _ks_same([p["theta"] for p in ours_aniso], [u[2] for u in theirs["aniso"]]) > KS_ALPHA
    assert _ks_same(ours_center, theirs["center"]) > KS_ALPHA


@pytest.mark.parametrize("kind", ["generalized_aniso", "plateau_iso"])
def test_beta_distribution_matches_basicsr(bsr, monkeypatch, kind):
    np.random.seed(1)
    random.seed(1)
    beta_range = (0.5, 4.0) if kind.startswith("generalized") else (1.0, 2.0)
    uniforms = _capture(monkeypatch, bsr, "uniform")
    theirs = []
    for _ in range(N_DRAWS // 4):
        uniforms.clear()
        bsr.random_mixed_kernels(
            [kind], [1.0], 21, (0.5, 4), (0.5, 4), [-math.pi, math.pi], beta_range, beta_range
        )
        theirs.append(float(uniforms[-1]))
    monkeypatch.undo()
    rng = np.random.default_rng(1)
    ours = [
        sample_kernel_params(
            rng, [kind], [1.0], (0.5, 4), (0.5, 4), betag_range=beta_range, betap_range=beta_range
        )["beta"]
        for _ in range(N_DRAWS // 4)
    ]
    assert _ks_same(ours, theirs) > KS_ALPHA


@pytest.mark.parametrize("preset", ["refldm-severe", "codeformer-stage2"])
def test_noise_jpeg_and_scale_distributions_match_basicsr(bsr, monkeypatch, preset):
    """σ of ``random_add_gaussian_noise`` and q of ``random_add_jpg_compression`` vs ours; r vs U(range)."""
    cfg = get_preset(preset)
    np.random.seed(2)
    tiny = np.zeros((2, 2, 3), np.float32)
    uniforms = _capture(monkeypatch, bsr, "uniform")
    sigmas = []
    for _ in range(N_DRAWS):
        uniforms.clear()
        bsr.random_add_gaussian_noise(tiny, cfg.noise_range)
        sigmas.append(float(uniforms[0]))
    qualities = []
    monkeypatch.setattr(bsr, "add_jpg_compression", lambda img, quality: qualities.append(quality) or img)
    for _ in range(N_DRAWS):
        bsr.random_add_jpg_compression(tiny, cfg.jpeg_range)
    monkeypatch.undo()

    degrader = Degrader(cfg, seed=0)
    ours = [degrader.sample(f"{i:05d}") for i in range(N_DRAWS)]
    assert _ks_same([p["noise_sigma"] for p in ours], sigmas) > KS_ALPHA
    assert _ks_same([p["jpeg_quality_raw"] for p in ours], qualities) > KS_ALPHA
    # The quality OpenCV receives: int(q), as ReF-LDM passes it.
    assert all(p["jpeg_quality"] == int(p["jpeg_quality_raw"]) for p in ours)
    lo, hi = cfg.downsample_range
    assert stats.kstest([p["scale"] for p in ours], stats.uniform(lo, hi - lo).cdf).pvalue > KS_ALPHA


def test_gray_noise_and_jitter_paths_match_basicsr(bsr, images):
    cfg = get_preset("gfpgan-train", gray_noise_prob=1.0, color_jitter_prob=1.0, gray_prob=0.5)
    degrader = Degrader(cfg, seed=3)
    seen_gray = False
    for i in range(6):
        img = images[i % len(images)]
        prepared, _ = prepare_input(img, cfg)
        lq, params = degrader.degrade(img, f"g{i}")
        assert params["noise_gray"] and params["color_jitter"] is not None
        seen_gray |= params["gray"]
        np.testing.assert_array_equal(
            apply_params(prepared, params, fast=False), basicsr_degrade(bsr, prepared, params)
        )
        assert ops.psnr(lq, basicsr_degrade(bsr, prepared, params)) >= 45.0
    assert seen_gray


@pytest.mark.parametrize("gray", [False, True])
def test_poisson_noise_matches_basicsr(bsr, monkeypatch, gray):
    img = np.random.default_rng(0).random((40, 30, 3)).astype(np.float32)
    ours = ops.poisson_noise(img, 0.7, gray, ops.noise_rng(5))
    rng = ops.noise_rng(5)
    monkeypatch.setattr(bsr.np.random, "poisson", lambda lam: rng.poisson(lam))
    theirs = bsr.generate_poisson_noise(img, 0.7, gray)
    np.testing.assert_array_equal(ours, theirs)
