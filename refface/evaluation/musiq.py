"""MUSIQ (KonIQ-10k) through pyiqa itself, when pyiqa and its checkpoint are on this machine."""

from __future__ import annotations

import os
from pathlib import Path

from refface.evaluation.iqa import unit_float

WEIGHTS_FILE = "musiq_koniq_ckpt-e95806b9.pth"


def pyiqa_cache() -> Path:
    """Where pyiqa keeps downloaded weights (``<torch hub dir>/pyiqa``)."""
    import torch

    return Path(torch.hub.get_dir()) / "pyiqa"


def load_musiq(path: str | os.PathLike):
    """A callable ``rgb uint8 -> MUSIQ score``.

    Raises:
        FileNotFoundError: the checkpoint is missing (the message names it).
        ImportError: pyiqa (with its torchvision) cannot be imported here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MUSIQ weights not found: {path}; place pyiqa's '{WEIGHTS_FILE}' there")
    try:
        import pyiqa
    except Exception as e:  # noqa: BLE001 - any import failure means the metric cannot run
        raise ImportError(f"MUSIQ runs through pyiqa, which does not import here ({e}); install pyiqa") from e
    metric = pyiqa.create_metric("musiq", device="cpu", pretrained_model_path=str(path))

    def score(rgb):
        return float(metric(unit_float(rgb)))

    return score
