"""Degradation ops on float BGR images in [0, 1], in BasicSR's semantics, plus the fast blur+downsample.

The reference ops (:func:`blur`, :func:`resize_linear`, ...) make the same OpenCV calls as
BasicSR / GFPGAN. :func:`blur_downsample` computes the same blurred-then-downsampled image
within an error bound in grey levels fixed by construction, by the cheapest of three routes:
fused products that blur only where INTER_LINEAR reads (it reads at most two source rows and
columns per output pixel, so the blur folds into the resize weights), whole-image separable
passes, or a whole-image DFT blur.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Worst-case error of the fused blur+downsample, in 0-255 grey levels (bound, not average).
DEFAULT_TOLERANCE = 0.02
# Fixed cost constants (single core, measured once) that choose among the fused products, whole-image
# separable passes and the DFT. The choice depends on shapes only, never on timing, so the bytes
# of an LQ image are the same whatever the machine load.
FUSED_MACS_PER_SECOND = 20e9
FUSED_OVERHEAD_SECONDS = 0.7e-3
SEPARABLE_MACS_PER_SECOND = 16e9
SEPARABLE_OVERHEAD_SECONDS = 1e-4
FFT_SECONDS_PER_SAMPLE = 5.0e-3 / (576 * 576 * 3)


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
    # In place, the same float32 operations as ``field * sigma / 255.0`` without two temporaries.
    field = rng.standard_normal(shape[:2] if gray else shape, dtype=np.float32)
    field *= sigma
    field /= 255.0
    if gray:
        return np.repeat(field[:, :, None], shape[2], axis=2)
    return field


def add_noise(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``clip(img + noise, 0, 1)`` (BasicSR's ``clip=True, rounds=False``)."""
    out = img + noise
    return np.clip(out, 0, 1, out=out)


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
    decoded = cv2.imdecode(enc, cv2.IMREAD_COLOR)
    if decoded is None:
        raise RuntimeError(f"OpenCV could not decode its own JPEG of an image of shape {u8.shape}")
    return cv2.LUT(decoded, _U8_TO_UNIT)


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
    # Interior outputs read 2 adjacent taps with no border folding: their weights over the window
    # are the L + 1 taps (1 - w1)·t[j] + w1·t[j - 1], written directly. Outputs near the borders
    # (reflected or clamped) accumulate their folded weights with bincount.
    interior = (s1 == s0 + 1) & (s0 - center >= 0) & (s1 + (length - 1 - center) <= n_in - 1)
    edge = np.flatnonzero(~interior)
    offsets = np.arange(length) - center
    cols = np.concatenate(
        [
            reflect101(s0[edge, None] + offsets[None, :], n_in),
            reflect101(s1[edge, None] + offsets[None, :], n_in),
        ],
        axis=1,
    )  # (edge rows, 2L)
    row_min = s0 - center
    row_max = s1 + (length - 1 - center)
    if len(edge):
        row_min[edge], row_max[edge] = cols.min(axis=1), cols.max(axis=1)
    # All windows get the widest block's width (shifted to stay inside the input), so the weights
    # form a single (blocks, R, block, window) array.
    n_blocks = -(-n_out // block)
    rows = np.arange(n_out)
    block_of, row_in_block = rows // block, rows % block
    starts = np.arange(n_blocks) * block
    lo = np.minimum.reduceat(row_min, starts)
    hi = np.maximum.reduceat(row_max, starts) + 1
    win = int((hi - lo).max())
    lo = np.minimum(lo, n_in - win)
    base = block_of * (n_rank * block * win) + row_in_block * win  # (n_out,)
    rank_step = np.arange(n_rank)[:, None, None] * (block * win)
    n_cells = n_blocks * n_rank * block * win
    inner = np.flatnonzero(interior)
    # Each cell is written once, as bincount would sum it: ((1 - w1)·t[j]) + (w1·t[j - 1]).
    comb = np.zeros((n_rank, len(inner), length + 1))
    comb[:, :, :length] = (1.0 - w1[inner])[None, :, None] * taps[:, None, :]
    comb[:, :, 1:] += w1[inner][None, :, None] * taps[:, None, :]
    start = base[inner] + row_min[inner] - lo[block_of[inner]]
    w = np.zeros(n_cells)
    w[(rank_step + start[None, :, None] + np.arange(length + 1)[None, None, :]).ravel()] = comb.ravel()
    if len(edge):
        weights = np.concatenate(
            [(1.0 - w1[edge])[None, :, None] * taps[:, None, :], w1[edge][None, :, None] * taps[:, None, :]],
            axis=2,
        )  # (R, edge rows, 2L)
        idx = rank_step + (base[edge, None] + cols - lo[block_of[edge], None])[None]
        w += np.bincount(idx.ravel(), weights=weights.ravel(), minlength=n_cells)
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


def _block_size_columns(length: int, scale: float) -> int:
    # The column stage's products are (C·h' × window) @ (window × block): below 16 outputs per block
    # the narrow result wastes most of each BLAS call, so blocks grow even at some zero padding.
    return max(16, _block_size(length, scale))


def fused_cost(shape: tuple[int, int, int], size: tuple[int, int], rank: int, length: int) -> float:
    """Approximate multiply-adds of :func:`blur_downsample`'s fused path."""
    h, w, ch = shape
    out_w, out_h = size
    sy, sx = h / out_h, w / out_w
    by, bx = _block_size(length, sy), _block_size_columns(length, sx)
    stage1 = rank * out_h * (by * sy + length) * w * ch
    stage2 = rank * out_w * (bx * sx + length) * out_h * ch
    return float(stage1 + stage2)


def fused_cost_seconds(shape: tuple[int, int, int], size: tuple[int, int], rank: int, length: int) -> float:
    """Rough single-core time of the fused path: the products plus a fixed per-call overhead."""
    return FUSED_OVERHEAD_SECONDS + fused_cost(shape, size, rank, length) / FUSED_MACS_PER_SECOND


def fft_sizes(shape: tuple[int, int, int], length: int) -> tuple[int, int]:
    """Transform sizes of :func:`fft_blur`: the reflect-padded image rounded up to OpenCV's fast sizes."""
    h, w = shape[:2]
    pad = length // 2
    return cv2.getOptimalDFTSize(h + 2 * pad), cv2.getOptimalDFTSize(w + 2 * pad)


def fft_cost_seconds(shape: tuple[int, int, int], length: int) -> float:
    """Rough single-core time of :func:`fft_blur` (forward, product and inverse per channel)."""
    n0, n1 = fft_sizes(shape, length)
    return FFT_SECONDS_PER_SAMPLE * n0 * n1 * shape[2]


def separable_cost_seconds(shape: tuple[int, int, int], rank: int, length: int) -> float:
    """Rough single-core time of ``rank`` whole-image ``cv2.sepFilter2D`` passes."""
    h, w, ch = shape
    return rank * (SEPARABLE_OVERHEAD_SECONDS + 2 * length * h * w * ch / SEPARABLE_MACS_PER_SECOND)


def fft_blur(img: np.ndarray, kernel: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """``blur(float32(img) / 255, kernel)`` through OpenCV's real DFT (reflect-101 borders), float32 (H, W, C).

    With ``size`` each blurred plane is resized (INTER_LINEAR) before the planes are merged, which
    equals ``resize_linear`` of the blurred image. Single-precision transforms keep the error near
    1e-4 grey levels, well inside the budget.
    """
    h, w, ch = img.shape
    length = kernel.shape[0]
    pad = length // 2
    n0, n1 = fft_sizes(img.shape, length)
    padded = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    padded = cv2.copyMakeBorder(
        padded, 0, n0 - h - 2 * pad, 0, n1 - w - 2 * pad, cv2.BORDER_CONSTANT, value=0
    ).reshape(n0, n1, ch)
    # Circular convolution with the flipped kernel is the correlation filter2D computes; output
    # (i, j) sits at (i + L - 1, j + L - 1), before any wrap-around can reach it. (OpenCV's
    # ``nonzeroRows`` hint would skip work but leaves its fast transform path: slower here.)
    # The inverse transform's 1 / (n0 n1) is folded into the kernel, saving a pass per channel.
    flipped = np.zeros((n0, n1), dtype=np.float32)
    flipped[:length, :length] = kernel[::-1, ::-1] / (255.0 * n0 * n1)
    kspec = cv2.dft(flipped)
    planes = []
    for channel in cv2.split(padded) if ch > 1 else [padded.reshape(n0, n1)]:
        spec = cv2.dft(channel.astype(np.float32))
        full = cv2.idft(cv2.mulSpectrums(spec, kspec, 0), flags=cv2.DFT_REAL_OUTPUT)
        plane = full[length - 1 : length - 1 + h, length - 1 : length - 1 + w]
        planes.append(plane if size is None else resize_linear(plane, size))
    return cv2.merge(planes)


def separable_blur(
    img: np.ndarray, p: np.ndarray, q: np.ndarray, size: tuple[int, int] | None = None
) -> np.ndarray:
    """``blur(float32(img) / 255, Σ_k p_k q_kᵀ)`` by whole-image ``cv2.sepFilter2D`` passes, float32.

    ``p`` (R, L) are the vertical and ``q`` (R, L) the horizontal filters, centred; with ``size``
    the result is resized (INTER_LINEAR).
    """
    out = None
    for k in range(p.shape[0]):
        piece = cv2.sepFilter2D(
            img,
            cv2.CV_32F,
            q[k].astype(np.float32),
            (p[k] / 255.0).astype(np.float32),
            borderType=cv2.BORDER_REFLECT_101,
        )
        out = piece if out is None else cv2.add(out, piece)
    if out is None:
        raise ValueError("separable filter bank is empty: p and q need at least one row")
    return out if size is None else resize_linear(out, size)


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


BLUR_ROUTES = ("fused", "separable", "fft")


def choose_route(shape: tuple[int, int, int], size: tuple[int, int], rank: int, length: int) -> str:
    """The blur route with the lowest modelled cost; fixed constants and shapes only (deterministic)."""
    costs = {
        "fused": fused_cost_seconds(shape, size, rank, length),
        "separable": separable_cost_seconds(shape, rank, length),
        "fft": fft_cost_seconds(shape, length),
    }
    return min(costs, key=costs.__getitem__)


def blur_downsample(
    img: np.ndarray,
    kernel: np.ndarray,
    size: tuple[int, int],
    tolerance: float = DEFAULT_TOLERANCE,
    route: str | None = None,
) -> np.ndarray:
    """``resize_linear(blur(float32(img) / 255, kernel), size)`` for a uint8 image, blurring only where read.

    The kernel is trimmed and split into separable pieces within ``tolerance``. Of three routes
    the one with the lowest modelled cost (fixed constants, shapes only: deterministic) runs: the
    fused products that blur only the rows and columns the resize reads; whole-image
    ``cv2.sepFilter2D`` passes (cheap for one or two short pieces); or a whole-image DFT blur
    with the trimmed kernel (thin rotated kernels that need many pieces, at small r).
    Every route is within ``tolerance`` grey levels of the unfused computation.

    Args:
        img: (H, W, C) uint8 (or float in 0-255 units).
        kernel: (K, K) blur kernel, K odd.
        size: output ``(width, height)``.
        tolerance: worst-case absolute error allowed, in 0-255 grey levels.
        route: force ``"fused"``, ``"separable"`` or ``"fft"`` (default: :func:`choose_route`).

    Returns:
        (height, width, C) float32 in [0, 1] units, channel order as the input.
    """
    h, w, ch = img.shape
    out_w, out_h = size
    p, q, center = separable_pieces(kernel, tolerance / 255.0)
    n_rank, length = p.shape
    if min(h, w) < length:
        sub = kernel[kernel.shape[0] // 2 - center :, kernel.shape[1] // 2 - center :][:length, :length]
        return reference_blur_downsample(img, sub, size)
    if route is None:
        route = choose_route(img.shape, size, n_rank, length)
    elif route not in BLUR_ROUTES:
        raise ValueError(f"unknown blur route {route!r}: expected one of {', '.join(BLUR_ROUTES)}")
    if route == "separable":
        return np.atleast_3d(separable_blur(img, p, q, size))
    if route == "fft":
        sub = kernel[kernel.shape[0] // 2 - center :, kernel.shape[1] // 2 - center :][:length, :length]
        return np.atleast_3d(fft_blur(img, sub, size))
    # Rows hold the channels side by side, (H, C·W): one product per block serves every channel.
    rows = img.transpose(0, 2, 1).astype(np.float32).reshape(h, ch * w)
    # Stage 1, rows: the 1/255 of the uint8 → [0, 1] conversion is folded into the vertical
    # filters. y[k, i, c] holds piece k's vertically filtered and resized row i of channel c.
    y = np.empty((n_rank, out_h, ch, w), dtype=np.float32)
    for o0, o1, lo, hi, wv in _band_blocks(h, out_h, p / 255.0, center, _block_size(length, h / out_h)):
        a = wv.reshape(n_rank * (o1 - o0), hi - lo)
        y[:, o0:o1] = (a @ rows[lo:hi]).reshape(n_rank, o1 - o0, ch, w)
    # Stage 2, columns: rows (output row, channel) of each piece's column band form one strided
    # matrix, so every product reads y in place; the pieces are summed into the block's result.
    res = np.empty((out_h, ch, out_w), dtype=np.float32)
    for o0, o1, lo, hi, wh in _band_blocks(w, out_w, q, center, _block_size_columns(length, w / out_w)):
        acc = y[0, :, :, lo:hi].reshape(out_h * ch, hi - lo) @ wh[0].T
        for k in range(1, n_rank):
            acc += y[k, :, :, lo:hi].reshape(out_h * ch, hi - lo) @ wh[k].T
        res[:, :, o0:o1] = acc.reshape(out_h, ch, o1 - o0)
    return np.ascontiguousarray(res.transpose(0, 2, 1))


def reference_blur_downsample(img: np.ndarray, kernel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The unfused path: ``float32(img) / 255`` → ``cv2.filter2D`` → ``cv2.resize`` INTER_LINEAR."""
    x = img.astype(np.float32) / 255.0
    return resize_linear(blur(x, kernel), size)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two images of the same shape (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
