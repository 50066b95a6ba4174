"""Degradation ops on float BGR images in [0, 1], in BasicSR's semantics, plus the fused blur+downsample.

The reference ops (:func:`blur`, :func:`resize_linear`, ...) make the same OpenCV calls as
BasicSR / GFPGAN. :func:`blur_downsample` computes the same blurred-then-downsampled image
without blurring every pixel: INTER_LINEAR reads at most two source rows and columns per output
pixel, so the blur is folded into the resize weights (separable low-rank pieces of the kernel,
band-limited matrix products), within an error bound in grey levels fixed by construction.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Worst-case error of the fused blur+downsample, in 0-255 grey levels (bound, not average).
DEFAULT_TOLERANCE = 0.02
# Sustained single-core float32 matrix-product rate used to choose between fused and direct blur.
FUSED_MACS_PER_SECOND = 17e9


# ----------------------------------------------------------------------------- reference ops
def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.filter2D(img, -1, kernel)``: correlation with reflect-101 borders, as BasicSR blurs."""
    return cv2.filter2D(img, -1, kernel)


def lq_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``(int(w // r), int(h // r))`` as GFPGAN / ReF-LDM compute it, never below one pixel."""
    return max(1, int(width // scale)), max(1, int(height // scale))


def resize_linear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.resize`` with INTER_LINEAR to ``size = (width, height)``."""
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)


def noise_rng(seed: int) -> np.random.Generator:
    """The generator of a recorded ``noise_seed`` (SFC64: the fastest of NumPy's bit generators)."""
    return np.random.Generator(np.random.SFC64(seed))


def bgr_rgb(img: np.ndarray) -> np.ndarray:
    """Swap the first and third channels (BGR ↔ RGB) into a new contiguous array."""
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2RGB)


def gaussian_noise(shape: tuple[int, ...], sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, σ in 0-255 units; gray noise is one field shared by the channels."""
    if gray:
        noise = rng.standard_normal(shape[:2], dtype=np.float32) * sigma / 255.0
        return np.repeat(noise[:, :, None], shape[2], axis=2)
    return rng.standard_normal(shape, dtype=np.float32) * sigma / 255.0


def add_noise(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``clip(img + noise, 0, 1)`` (BasicSR's ``clip=True, rounds=False``)."""
    return np.clip(img + noise, 0, 1)


def poisson_noise(img: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Poisson (shot) noise as BasicSR's ``generate_poisson_noise`` (float BGR input)."""
    if gray:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    img = np.clip((img * 255.0).round(), 0, 255) / 255.0
    vals = len(np.unique(img))
    vals = 2 ** np.ceil(np.log2(vals))
    out = np.float32(rng.poisson(img * vals) / float(vals))
    noise = out - img
    if gray:
        noise = np.repeat(noise[:, :, np.newaxis], 3, axis=2)
    return noise * scale


_U8_TO_UNIT = (np.arange(256, dtype=np.float32) / np.float32(255.0)).reshape(1, 256)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip through OpenCV with integer ``quality`` (BasicSR's ``add_jpg_compression``).

    The float→8-bit conversion OpenCV's encoder does implicitly (round half to even, saturate)
    is done here explicitly with the same rounding, and the decoded bytes map back through a
    table holding exactly ``float32(v) / 255``.
    """
    if float(img.min()) < 0:  # OpenCV's conversion takes absolute values; BasicSR clips at 0
        img = np.maximum(img, 0)
    u8 = cv2.convertScaleAbs(img, alpha=255.0)
    ok, enc = cv2.imencode(".jpg", u8, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {u8.shape}")
    return cv2.LUT(cv2.imdecode(enc, cv2.IMREAD_COLOR), _U8_TO_UNIT)


def color_jitter(img: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """GFPGAN's colour jitter: add a per-channel shift (BGR order, [0, 1] units), then clip."""
    return np.clip(img + np.asarray(shift, dtype=np.float32), 0, 1)


def to_gray(img: np.ndarray, rgb: bool = False) -> np.ndarray:
    """BGR (or RGB) → gray, repeated on three channels (GFPGAN's ``gray_prob``)."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY if rgb else cv2.COLOR_BGR2GRAY)
    return cv2.merge([gray, gray, gray])


def round_clip_u8(img: np.ndarray) -> np.ndarray:
    """Round half to even and clip to 8 bits, as ``clip((x * 255).round(), 0, 255)`` does.

    OpenCV's saturating conversion rounds half to even too and is several times faster; it takes
    absolute values, so inputs with negatives go through NumPy.
    """
    if img.dtype in (np.float32, np.float64) and img.ndim == 3 and float(img.min()) >= 0:
        return cv2.convertScaleAbs(img, alpha=255.0)
    return np.clip((img * 255.0).round(), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------- fused blur + downsample
def reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 index mapping (``gfedcb|abcdefgh|gfedcba``), any distance."""
    idx = np.asarray(idx, dtype=np.int64).copy()
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source taps and weights of ``cv2.resize`` INTER_LINEAR along one axis.

    Returns ``(s0, s1, w1)``: output ``o`` reads ``(1 - w1) * src[s0] + w1 * src[s1]``, from the
    coordinate ``(o + 0.5) * scale - 0.5`` in double precision (as OpenCV 5 computes it) with the
    same clamping at the borders.
    """
    scale = 1.0 / (n_out / n_in)
    fx = (np.arange(n_out) + 0.5) * scale - 0.5
    sx = np.floor(fx).astype(np.int64)
    w1 = fx - sx
    low = sx < 0
    w1[low], sx[low] = 0.0, 0
    high = sx >= n_in - 1
    w1[high], sx[high] = 0.0, n_in - 1
    s1 = np.minimum(sx + 1, n_in - 1)
    return sx, s1, w1


def _band_blocks(
    n_in: int, n_out: int, taps: np.ndarray, center: int, block: int
) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Weights of ``Resize · Correlate(taps_k)`` along one axis, as dense blocks of output rows.

    ``taps`` is (R, L): 1-D filters applied with reflect-101 borders before the INTER_LINEAR
    resize. Each block ``(o0, o1, lo, hi, W)`` holds ``W`` (R, o1 - o0, hi - lo) float32 covering
    the contiguous input window ``[lo, hi)`` that outputs ``o0 .. o1 - 1`` read.
    """
    s0, s1, w1 = linear_taps(n_in, n_out)
    n_rank, length = taps.shape
    offsets = np.arange(length) - center
    cols = np.concatenate(
        [reflect101(s0[:, None] + offsets[None, :], n_in), reflect101(s1[:, None] + offsets[None, :], n_in)],
        axis=1,
    )  # (n_out, 2L)
    weights = np.concatenate(
        [(1.0 - w1)[None, :, None] * taps[:, None, :], w1[None, :, None] * taps[:, None, :]], axis=2
    )  # (R, n_out, 2L)
    # One bincount for every block: all windows get the widest block's width (shifted to stay
    # inside the input), so the weights form a single (blocks, R, block, window) array.
    n_blocks = -(-n_out // block)
    rows = np.arange(n_out)
    block_of, row_in_block = rows // block, rows % block
    starts = np.arange(n_blocks) * block
    lo = np.minimum.reduceat(cols.min(axis=1), starts)
    hi = np.maximum.reduceat(cols.max(axis=1), starts) + 1
    win = int((hi - lo).max())
    lo = np.minimum(lo, n_in - win)
    base = block_of * (n_rank * block * win) + row_in_block * win  # (n_out,)
    idx = (
        base[None, :, None]
        + np.arange(n_rank)[:, None, None] * (block * win)
        + (cols - lo[block_of, None])[None]
    )
    w = np.bincount(idx.ravel(), weights=weights.ravel(), minlength=n_blocks * n_rank * block * win)
    w = w.reshape(n_blocks, n_rank, block, win).astype(np.float32)
    blocks = []
    for j in range(n_blocks):
        o0, o1 = int(starts[j]), min(n_out, int(starts[j]) + block)
        blocks.append((o0, o1, int(lo[j]), int(lo[j]) + win, w[j, :, : o1 - o0]))
    return blocks


def _block_size(length: int, scale: float) -> int:
    # Each output reads about ``length + 1`` inputs; a block of b outputs spans ``b * scale + length``.
    # b * scale ≈ length / 2 keeps two thirds of every product useful while the products stay large
    # enough for BLAS (measured best among length / {1, 2, 3, 4}).
    return max(2, int(round(max(length, 8) / 2 / max(scale, 1.0))))


def fused_cost(shape: tuple[int, int, int], size: tuple[int, int], rank: int, length: int) -> float:
    """Approximate multiply-adds of :func:`blur_downsample`'s fused path."""
    h, w, ch = shape
    out_w, out_h = size
    sy, sx = h / out_h, w / out_w
    by, bx = _block_size(length, sy), _block_size(length, sx)
    stage1 = rank * out_h * (by * sy + length) * w * ch
    stage2 = rank * out_w * (bx * sx + length) * out_h * ch
    return float(stage1 + stage2)


def direct_cost_seconds(shape: tuple[int, int, int], length: int) -> float:
    """Rough time of blurring every pixel: an FFT for large kernels, OpenCV's direct filter below 11×11."""
    h, w, ch = shape
    if length >= 11:
        return 0.008 * (h * w * ch) / (512 * 512 * 3)
    return length * length * h * w * ch / 6e9


def fft_blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``blur(float32(img) / 255, kernel)`` through a real FFT (reflect-101 borders), float32 (H, W, C).

    Single-precision transforms keep the error near 1e-4 grey levels, well inside the budget.
    """
    from scipy import fft

    h, w, ch = img.shape
    length = kernel.shape[0]
    pad = length // 2
    padded = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    planes = np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)
    n0 = fft.next_fast_len(h + 2 * pad, real=True)
    n1 = fft.next_fast_len(w + 2 * pad, real=True)
    # Circular convolution with the flipped kernel is the correlation filter2D computes; output
    # (i, j) sits at (i + L - 1, j + L - 1), before any wrap-around can reach it.
    flipped = np.zeros((n0, n1), dtype=np.float32)
    flipped[:length, :length] = kernel[::-1, ::-1] / 255.0
    spectrum = fft.rfft2(planes, s=(n0, n1), workers=1) * fft.rfft2(flipped, workers=1)
    out = fft.irfft2(spectrum, s=(n0, n1), workers=1)[
        :, length - 1 : length - 1 + h, length - 1 : length - 1 + w
    ]
    return cv2.merge([np.ascontiguousarray(plane, dtype=np.float32) for plane in out])


def separable_pieces(kernel: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Split ``kernel`` into ``Σ_k p_k q_kᵀ`` on a trimmed support, within ``tolerance`` (sum of |error|).

    Returns ``(p, q, center)``: vertical filters (R, L), horizontal filters (R, L) and the index of
    the kernel centre inside the trimmed support. Half the budget trims outer rings whose mass is
    negligible (small σ), the rest bounds the separable approximation: exact centre column ⊗ row
    for separable kernels (every isotropic Gaussian), else the shortest truncated SVD that fits.
    """
    size = kernel.shape[0]
    c = size // 2
    absk = np.abs(kernel)
    total = absk.sum()
    radius = c
    while radius > 0:
        inner = absk[c - radius + 1 : c + radius, c - radius + 1 : c + radius].sum()
        if total - inner > tolerance / 2:
            break
        radius -= 1
    sub = kernel[c - radius : c + radius + 1, c - radius : c + radius + 1]
    budget = tolerance - (total - np.abs(sub).sum())
    if sub[radius, radius] > 0:
        p1, q1 = sub[:, radius] / sub[radius, radius], sub[radius, :]
        if np.abs(sub - np.outer(p1, q1)).sum() <= budget:
            return p1[None, :].copy(), q1[None, :].copy(), radius
    u, s, vt = np.linalg.svd(sub)
    rank = len(s)
    approx = np.zeros_like(sub)
    for k in range(len(s)):
        approx += s[k] * np.outer(u[:, k], vt[k])
        if np.abs(sub - approx).sum() <= budget:
            rank = k + 1
            break
    p = (u[:, :rank] * s[:rank]).T.copy()
    q = vt[:rank].copy()
    return p, q, radius


def blur_downsample(
    img: np.ndarray, kernel: np.ndarray, size: tuple[int, int], tolerance: float = DEFAULT_TOLERANCE
) -> np.ndarray:
    """``resize_linear(blur(float32(img) / 255, kernel), size)`` for a uint8 image, blurring only where read.

    The kernel is trimmed and split into separable pieces within ``tolerance``; when the fused
    products would cost more than blurring the whole image with the trimmed kernel (FFT, or
    OpenCV's direct filter for small kernels), that is done instead.
    Either way the result is within ``tolerance`` grey levels of the unfused computation.

    Args:
        img: (H, W, C) uint8 (or float in 0-255 units).
        kernel: (K, K) blur kernel, K odd.
        size: output ``(width, height)``.
        tolerance: worst-case absolute error allowed, in 0-255 grey levels.

    Returns:
        (height, width, C) float32 in [0, 1] units, channel order as the input.
    """
    h, w, ch = img.shape
    out_w, out_h = size
    p, q, center = separable_pieces(kernel, tolerance / 255.0)
    n_rank, length = p.shape
    fused_s = fused_cost(img.shape, size, n_rank, length) / FUSED_MACS_PER_SECOND
    if min(h, w) < length or fused_s > direct_cost_seconds(img.shape, length):
        sub = kernel[kernel.shape[0] // 2 - center :, kernel.shape[1] // 2 - center :][:length, :length]
        if length >= 11 and min(h, w) >= length:
            return resize_linear(fft_blur(img, sub), size)
        return reference_blur_downsample(img, sub, size)
    planes = [img[:, :, c].astype(np.float32) for c in range(ch)]
    # Stage 1, rows, per channel plane: the 1/255 of the uint8 → [0, 1] conversion is folded into
    # the vertical filters. y[k, c] holds piece k's vertically filtered and resized rows.
    y = np.empty((n_rank, ch, out_h, w), dtype=np.float32)
    for o0, o1, lo, hi, wv in _band_blocks(h, out_h, p / 255.0, center, _block_size(length, h / out_h)):
        a = wv.reshape(n_rank * (o1 - o0), hi - lo)
        for c in range(ch):
            y[:, c, o0:o1] = (a @ planes[c][lo:hi]).reshape(n_rank, o1 - o0, w)
    # Stage 2, columns: rows (channel, output row) of each piece's column band form one strided
    # matrix, so every product reads y in place; the pieces are summed into the block's result.
    res = np.empty((ch, out_h, out_w), dtype=np.float32)
    for o0, o1, lo, hi, wh in _band_blocks(w, out_w, q, center, _block_size(length, w / out_w)):
        acc = y[0, :, :, lo:hi].reshape(ch * out_h, hi - lo) @ wh[0].T
        for k in range(1, n_rank):
            acc += y[k, :, :, lo:hi].reshape(ch * out_h, hi - lo) @ wh[k].T
        res[:, :, o0:o1] = acc.reshape(ch, out_h, o1 - o0)
    return cv2.merge(list(res))


def reference_blur_downsample(img: np.ndarray, kernel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The unfused path: ``float32(img) / 255`` → ``cv2.filter2D`` → ``cv2.resize`` INTER_LINEAR."""
    x = img.astype(np.float32) / 255.0
    return resize_linear(blur(x, kernel), size)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two images of the same shape (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
