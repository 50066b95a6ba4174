"""No-reference quality of an aligned face crop: sharpness of the face region, and NIQE when a pristine
model is given (the evaluation metric, :func:`refface.evaluation.metrics.niqe`)."""

from __future__ import annotations

import numpy as np

# Sharpness is measured on the face region of an FFHQ-aligned crop (brows to chin, cheek to cheek:
# the evaluation's fLPIPS box), resized to this side, so the figure does not depend on the crop size
# and a blurred background (portrait bokeh) does not count.
SHARPNESS_SIDE = 256
# The face box of an FFHQ-aligned crop as fractions (x0, y0, x1, y1): brows to chin, cheek to cheek.
FACE_BOX = (0.1875, 0.25, 0.8125, 0.9375)


def face_region(crop: np.ndarray) -> np.ndarray:
    """The face box of an FFHQ-aligned crop (fractions in :data:`FACE_BOX`)."""
    h, w = crop.shape[:2]
    x0, y0, x1, y1 = FACE_BOX
    return crop[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)]


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the face region's luma at :data:`SHARPNESS_SIDE` px (higher = sharper).

    A face upscaled from few source pixels, out of focus or motion-blurred has little high-frequency
    energy, so its Laplacian varies little.
    """
    import cv2

    region = face_region(crop)
    gray = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2GRAY)
    interp = cv2.INTER_AREA if gray.shape[0] > SHARPNESS_SIDE else cv2.INTER_CUBIC
    gray = cv2.resize(gray, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=interp)
    return float(cv2.Laplacian(gray.astype(np.float64), cv2.CV_64F, ksize=3).var())
