"""FID as pyiqa / clean-fid compute it in "clean" mode, against a set's own features or reference stats.

Per image: decode to RGB, resize each channel as a float image with PIL's bicubic filter to 299x299
(clean-fid's antialiased resize; no uint8 rounding), clip to [0, 255], scale by ``(x - 128) / 128``, run
the FID Inception to its 2048-d pool features. Per set: mean and covariance; the distance is
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` with clean-fid's fallback for a singular product.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from refface.evaluation.inception import FID_WEIGHTS_FILE, FIDInceptionV3

INPUT_SIZE = 299
# clean-fid's reference statistics, the ones ReF-LDM's eval.py compares against.
FFHQ_STATS_FILE = "ffhq_clean_trainval70k_512.npz"


def clean_resize(rgb: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """``(size, size, 3)`` float32: each channel PIL-bicubic-resized in float ('F') mode, clipped."""
    from PIL import Image

    channels = []
    for c in range(3):
        img = Image.fromarray(rgb[..., c].astype(np.float32), mode="F")
        channels.append(np.asarray(img.resize((size, size), resample=Image.Resampling.BICUBIC)).clip(0, 255))
    return np.stack(channels, axis=2).astype(np.float32)


class TorchScriptInception:
    """clean-fid's TorchScript FID Inception (``inception-2015-12-05.pt``) run on pre-resized inputs."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, x):
        # The inner ``layers`` take the (x - 128) / 128 input at 299 px, skipping the model's own resize.
        return self.model.layers.forward(x).reshape(x.shape[0], -1)


def load_feature_network(path: str | os.PathLike):
    """pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or clean-fid's TorchScript ``.pt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found: {path}; place pytorch-fid's '{FID_WEIGHTS_FILE}' (what pyiqa "
            "uses) or clean-fid's TorchScript 'inception-2015-12-05.pt' there"
        )
    if path.suffix == ".pt":
        return TorchScriptInception(path)
    return FIDInceptionV3.from_file(path)


def image_features(images, network, batch_size: int = 8) -> np.ndarray:
    """``(N, D)`` float64 features of uint8 RGB arrays (any size) through the clean-mode input path."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = np.stack([clean_resize(im) for im in images[start : start + batch_size]])
            x = (torch.from_numpy(batch).permute(0, 3, 1, 2) - 128) / 128
            out.append(np.asarray(network(x), dtype=np.float64).reshape(len(batch), -1))
    return np.concatenate(out) if out else np.zeros((0, 0))


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set."""
    if len(feats) < 2:
        raise ValueError("FID needs at least 2 images")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` and ``sigma`` of a clean-fid / pyiqa statistics ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID reference statistics not found: {path}; place clean-fid's '{FFHQ_STATS_FILE}' (FFHQ "
            "trainval70k at 512, clean mode, as pyiqa downloads it) there, or use the GT-set FID"
        )
    data = np.load(path)
    if "mu" not in data or "sigma" not in data:
        raise ValueError(f"{path} has no 'mu' / 'sigma' arrays (clean-fid statistics expected)")
    return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians; a non-finite ``sqrtm`` retries with ``eps`` on the diagonals."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape} (wrong statistics file?)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
