"""The deterministic degrader: parameters drawn per (seed, image key), every draw recorded."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from refface.degradations import ops
from refface.degradations.kernels import make_kernel, sample_kernel_params
from refface.degradations.presets import PresetConfig, get_preset
from refface.manifests.errors import ImageError
from refface.seeding import item_rng


def prepare_input(img: np.ndarray, cfg: PresetConfig) -> tuple[np.ndarray, list[str]]:
    """Bring any accepted input to (S, S, 3) uint8 RGB by rule; returns the image and notes.

    Rules: gray (H, W) / (H, W, 1) is repeated on three channels; gray+alpha and RGBA are
    composited on white; 16-bit is scaled to 8 bits; an image whose shorter side is smaller than
    the preset's largest downsample factor is rejected (its LQ would have no pixels); other sizes
    are resized to ``out_size`` (INTER_AREA down, INTER_CUBIC up).

    Raises:
        ImageError: unsupported dtype or channel count, empty or too small image.
    """
    notes: list[str] = []
    arr = np.asarray(img)
    if arr.dtype == np.uint16:
        arr = np.floor(arr.astype(np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
        notes.append("16-bit scaled to 8-bit")
    elif arr.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {arr.dtype}: expected uint8 or uint16")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
        notes.append("gray repeated to RGB")
    elif arr.ndim == 3 and arr.shape[2] in (2, 4):
        color = arr[:, :, :-1].astype(np.float64)
        if color.shape[2] == 1:
            color = np.repeat(color, 3, axis=2)
        alpha = arr[:, :, -1:].astype(np.float64) / 255.0
        # Transparent areas are background: composite on white, as the image reader does.
        arr = np.floor(color * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
        notes.append("alpha composited on white")
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise ImageError(f"unsupported image shape {arr.shape}: expected (H, W), (H, W, 1|2|3|4)")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise ImageError("empty image")
    if min(h, w) < cfg.max_downsample():
        raise ImageError(
            f"image {w}x{h} is smaller than the largest downsample factor {cfg.max_downsample():g} "
            f"of preset {cfg.name}: its LQ would have no pixels"
        )
    size = cfg.out_size
    if size is not None and (h, w) != (size, size):
        interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
        arr = cv2.resize(arr, (size, size), interpolation=interp)
        notes.append(f"resized from {w}x{h} to {size}x{size}")
    return np.ascontiguousarray(arr), notes


def sample_params(cfg: PresetConfig, rng: np.random.Generator) -> dict:
    """Draw one degradation's parameters in BasicSR's order; JSON-able, ``None`` for skipped steps."""
    params: dict = {"preset": cfg.name, "kernel_size": cfg.kernel_size}
    if cfg.grid is not None:
        g = cfg.grid
        params.update(
            kernel_type="aniso",
            sigma_x=float(rng.choice(g["sigma_x"])),
            sigma_y=float(rng.choice(g["sigma_y"])),
            theta=float(rng.choice(g["theta"])),
            beta=None,
        )
        params["scale"] = float(rng.choice(g["scale"]))
        params.update(noise_type="gaussian", noise_sigma=float(rng.choice(g["noise"])), noise_gray=False)
        params["poisson_scale"] = None
        q = float(rng.choice(g["jpeg"]))
        params.update(jpeg_quality_raw=q, jpeg_quality=int(q))
    else:
        if cfg.blur_sigma is not None:
            params.update(
                sample_kernel_params(
                    rng,
                    cfg.kernel_list,
                    cfg.kernel_prob,
                    cfg.blur_sigma,
                    cfg.blur_sigma,
                    cfg.rotation_range,
                    cfg.betag_range,
                    cfg.betap_range,
                )
            )
        else:
            params.update(kernel_type=None, sigma_x=None, sigma_y=None, theta=None, beta=None)
        params["scale"] = float(rng.uniform(cfg.downsample_range[0], cfg.downsample_range[1]))
        params.update(_sample_noise(cfg, rng))
        if cfg.jpeg_range is not None:
            q = float(rng.uniform(cfg.jpeg_range[0], cfg.jpeg_range[1]))
            # Current OpenCV needs an integer quality; ReF-LDM truncates with int(q).
            params.update(jpeg_quality_raw=q, jpeg_quality=int(q))
        else:
            params.update(jpeg_quality_raw=None, jpeg_quality=None)
    jitter = None
    if cfg.color_jitter_prob > 0 and rng.uniform() < cfg.color_jitter_prob:
        shift = cfg.color_jitter_shift / 255.0
        # Drawn per BGR channel, as GFPGAN jitters its BGR arrays.
        jitter = [float(v) for v in rng.uniform(-shift, shift, 3).astype(np.float32)]
    params["color_jitter"] = jitter
    params["gray"] = bool(cfg.gray_prob > 0 and rng.uniform() < cfg.gray_prob)
    # The noise field itself comes from its own recorded seed, so params alone reproduce the image.
    params["noise_seed"] = int(rng.integers(0, 2**63 - 1))
    return params


def _sample_noise(cfg: PresetConfig, rng: np.random.Generator) -> dict:
    out: dict[str, Any] = {
        "noise_type": None,
        "noise_sigma": None,
        "noise_gray": False,
        "poisson_scale": None,
    }
    sigma_range, scale_range = cfg.noise_range, cfg.poisson_scale_range
    gaussian, poisson = sigma_range is not None, scale_range is not None
    if gaussian and poisson:
        use_gaussian = bool(rng.uniform() < cfg.gaussian_noise_prob)
        gaussian, poisson = use_gaussian, not use_gaussian
    if gaussian and sigma_range is not None:
        out["noise_type"] = "gaussian"
        out["noise_sigma"] = float(rng.uniform(sigma_range[0], sigma_range[1]))
        out["noise_gray"] = bool(rng.uniform() < cfg.gray_noise_prob)
    elif poisson and scale_range is not None:
        out["noise_type"] = "poisson"
        out["poisson_scale"] = float(rng.uniform(scale_range[0], scale_range[1]))
        out["noise_gray"] = bool(rng.uniform() < cfg.gray_noise_prob)
    return out


def apply_params(
    img: np.ndarray, params: dict, fast: bool = True, tolerance: float = ops.DEFAULT_TOLERANCE
) -> np.ndarray:
    """Degrade a prepared (H, W, 3) uint8 RGB image with recorded ``params``; returns uint8 RGB.

    ``fast=False`` makes exactly BasicSR's calls (full ``filter2D`` then resize); ``fast=True``
    fuses blur and downsample within ``tolerance`` grey levels.
    """
    h, w = img.shape[:2]
    size = ops.lq_size(w, h, params["scale"])
    if params.get("kernel_type") is not None:
        kernel = make_kernel(params, params["kernel_size"])
        if fast:
            small = ops.blur_downsample(img, kernel, size, tolerance)
        else:
            small = ops.reference_blur_downsample(img, kernel, size)
    else:
        small = ops.resize_linear(img.astype(np.float32) / 255.0, size)
    # Noise and JPEG see BGR arrays as in BasicSR (the noise field's channel order, JPEG's YCbCr).
    small = ops.bgr_rgb(small)
    noise_rng = ops.noise_rng(params["noise_seed"])
    if params["noise_type"] == "gaussian":
        noise = ops.gaussian_noise(small.shape, params["noise_sigma"], params["noise_gray"], noise_rng)
        small = ops.add_noise(small, noise)
    elif params["noise_type"] == "poisson":
        noise = ops.poisson_noise(small, params["poisson_scale"], params["noise_gray"], noise_rng)
        small = np.clip(small + noise, 0, 1)
    if params["jpeg_quality"] is not None:
        small = ops.jpeg(small, params["jpeg_quality"])
    # Back to RGB on the small image; the per-channel ops after it do not care about the order.
    up = ops.resize_linear(ops.bgr_rgb(small), (w, h))
    if params.get("color_jitter") is not None:
        up = ops.color_jitter(up, np.asarray(params["color_jitter"][::-1], dtype=np.float32))
    if params.get("gray"):
        # From BGR, as GFPGAN converts: OpenCV's float sum order decides the odd rounding tie.
        up = ops.to_gray(ops.bgr_rgb(up))
    return ops.round_clip_u8(up)


class Degrader:
    """Degrade images with a preset, deterministically per (seed, key).

    Example::

        lq, params = Degrader("refldm-severe", seed=0).degrade(img, "00017.png")
    """

    def __init__(
        self,
        preset: str | PresetConfig,
        seed: int = 0,
        fast: bool = True,
        tolerance: float = ops.DEFAULT_TOLERANCE,
    ):
        self.config = get_preset(preset)
        self.seed = int(seed)
        self.fast = fast
        self.tolerance = tolerance

    def rng(self, key: str) -> np.random.Generator:
        """The item generator; the preset name is part of the key so presets draw independently."""
        return item_rng(self.seed, f"{self.config.name}:{key}")

    def sample(self, key: str) -> dict:
        """The parameters ``degrade`` would use for ``key`` (cheap: nothing is computed on pixels)."""
        params = sample_params(self.config, self.rng(key))
        params["seed"] = self.seed
        params["key"] = key
        return params

    def degrade(self, img: np.ndarray, key: str) -> tuple[np.ndarray, dict]:
        """Degrade ``img`` (uint8 HxWx3 RGB; gray, RGBA and 16-bit converted by rule).

        Returns:
            (LQ uint8 out_size x out_size x 3 RGB, params dict with every sampled value).

        Raises:
            ImageError: input that cannot be degraded by rule (see :func:`prepare_input`).
        """
        prepared, notes = prepare_input(img, self.config)
        params = self.sample(key)
        params["input_notes"] = "; ".join(notes)
        h, w = prepared.shape[:2]
        lw, lh = ops.lq_size(w, h, params["scale"])
        params.update(lq_width=lw, lq_height=lh, width=w, height=h)
        return apply_params(prepared, params, self.fast, self.tolerance), params


def make_degrader(preset: str, seed: int, out_size: int | None) -> Degrader:
    """The CPU degrader for the named ``preset`` producing ``out_size`` squares (None: the input's size)."""
    return Degrader(get_preset(preset, out_size=out_size), seed)
