"""NIQE (Mittal et al. 2012) as pyiqa's ``niqe`` computes it, with the published pristine model as data.

Pipeline: Y of YIQ rounded to levels; crop to whole 96x96 blocks; at two scales (the second from MATLAB's
antialiased bicubic ``imresize`` by 0.5) the image is normalized by a 7x7 Gaussian local mean and
deviation (replicated borders), and each block gives 18 AGGD features; the image's feature Gaussian is
compared with the pristine one by ``sqrt(d' pinv((Σp + Σd) / 2) d)``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from refface.evaluation.imresize import imresize
from refface.evaluation.iqa import gaussian_window, yiq_luma

BLOCK = 96
# The NIQE release's pristine model (``modelparameters.mat``: 36 means and a 36x36 covariance), as
# redistributed by BasicSR (``niqe_pris_params.npz``) and loaded by pyiqa (``niqe_modelparameters.mat``).
DEFAULT_PARAMS = Path(__file__).parent / "data" / "niqe_modelparameters.npz"
SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@functools.lru_cache(maxsize=1)
def _gamma_grid() -> tuple[np.ndarray, np.ndarray]:
    import torch
    from scipy.special import gammaln

    # pyiqa's search grid is a float32 arange; the ratio is then evaluated in float64.
    gam = torch.arange(0.2, 10 + 0.001, 0.001).double().numpy()
    return gam, np.exp(2 * gammaln(2.0 / gam) - (gammaln(1.0 / gam) + gammaln(3.0 / gam)))


def aggd(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric generalized Gaussian fit of each block ``(N, h, w)``: ``alpha, beta_l, beta_r``.

    A block with no negative (or positive) value gets NaN parameters; NIQE drops those blocks.
    """
    from scipy.special import gammaln

    gam, r_gam = _gamma_grid()
    flat = blocks.reshape(len(blocks), -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.sqrt((np.where(flat < 0, flat, 0) ** 2).sum(1) / (flat < 0).sum(1))
        right = np.sqrt((np.where(flat > 0, flat, 0) ** 2).sum(1) / (flat > 0).sum(1))
        gammahat = left / right
        rhat = np.abs(flat).mean(1) ** 2 / (flat**2).mean(1)
        rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
    dist = np.abs(r_gam[None, :] - rhatnorm[:, None])
    # NaN rows pick the first grid point, as torch.argmin does; their betas stay NaN.
    pos = np.where(np.isnan(rhatnorm), 0, np.argmin(np.nan_to_num(dist, nan=np.inf), axis=1))
    alpha = gam[pos]
    factor = np.sqrt(np.exp(gammaln(1 / alpha) - gammaln(3 / alpha)))
    return alpha, left * factor, right * factor


def block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of each normalized block ``(N, h, w)`` -> ``(N, 18)``."""
    from scipy.special import gammaln

    alpha, bl, br = aggd(blocks)
    feats = [alpha, (bl + br) / 2]
    for shift in SHIFTS:
        # Neighbour products wrap around inside the block, as pyiqa's torch.roll does.
        alpha, bl, br = aggd(blocks * np.roll(blocks, shift, axis=(1, 2)))
        mean = (br - bl) * np.exp(gammaln(2 / alpha) - gammaln(1 / alpha))
        feats += [alpha, mean, bl, br]
    return np.stack(feats, axis=1)


def _blocks(img: np.ndarray, size: int) -> np.ndarray:
    nh, nw = img.shape[0] // size, img.shape[1] // size
    return (
        img[: nh * size, : nw * size]
        .reshape(nh, size, nw, size)
        .transpose(0, 2, 1, 3)
        .reshape(-1, size, size)
    )


def _normalize(img: np.ndarray) -> np.ndarray:
    from scipy.ndimage import correlate

    window = gaussian_window(7, 7.0 / 6.0)
    mu = correlate(img, window, mode="nearest")
    var = correlate(img * img, window, mode="nearest") - mu * mu
    sigma = np.sqrt(np.abs(var) + np.finfo(np.float64).eps)
    return (img - mu) / (sigma + 1.0)


def niqe_features(luma: np.ndarray) -> np.ndarray:
    """``(blocks, 36)`` features of a luma image in 0-255 levels (18 at full scale, 18 at half)."""
    nh, nw = luma.shape[0] // BLOCK, luma.shape[1] // BLOCK
    if nh == 0 or nw == 0:
        raise ValueError(f"NIQE needs at least {BLOCK}x{BLOCK} pixels, got {luma.shape[1]}x{luma.shape[0]}")
    img = luma[: nh * BLOCK, : nw * BLOCK]
    full = block_features(_blocks(_normalize(img), BLOCK))
    half_img = imresize(img / 255.0, 0.5) * 255.0
    half = block_features(_blocks(_normalize(half_img), BLOCK // 2))
    return np.concatenate([full, half], axis=1)


def niqe_score(luma: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """NIQE of a luma image given the pristine model ``{'mu': (36,), 'cov': (36, 36)}``."""
    feats = niqe_features(luma)
    mu = np.nanmean(feats, axis=0)
    clean = feats[~np.isnan(feats).any(axis=1)]
    cov = np.cov(clean, rowvar=False, ddof=1 if len(clean) > 1 else 0)
    matrix = (params["cov"] + cov) / 2
    inv = np.linalg.pinv(matrix, rcond=max(matrix.shape) * np.finfo(np.float64).eps)
    diff = params["mu"] - mu
    return float(np.sqrt(diff @ inv @ diff))


def niqe(rgb: np.ndarray, params: dict[str, np.ndarray] | None = None) -> float:
    """pyiqa ``niqe`` of a uint8 RGB image (the shipped pristine model unless ``params`` is given)."""
    return niqe_score(yiq_luma(rgb), params or load_params())


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"NIQE pristine model not found: {p}")
    if p.suffix == ".mat":
        from scipy.io import loadmat

        data = loadmat(str(p))
        return {
            "mu": np.ravel(data["mu_prisparam"]).astype(np.float64),
            "cov": np.asarray(data["cov_prisparam"], np.float64),
        }
    data = np.load(p)
    mu_key = "mu_prisparam" if "mu_prisparam" in data else "mu_pris_param"
    cov_key = "cov_prisparam" if "cov_prisparam" in data else "cov_pris_param"
    return {"mu": np.ravel(data[mu_key]).astype(np.float64), "cov": np.asarray(data[cov_key], np.float64)}


def load_params(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The pristine model: the shipped one, or a NIQE ``modelparameters.mat`` / BasicSR ``.npz``."""
    return _load(str(path or DEFAULT_PARAMS))
