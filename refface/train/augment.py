"""Image ops of the training input pipeline (uint8 HWC RGB in, uint8 HWC RGB out): ReF-LDM's reference
augmentation (torchvision semantics, implemented with cv2/numpy), resizing, tensors, reference slots."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class RefAugment:
    """ReF-LDM reference augmentation (torchvision semantics, implemented with cv2/numpy)."""

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    degrees: float = 2.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.95, 1.05)
    perspective: float = 0.2
    perspective_p: float = 1.0  # the official ReF-LDM dataset: RandomPerspective(0.2, p=1.0)
    hflip_p: float = 0.5


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``x``size`` (area filter when shrinking, bicubic when growing); no-op when equal."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def color_jitter(img: np.ndarray, rng: np.random.Generator, aug: RefAugment) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter in a random order (as torchvision ColorJitter).

    Each op is torchvision's blend (with black, the mean grey, the greyscale image; hue as a shift
    in HSV), done in uint8 with cv2 for speed: results match torchvision up to rounding per step.
    """
    factors = {
        "b": rng.uniform(1 - aug.brightness, 1 + aug.brightness),
        "c": rng.uniform(1 - aug.contrast, 1 + aug.contrast),
        "s": rng.uniform(1 - aug.saturation, 1 + aug.saturation),
        "h": rng.uniform(-aug.hue, aug.hue),
    }
    strength = {"b": aug.brightness, "c": aug.contrast, "s": aug.saturation, "h": aug.hue}
    x = img
    for op in rng.permutation(["b", "c", "s", "h"]):
        f = float(factors[op])
        if strength[op] == 0:
            continue  # as torchvision: a zero range means the op is off (the HSV round trip is lossy)
        if op == "b":
            x = cv2.convertScaleAbs(x, alpha=f)
        elif op == "c":
            mean = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
            x = cv2.addWeighted(x, f, x, 0.0, (1.0 - f) * mean)
        elif op == "s":
            gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            x = cv2.addWeighted(x, f, gray, 1.0 - f, 0.0)
        else:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
            hsv[..., 0] += np.uint8(int(round(f * 256)) % 256)  # uint8 wraps: hue is circular
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    return x


def affine_matrix(rng: np.random.Generator, aug: RefAugment, w: int, h: int) -> np.ndarray:
    """3x3 matrix: rotation ±degrees, translation ±translate·size, scale in ``aug.scale`` about the centre."""
    angle = rng.uniform(-aug.degrees, aug.degrees)
    scale = rng.uniform(*aug.scale)
    tx = rng.uniform(-aug.translate, aug.translate) * w
    ty = rng.uniform(-aug.translate, aug.translate) * h
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D((w * 0.5, h * 0.5), angle, scale)
    m[:2, 2] += (tx, ty)
    return m


def perspective_matrix(rng: np.random.Generator, distortion: float, w: int, h: int) -> np.ndarray:
    """3x3 matrix moving each corner inwards by up to ``distortion``·half-size (torchvision RandomPerspective)."""
    hw, hh = distortion * w / 2, distortion * h / 2
    src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float32)
    sx = rng.uniform(0, hw, 4)
    sy = rng.uniform(0, hh, 4)
    dst = np.array(
        [[sx[0], sy[0]], [w - 1 - sx[1], sy[1]], [w - 1 - sx[2], h - 1 - sy[2]], [sx[3], h - 1 - sy[3]]],
        dtype=np.float32,
    )
    return cv2.getPerspectiveTransform(src, dst)


def random_perspective(img: np.ndarray, rng: np.random.Generator, distortion: float) -> np.ndarray:
    """Apply a random perspective distortion on its own (see :func:`perspective_matrix`)."""
    h, w = img.shape[:2]
    m = perspective_matrix(rng, distortion, w, h)
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def augment_reference(img: np.ndarray, rng: np.random.Generator, aug: RefAugment | None = None) -> np.ndarray:
    """The ReF-LDM reference augmentation: colour jitter, affine, perspective (p), horizontal flip (p).

    Affine, perspective and flip are composed into one matrix and applied in a single warp: one
    resampling instead of three (faster and less blur than torchvision's chain, same geometry).
    """
    aug = aug or RefAugment()
    h, w = img.shape[:2]
    img = color_jitter(img, rng, aug)
    m = affine_matrix(rng, aug, w, h)
    if rng.random() < aug.perspective_p:
        m = perspective_matrix(rng, aug.perspective, w, h) @ m
    if rng.random() < aug.hflip_p:
        m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def to_tensor(img: np.ndarray, out=None):
    """(H, W, 3) uint8 -> float32 (3, H, W) in [-1, 1], written into ``out`` when given.

    Channel planes are copied by numpy and scaled in place: a few times faster than torch's
    permute + float + div on a busy CPU, with identical values (x / 127.5 - 1 in float32).
    """
    import torch

    h, w = img.shape[:2]
    if out is None:
        out = torch.empty(3, h, w)
    planes = out.numpy()
    for c in range(3):
        planes[c] = img[:, :, c]
    planes /= 127.5
    planes -= 1.0
    return out


def fill_references(n: int, k: int, rng: np.random.Generator | None) -> list[int]:
    """Indices of ``k`` reference slots from ``n`` references: distinct when n >= k, else repeated to fill.

    With ``rng`` the choice and the slot order are shuffled (training); without, the first ``k`` in
    order, cycled (evaluation). Empty when ``n == 0``.
    """
    if n == 0:
        return []
    if rng is None:
        return [i % n for i in range(k)]
    if n >= k:
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    picks = [i % n for i in range(k)]
    return [int(i) for i in rng.permutation(picks)]
