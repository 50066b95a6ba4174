"""Loading the metric networks (ArcFace, LPIPS, Inception, MUSIQ, a face parser) from local weight files;
a file that is missing or fails to load makes its metric unavailable, with the reason."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refface.evaluation import fid, niqe
from refface.evaluation.metrics import load_niqe_params
from refface.evaluation.musiq import load_musiq
from refface.evaluation.parsing import LabelMaps, ParsingModel
from refface.evaluation.weights import PROTOCOLS, WEIGHT_SOURCES, EvalWeights
from refface.train.refldm.identity import load_arcface
from refface.train.refldm.lpips import LPIPS


@dataclass
class EvalModels:
    """The metric networks in use; None means the metric is unavailable (``reasons`` says why).

    ``fid_stats`` holds the reference ``(mu, sigma)``; None compares against the GT set's features.
    """

    arcface: Any = None
    lpips: Any = None
    feature_net: Any = None
    niqe_params: dict[str, np.ndarray] | None = None
    musiq: Any = None
    parser: Any = None
    fid_stats: tuple[np.ndarray, np.ndarray] | None = None
    fid_reference: str = "the GT set"
    reasons: dict[str, str] = field(default_factory=dict)


class TorchScriptInception:
    """The FID Inception as a TorchScript file; call on ``(B, 3, H, W)`` in [-1, 1] -> ``(B, 2048)``."""

    def __init__(self, path: str | os.PathLike):
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found: {path}; place {WEIGHT_SOURCES['inception']} there"
            )
        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, images):
        # This TorchScript takes 0-255 floats of any size and resizes to 299 itself.
        return self.model((images + 1) * 127.5, return_features=True)


def load_models(
    weights: EvalWeights, protocol: str = "refface", fid_reference: str | None = None
) -> EvalModels:
    """Load every metric network whose file exists; record a reason for each one that does not.

    Args:
        weights: local files.
        protocol: ``refldm`` (ReF-LDM's eval.py definitions) or ``refface``.
        fid_reference: ``stats`` (the ``fid_stats`` file) or ``gt`` (the GT set); default: ``stats``
            under refldm, ``gt`` under refface.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    fid_reference = fid_reference or ("stats" if protocol == "refldm" else "gt")
    if fid_reference not in ("stats", "gt"):
        raise ValueError(f"fid_reference must be 'stats' or 'gt', got {fid_reference!r}")
    models = EvalModels()

    def attempt(key: str, fn):
        try:
            return fn()
        except (FileNotFoundError, ImportError, ValueError, RuntimeError) as e:
            models.reasons[key] = str(e)
            return None

    def need(attr: str) -> str:
        value = getattr(weights, attr)
        if not value:
            raise FileNotFoundError(f"no {attr} file given; pass the path to {WEIGHT_SOURCES[attr]}")
        return value

    models.arcface = attempt("ids", lambda: load_arcface(need("arcface")))
    models.lpips = attempt("lpips", lambda: LPIPS.from_files(need("lpips_backbone"), need("lpips_head")))
    if weights.parsing:
        models.parser = attempt("flpips", lambda: load_parser(weights.parsing))
    elif protocol == "refldm":
        models.reasons["flpips"] = (
            "no face-parsing labels or model given (--parsing): fLPIPS needs a face mask"
        )
    if protocol == "refldm":
        models.niqe_params = attempt("niqe", lambda: niqe.load_params(weights.niqe_params))
        models.musiq = attempt("musiq", lambda: load_musiq(need("musiq")))
        models.feature_net = attempt("fid", lambda: fid.load_feature_network(need("inception")))
        if fid_reference == "stats" and models.feature_net is not None:
            models.fid_stats = attempt("fid", lambda: fid.load_statistics(need("fid_stats")))
            if models.fid_stats is None:
                models.feature_net = None
                models.reasons["fid"] += " (or --fid-ref gt for FID against the GT set)"
            else:
                models.fid_reference = f"reference statistics {Path(need('fid_stats')).name}"
    else:
        models.feature_net = attempt("fid", lambda: TorchScriptInception(need("inception")))
        models.niqe_params = attempt("niqe", lambda: load_niqe_params(need("niqe_params")))
    return models


def load_parser(source: str | os.PathLike):
    """Face-parsing labels for fLPIPS: a folder of ``<stem>.npy|png`` label maps or an ONNX parser."""
    return LabelMaps(source) if Path(source).is_dir() else ParsingModel(source)
