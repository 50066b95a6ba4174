"""The local weight files of the learned metrics, per protocol: default file names, where each comes
from, and :class:`EvalWeights` (no torch: ``refface doctor`` lists them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROTOCOLS = ("refldm", "refface")
DEFAULT_WEIGHT_FILES = {
    "refface": {
        "arcface": "w600k_r50.onnx",
        "lpips_backbone": "vgg16-397923af.pth",
        "lpips_head": "lpips_vgg_v0.1.pth",
        "inception": "inception-2015-12-05.pt",
        "niqe_params": "niqe_pris_params.npz",
    },
    "refldm": {
        "arcface": "insightface_webface_r50.onnx",
        "lpips_backbone": "vgg16-397923af.pth",
        "lpips_head": "lpips_vgg_v0.1.pth",
        "inception": "pt_inception-2015-12-05-6726825d.pth",
        "fid_stats": "ffhq_clean_trainval70k_512.npz",
        "musiq": "musiq_koniq_ckpt-e95806b9.pth",
    },
}


WEIGHT_SOURCES = {
    "arcface": "an insightface ArcFace ONNX ('insightface_webface_r50.onnx' in ReF-LDM's eval.py, "
    "buffalo_l 'w600k_r50.onnx') or an arcface_torch iresnet50 .pth",
    "lpips_backbone": "torchvision's ImageNet VGG16 'vgg16-397923af.pth'",
    "lpips_head": "the lpips package's 'weights/v0.1/vgg.pth'",
    "inception": "pytorch-fid's 'pt_inception-2015-12-05-6726825d.pth' (pyiqa) or the TorchScript FID "
    "Inception 'inception-2015-12-05.pt' (clean-fid / StyleGAN metrics)",
    "niqe_params": "BasicSR's 'basicsr/metrics/niqe_pris_params.npz' (or pyiqa's NIQE .mat)",
    "fid_stats": "clean-fid's 'ffhq_clean_trainval70k_512.npz' (pyiqa's FFHQ reference statistics)",
    "musiq": "pyiqa's 'musiq_koniq_ckpt-e95806b9.pth'",
}


@dataclass
class EvalWeights:
    """Local weight files of the learned metrics; a missing file makes its metric 'unavailable'.

    Build with :meth:`from_dir` to take a protocol's default file names inside one folder. ``parsing``
    is a folder of label maps or a face-parsing ONNX model (fLPIPS); ``niqe_params`` None under the
    refldm protocol means the shipped pristine model.
    """

    arcface: str | None = None
    lpips_backbone: str | None = None
    lpips_head: str | None = None
    inception: str | None = None
    niqe_params: str | None = None
    fid_stats: str | None = None
    musiq: str | None = None
    parsing: str | None = None

    @classmethod
    def from_dir(
        cls, folder: str | os.PathLike | None, protocol: str = "refface", **overrides: str | None
    ) -> EvalWeights:
        base = Path(folder) if folder else None
        names = DEFAULT_WEIGHT_FILES[protocol]
        values = {k: (str(base / v) if base else None) for k, v in names.items()}
        values.update({k: v for k, v in overrides.items() if v})
        return cls(**values)
