"""PSNR, SSIM and the luma they and NIQE read, as pyiqa defines them (the ReF-LDM evaluation's metrics).

Inputs are uint8 RGB arrays; like ``scripts/eval.py`` (which hands pyiqa float32 tensors in [0, 1]) the
colour conversion runs in float32 before the luma is rounded to integer levels, so the rounding lands
on the same side as in pyiqa.
"""

from __future__ import annotations

import functools

import numpy as np

# RGB -> YIQ (NTSC); only its first row, the luma, is used.
YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


def unit_float(rgb: np.ndarray):
    """``(1, 3, H, W)`` float32 tensor in [0, 1] from a uint8 ``(H, W, 3)`` array (eval.py's read_image)."""
    import torch

    return torch.from_numpy(rgb.astype(np.float32).transpose(2, 0, 1)[None].copy()) / 255.0


def yiq_luma(rgb: np.ndarray) -> np.ndarray:
    """Y of YIQ in 0-255 levels, rounded, as float64 ``(H, W)`` (pyiqa ``to_y_channel(x, 255, 'yiq')``)."""
    import torch

    x = unit_float(rgb)  # (1, 3, H, W) float32
    weights = torch.tensor(YIQ, dtype=torch.float32).t()
    y = torch.matmul(x.permute(0, 2, 3, 1), weights)[..., 0] * 255.0  # float32, as pyiqa
    return y.round()[0].double().numpy()


@functools.lru_cache(maxsize=8)
def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)``, stored as float32 the way pyiqa keeps it."""
    half = (size - 1) / 2
    y, x = np.ogrid[-half : half + 1, -half : half + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    h = h / h.sum()
    return h.astype(np.float32).astype(np.float64)


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """pyiqa ``psnr`` (RGB, data range 1, eps 1e-8, float32): identical images give 80 dB, not inf."""
    import torch

    x, y = unit_float(pred), unit_float(gt)
    mse = torch.mean((x - y) ** 2, dim=[1, 2, 3])
    return float(10 * torch.log10(1.0 / (mse + 1e-8)))


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """pyiqa ``ssim``: Y of YIQ rounded to levels, 11x11 Gaussian (σ 1.5) 'valid' window, no
    downsampling, the contrast-structure term clamped at 0, mean over the map (float64)."""
    from scipy.ndimage import correlate

    if pred.shape != gt.shape:
        raise ValueError(f"SSIM needs equal sizes, got {pred.shape} and {gt.shape}")
    x, y = yiq_luma(pred), yiq_luma(gt)
    win = gaussian_window(11, 1.5)

    def valid(a: np.ndarray) -> np.ndarray:
        # 'valid' correlation: the centred filter's output without the 5-pixel rim.
        return correlate(a, win, mode="constant")[5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = valid(x), valid(y)
    sxx = valid(x * x) - mx**2
    syy = valid(y * y) - my**2
    sxy = valid(x * y) - mx * my
    cs = np.maximum((2 * sxy + c2) / (sxx + syy + c2), 0.0)
    return float(np.mean(((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * cs))
