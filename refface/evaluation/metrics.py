"""The refface protocol's metrics without a network: PSNR, SSIM, NIQE (BasicSR's form) and the Fréchet
distance of two feature sets (numpy, scipy and OpenCV; no torch, so the Reface-HQ builder scores crops
with NIQE in the core install)."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

from refface.evaluation.imresize import imresize
from refface.evaluation.weights import WEIGHT_SOURCES


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 RGB images: 11x11 Gaussian (σ 1.5) per channel, averaged (BasicSR's form)."""
    import cv2

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx = cv2.filter2D(x, -1, window)[5:-5, 5:-5]
        my = cv2.filter2D(y, -1, window)[5:-5, 5:-5]
        sxx = cv2.filter2D(x * x, -1, window)[5:-5, 5:-5] - mx**2
        syy = cv2.filter2D(y * y, -1, window)[5:-5, 5:-5] - my**2
        sxy = cv2.filter2D(x * y, -1, window)[5:-5, 5:-5] - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx**2 + my**2 + c1) * (sxx + syy + c2)
        values.append(float(np.mean(num / den)))
    return float(np.mean(values))


@functools.lru_cache(maxsize=1)
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import gamma

    gam = np.arange(0.2, 10.001, 0.001)
    return gam, np.square(gamma(2 / gam)) / (gamma(1 / gam) * gamma(3 / gam))


def _aggd(block: np.ndarray) -> tuple[float, float, float]:
    from scipy.special import gamma

    block = block.flatten()
    gam, r_gam = _aggd_table()
    left = np.sqrt(np.mean(block[block < 0] ** 2)) if np.any(block < 0) else 1e-8
    right = np.sqrt(np.mean(block[block > 0] ** 2)) if np.any(block > 0) else 1e-8
    gammahat = left / right
    rhat = np.mean(np.abs(block)) ** 2 / max(np.mean(block**2), 1e-12)
    rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / ((gammahat**2 + 1) ** 2)
    alpha = gam[np.argmin((r_gam - rhatnorm) ** 2)]
    scale = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return float(alpha), float(left * scale), float(right * scale)


def _niqe_block_features(block: np.ndarray) -> list[float]:
    from scipy.special import gamma

    alpha, bl, br = _aggd(block)
    feat = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = (br - bl) * (gamma(2 / alpha) / gamma(1 / alpha))
        feat += [alpha, mean, bl, br]
    return feat


def _gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _y_channel(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in [16, 235], as MATLAB's rgb2ycbcr (what NIQE's pristine model was fit on)."""
    x = rgb.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def niqe_features(rgb: np.ndarray, block: int = 96, window: np.ndarray | None = None) -> np.ndarray:
    """NIQE patch features ``(patches, 36)`` of one uint8 RGB image at two scales (BasicSR's form)."""
    from scipy.ndimage import convolve

    window = _gaussian_window() if window is None else window
    img = _y_channel(rgb).round()
    nh, nw = img.shape[0] // block, img.shape[1] // block
    if nh == 0 or nw == 0:
        raise ValueError(
            f"NIQE needs images of at least {block}x{block} pixels, got {img.shape[1]}x{img.shape[0]}"
        )
    img = img[: nh * block, : nw * block]
    per_scale = []
    for scale in (1, 2):
        mu = convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(img * img, window, mode="nearest") - mu * mu))
        norm = (img - mu) / (sigma + 1)
        size = block // scale
        feats = [
            _niqe_block_features(norm[i * size : (i + 1) * size, j * size : (j + 1) * size])
            for j in range(nw)
            for i in range(nh)
        ]
        per_scale.append(np.array(feats))
        if scale == 1:
            img = imresize(img / 255.0, 0.5) * 255.0
    return np.concatenate(per_scale, axis=1)


def niqe(rgb: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """NIQE of one uint8 RGB image given the pristine model (``mu``, ``cov``, optional ``window``)."""
    feats = niqe_features(rgb, window=params.get("window"))
    mu = np.nanmean(feats, axis=0)
    clean = feats[~np.isnan(feats).any(axis=1)]
    cov = np.cov(clean, rowvar=False) if len(clean) > 1 else np.zeros((feats.shape[1],) * 2)
    diff = params["mu"] - mu
    inv = np.linalg.pinv((params["cov"] + cov) / 2)
    return float(np.sqrt(max(diff @ inv @ diff, 0.0)))


def fit_niqe_params(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A pristine NIQE model (mean and covariance of patch features) fit on clean uint8 RGB images."""
    feats = np.concatenate([niqe_features(im) for im in images])
    feats = feats[~np.isnan(feats).any(axis=1)]
    return {"mu": feats.mean(axis=0), "cov": np.cov(feats, rowvar=False), "window": _gaussian_window()}


def load_niqe_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read BasicSR's ``niqe_pris_params.npz`` or pyiqa's ``.mat`` pristine model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"NIQE pristine model not found: {path}; place {WEIGHT_SOURCES['niqe_params']} there"
        )
    if path.suffix == ".mat":
        from scipy.io import loadmat

        m = loadmat(str(path))
        return {
            "mu": np.ravel(m["mu_prisparam"]),
            "cov": np.asarray(m["cov_prisparam"]),
            "window": _gaussian_window(),
        }
    z = np.load(path)
    window = z["gaussian_window"] if "gaussian_window" in z else _gaussian_window()
    return {"mu": np.ravel(z["mu_pris_param"]), "cov": np.asarray(z["cov_pris_param"]), "window": window}


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fit to two feature sets ``(N, D)`` (the FID statistic)."""
    from scipy import linalg

    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Near-singular products (few images): regularize as pytorch-fid does.
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), 0.0))
