"""IDS as ReF-LDM's ``eval.py`` computes it: ArcFace cosine of restored and GT after the official crop."""

from __future__ import annotations

import numpy as np

from refface.evaluation.iqa import unit_float
from refface.train.refldm.identity import arcface_input

# ReF-LDM's IdentityLoss: rows/columns [int(0.0625 s), int(0.9375 s)) ([32:480] at 512), area-resized to
# 112, the ONNX recognizer fed [-1, 1] RGB (the same input as refface's identity loss).
SIZE = 112
OFFICIAL_FILE = "insightface_webface_r50.onnx"


def official_input(rgb: np.ndarray):
    """``(1, 3, 112, 112)`` recognizer input of a uint8 RGB face (float32 [0, 1] -> [-1, 1], crop, area)."""
    return arcface_input(unit_float(rgb) * 2.0 - 1.0, SIZE, resize="area")


def ids(recognizer, pred: np.ndarray, gt: np.ndarray) -> float:
    """Cosine similarity of the recognizer's embeddings (``1 - IdentityLoss``)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        a = recognizer(official_input(pred)).float().reshape(1, -1)
        b = recognizer(official_input(gt)).float().reshape(1, -1)
    return float(F.cosine_similarity(a, b, dim=1)[0])
