"""MATLAB ``imresize`` (bicubic, antialiased when shrinking) on float arrays, one axis at a time."""

from __future__ import annotations

import math

import numpy as np


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def contributions(in_len: int, out_len: int, scale: float, antialias: bool = True):
    """Source indices ``(out_len, P)`` and weights ``(out_len, P)`` of each output sample.

    Output sample ``i`` (1-based) sits at input coordinate ``i / scale + 0.5 (1 - 1 / scale)``; when
    shrinking with antialiasing the kernel is stretched by ``1 / scale`` (and scaled by ``scale``). Taps
    that fall outside the signal are mirrored back in (MATLAB's symmetric boundary), each row of weights
    sums to one, and taps whose weight is zero in every row are dropped.
    """
    width = 4.0
    if scale < 1 and antialias:
        width = width / scale

        def kernel(x):
            return scale * cubic(scale * x)
    else:
        kernel = cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    weights = kernel(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    return indices[:, keep], weights[:, keep]


def _resize_axis(img: np.ndarray, axis: int, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    idx, w = contributions(img.shape[axis], out_len, scale, antialias)
    moved = np.moveaxis(img, axis, 0)  # (L, ...)
    gathered = moved[idx]  # (out_len, P, ...)
    w = w.reshape(w.shape + (1,) * (moved.ndim - 1))
    return np.moveaxis((gathered * w).sum(axis=1), 0, axis)


def imresize(img: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """Resize a float ``(H, W)`` or ``(H, W, C)`` array by ``scale`` as MATLAB's ``imresize`` does.

    The output side is ``ceil(side * scale)``; rows are resized before columns (MATLAB's order for equal
    scales). No clipping or rounding: MATLAB keeps double inputs unclipped.
    """
    out = np.asarray(img, dtype=np.float64)
    for axis in (0, 1):
        out_len = math.ceil(out.shape[axis] * scale)
        out = _resize_axis(out, axis, out_len, scale, antialias)
    return out
