"""Face masks for fLPIPS from CelebAMask-HQ-style parsing labels (ReF-LDM's ``eval.py`` definition).

Labels: 0 background, 1 neck, 2 face, 3 cloth, 4 r-ear, 5 l-ear, 6 r-brow, 7 l-brow, 8 r-eye, 9 l-eye,
10 nose, 11 inner mouth, 12 lower lip, 13 upper lip, 14 hair, 15 glasses, 16 hat, 17 earring, 18 neck-l.
The face mask is skin, ears, brows, eyes, nose, mouth, lips and glasses: no hair, neck, clothes or
background. Both images are multiplied by the mask before LPIPS.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FACE_CLASSES = (2, 4, 5, 10, 11, 12, 13, 6, 7, 8, 9, 15)


def face_mask(labels: np.ndarray) -> np.ndarray:
    """Binary ``(H, W)`` uint8 mask of the face classes of a label map."""
    return np.isin(labels, FACE_CLASSES).astype(np.uint8)


class LabelMaps:
    """Precomputed label maps ``<stem>.npy`` (as ``eval.py`` reads) or ``<stem>.png`` in one folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"face-parsing label folder not found: {self.folder}")

    def __call__(self, stem: str, rgb: np.ndarray) -> np.ndarray:
        npy, png = self.folder / f"{stem}.npy", self.folder / f"{stem}.png"
        if npy.is_file():
            labels = np.load(npy)
        elif png.is_file():
            from PIL import Image

            labels = np.asarray(Image.open(png))
        else:
            raise FileNotFoundError(f"no label map {npy.name} or {png.name} in {self.folder}")
        return _fit(labels, rgb.shape[:2])


class ParsingModel:
    """A 19-class face parser in ONNX (facexlib ParseNet convention: 512 px RGB in [-1, 1] -> logits)."""

    def __init__(self, path: str | os.PathLike, size: int = 512):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"face-parsing model not found: {path}; export a 19-class CelebAMask-HQ parser "
                "(e.g. facexlib's ParseNet) to ONNX and pass its path"
            )
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.size = size

    def __call__(self, stem: str, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        img = np.asarray(
            Image.fromarray(rgb).resize((self.size, self.size), Image.Resampling.BILINEAR), np.float32
        )
        x = (img / 127.5 - 1.0).transpose(2, 0, 1)[None]
        logits = self.session.run(None, {self.input: x})[0]  # (1, 19, size, size)
        return _fit(logits[0].argmax(axis=0), rgb.shape[:2])


def _fit(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    if labels.shape != tuple(shape):
        from PIL import Image

        labels = np.asarray(
            Image.fromarray(labels.astype(np.uint8)).resize(shape[::-1], Image.Resampling.NEAREST)
        )
    return labels
