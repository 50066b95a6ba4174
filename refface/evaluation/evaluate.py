"""Restoration metrics (IDS, LPIPS, fLPIPS, NIQE, MUSIQ, FID, PSNR, SSIM) of a restored folder vs. its GT, per protocol."""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refface.console import track
from refface.evaluation.imresize import imresize
from refface.evaluation.musiq import load_musiq
from refface.evaluation.parsing import LabelMaps, ParsingModel
from refface.manifests.atomic import write_text
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import list_images, read_image

# The LPIPS-box region: hair and background do not count.
from refface.mining.quality import FACE_BOX

logger = logging.getLogger(__name__)

PROTOCOLS = ("refldm", "refface")
# Table columns per protocol (ReF-LDM Table 7 order); arrows say which way is better. Under the refface
# protocol without a parsing model the face-region LPIPS is a fixed-box average, named for what it is.
COLUMNS = {
    "refldm": [("ids", "IDS↑"), ("lpips", "LPIPS↓"), ("flpips", "fLPIPS↓"), ("niqe", "NIQE↓")]
    + [("musiq", "MUSIQ↑"), ("fid", "FID↓"), ("psnr", "PSNR↑"), ("ssim", "SSIM↑")],
    "refface": [("ids", "IDS↑"), ("lpips", "LPIPS↓"), ("lpips_box", "LPIPS-box↓"), ("niqe", "NIQE↓")]
    + [("fid", "FID↓"), ("psnr", "PSNR↑"), ("ssim", "SSIM↑")],
}
TABLE_COLUMNS = COLUMNS["refldm"]
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


@dataclass
class EvalResult:
    """Mean metrics (``nan`` = unavailable), per-image rows, reasons for unavailable metrics, errors."""

    name: str
    metrics: dict[str, float]
    per_image: list[dict[str, Any]]
    unavailable: dict[str, str]
    errors: Any
    outputs: dict[str, str] = field(default_factory=dict)
    protocol: str = "refldm"
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[tuple[str, str]]:
        return COLUMNS[self.protocol]


# ----------------------------------------------------------------------------------------------------
# pixel metrics


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 RGB images: 11x11 Gaussian (σ 1.5) per channel, averaged (BasicSR's form)."""
    import cv2

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx = cv2.filter2D(x, -1, window)[5:-5, 5:-5]
        my = cv2.filter2D(y, -1, window)[5:-5, 5:-5]
        sxx = cv2.filter2D(x * x, -1, window)[5:-5, 5:-5] - mx**2
        syy = cv2.filter2D(y * y, -1, window)[5:-5, 5:-5] - my**2
        sxy = cv2.filter2D(x * y, -1, window)[5:-5, 5:-5] - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx**2 + my**2 + c1) * (sxx + syy + c2)
        values.append(float(np.mean(num / den)))
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------------------
# NIQE (Mittal et al.), following BasicSR's implementation


@functools.lru_cache(maxsize=1)
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import gamma

    gam = np.arange(0.2, 10.001, 0.001)
    return gam, np.square(gamma(2 / gam)) / (gamma(1 / gam) * gamma(3 / gam))


def _aggd(block: np.ndarray) -> tuple[float, float, float]:
    from scipy.special import gamma

    block = block.flatten()
    gam, r_gam = _aggd_table()
    left = np.sqrt(np.mean(block[block < 0] ** 2)) if np.any(block < 0) else 1e-8
    right = np.sqrt(np.mean(block[block > 0] ** 2)) if np.any(block > 0) else 1e-8
    gammahat = left / right
    rhat = np.mean(np.abs(block)) ** 2 / max(np.mean(block**2), 1e-12)
    rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / ((gammahat**2 + 1) ** 2)
    alpha = gam[np.argmin((r_gam - rhatnorm) ** 2)]
    scale = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return float(alpha), float(left * scale), float(right * scale)


def _niqe_block_features(block: np.ndarray) -> list[float]:
    from scipy.special import gamma

    alpha, bl, br = _aggd(block)
    feat = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = (br - bl) * (gamma(2 / alpha) / gamma(1 / alpha))
        feat += [alpha, mean, bl, br]
    return feat


def _gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _y_channel(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in [16, 235], as MATLAB's rgb2ycbcr (what NIQE's pristine model was fit on)."""
    x = rgb.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def niqe_features(rgb: np.ndarray, block: int = 96, window: np.ndarray | None = None) -> np.ndarray:
    """NIQE patch features ``(patches, 36)`` of one uint8 RGB image at two scales (BasicSR's form)."""
    from scipy.ndimage import convolve

    window = _gaussian_window() if window is None else window
    img = _y_channel(rgb).round()
    nh, nw = img.shape[0] // block, img.shape[1] // block
    if nh == 0 or nw == 0:
        raise ValueError(
            f"NIQE needs images of at least {block}x{block} pixels, got {img.shape[1]}x{img.shape[0]}"
        )
    img = img[: nh * block, : nw * block]
    per_scale = []
    for scale in (1, 2):
        mu = convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(img * img, window, mode="nearest") - mu * mu))
        norm = (img - mu) / (sigma + 1)
        size = block // scale
        feats = [
            _niqe_block_features(norm[i * size : (i + 1) * size, j * size : (j + 1) * size])
            for j in range(nw)
            for i in range(nh)
        ]
        per_scale.append(np.array(feats))
        if scale == 1:
            img = imresize(img / 255.0, 0.5) * 255.0
    return np.concatenate(per_scale, axis=1)


def niqe(rgb: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """NIQE of one uint8 RGB image given the pristine model (``mu``, ``cov``, optional ``window``)."""
    feats = niqe_features(rgb, window=params.get("window"))
    mu = np.nanmean(feats, axis=0)
    clean = feats[~np.isnan(feats).any(axis=1)]
    cov = np.cov(clean, rowvar=False) if len(clean) > 1 else np.zeros((feats.shape[1],) * 2)
    diff = params["mu"] - mu
    inv = np.linalg.pinv((params["cov"] + cov) / 2)
    return float(np.sqrt(max(diff @ inv @ diff, 0.0)))


def fit_niqe_params(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A pristine NIQE model (mean and covariance of patch features) fit on clean uint8 RGB images."""
    feats = np.concatenate([niqe_features(im) for im in images])
    feats = feats[~np.isnan(feats).any(axis=1)]
    return {"mu": feats.mean(axis=0), "cov": np.cov(feats, rowvar=False), "window": _gaussian_window()}


def load_niqe_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read BasicSR's ``niqe_pris_params.npz`` or pyiqa's ``.mat`` pristine model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"NIQE pristine model not found: {path}; place {WEIGHT_SOURCES['niqe_params']} there"
        )
    if path.suffix == ".mat":
        from scipy.io import loadmat

        m = loadmat(str(path))
        return {
            "mu": np.ravel(m["mu_prisparam"]),
            "cov": np.asarray(m["cov_prisparam"]),
            "window": _gaussian_window(),
        }
    z = np.load(path)
    window = z["gaussian_window"] if "gaussian_window" in z else _gaussian_window()
    return {"mu": np.ravel(z["mu_pris_param"]), "cov": np.asarray(z["cov_pris_param"]), "window": window}


# ----------------------------------------------------------------------------------------------------
# FID


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fit to two feature sets ``(N, D)`` (the FID statistic)."""
    from scipy import linalg

    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Near-singular products (few images): regularize as pytorch-fid does.
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), 0.0))


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


# ----------------------------------------------------------------------------------------------------
# loading the networks


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

    # Lazy: these load torch, and builders (Reface-HQ's NIQE) and doctor import this module without it.
    from refface.train.refldm.identity import load_arcface
    from refface.train.refldm.lpips import LPIPS

    models.arcface = attempt("ids", lambda: load_arcface(need("arcface")))
    models.lpips = attempt("lpips", lambda: LPIPS.from_files(need("lpips_backbone"), need("lpips_head")))
    if weights.parsing:
        models.parser = attempt("flpips", lambda: load_parser(weights.parsing))
    elif protocol == "refldm":
        models.reasons["flpips"] = (
            "no face-parsing labels or model given (--parsing): fLPIPS needs a face mask"
        )
    if protocol == "refldm":
        from refface.evaluation import fid, niqe

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


# ----------------------------------------------------------------------------------------------------
# pairing and the run


def pair_images(restored: Path, gt: Path, refs_csv: str | os.PathLike | None = None):
    """Match restored files to GT files by relative path without extension (the refface protocol).

    Returns:
        ``(pairs, missing)``: ``[(key, restored_path, gt_path)]`` and GT-less restored keys.
    """

    def by_stem(root: Path) -> dict[str, Path]:
        return {str(Path(p).with_suffix("")): root / p for p in list_images(root)}

    rest, truth = by_stem(restored), by_stem(gt)
    keys = sorted(rest)
    if refs_csv is not None:
        import pandas as pd

        df = pd.read_csv(refs_csv)
        if "gt_image" not in df.columns:
            raise ValueError(f"{refs_csv} has no 'gt_image' column (ReF-LDM reference CSV expected)")
        wanted = {str(Path(p).with_suffix("")) for p in df["gt_image"].astype(str)}
        keys = [k for k in keys if k in wanted or Path(k).name in wanted]
    pairs = [(k, rest[k], truth[k]) for k in keys if k in truth]
    missing = [k for k in keys if k not in truth]
    return pairs, missing


def _tensor(rgb: np.ndarray):
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _face_box(h: int, w: int):
    import torch

    m = torch.zeros(1, 1, h, w)
    x0, y0, x1, y1 = FACE_BOX
    m[..., round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = 1.0
    return m


def _score_refface(models: EvalModels, key: str, a: np.ndarray, b: np.ndarray, errors, path: str) -> dict:
    row: dict[str, Any] = {"key": key, "psnr": psnr(a, b), "ssim": ssim(a, b)}
    ta, tb = _tensor(a), _tensor(b)
    if models.arcface is not None:
        from refface.train.refldm.identity import embed

        row["ids"] = float((embed(models.arcface, ta) * embed(models.arcface, tb)).sum())
    if models.lpips is not None:
        row["lpips"] = float(models.lpips(ta, tb)[0])
        row["lpips_box"] = float(models.lpips(ta, tb, mask=_face_box(*a.shape[:2]))[0])
    if models.niqe_params is not None:
        try:
            row["niqe"] = niqe(a, models.niqe_params)
        except ValueError as e:
            errors.add(path, "evaluate/niqe", str(e))
    return row


def evaluate_folders(
    restored: str | os.PathLike,
    gt: str | os.PathLike,
    refs_csv: str | os.PathLike | None = None,
    weights: EvalWeights | None = None,
    models: EvalModels | None = None,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    protocol: str = "refface",
    fid_reference: str | None = None,
) -> EvalResult:
    """Score every restored image against its GT and write the tables.

    Args:
        restored: folder of restored images.
        gt: folder of ground-truth images.
        refs_csv: a ReF-LDM reference CSV; only its targets are scored.
        weights: local weight files (ignored when ``models`` is given).
        models: preloaded metric networks (tests pass tiny ones).
        out: folder for ``metrics.csv``, ``metrics.md``, ``per_image.csv`` and ``errors.csv``;
            None writes nothing.
        name: the method name in the table (default: the restored folder's name).
        protocol: ``refldm``: ReF-LDM's ``scripts/eval.py`` (flat ``<stem>.png`` pairing, both images
            PIL-resized to 512, pyiqa's metric definitions, FID against reference statistics);
            ``refface``: relative-path pairing, no resizing (a size mismatch is an error row),
            BasicSR-form PSNR/SSIM/NIQE, FID against the GT set. docs/evaluation.md lists both.
        fid_reference: ``stats`` or ``gt`` (see :func:`load_models`); ignored when ``models`` is given.

    Returns:
        The means, the per-image rows, the unavailable metrics with reasons, and the errors table.
    """
    import torch

    from refface.evaluation import protocol as refldm

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    restored, gt = Path(restored), Path(gt)
    for folder, what in ((restored, "restored"), (gt, "GT")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {folder}")
    if models is None:
        models = load_models(weights or EvalWeights.from_dir(None, protocol), protocol, fid_reference)
    errors = ErrorsTable()
    pair = refldm.pair_flat if protocol == "refldm" else pair_images
    pairs, missing = pair(restored, gt, refs_csv)
    for key in missing:
        errors.add(key, "evaluate", "no GT image with this name")
    rows: list[dict[str, Any]] = []
    scored: list[tuple[Path, Path]] = []
    feats_r, feats_g = [], []
    with torch.no_grad():
        for key, rpath, gpath in track(pairs, "scoring"):
            try:
                if protocol == "refldm":
                    a, b = refldm.read_official(rpath), refldm.read_official(gpath)
                else:
                    a, b = read_image(rpath), read_image(gpath)
                    if a.shape != b.shape:
                        raise ImageError(
                            f"size {a.shape[1]}x{a.shape[0]} differs from GT {b.shape[1]}x{b.shape[0]}"
                        )
            except ImageError as e:
                errors.add(str(rpath), "evaluate", str(e))
                continue
            if protocol == "refldm":
                rows.append(refldm.score_pair(models, key, a, b, errors, str(rpath)))
            else:
                rows.append(_score_refface(models, key, a, b, errors, str(rpath)))
                if models.feature_net is not None:
                    feats_r.append(np.asarray(models.feature_net(_tensor(a)), np.float64).reshape(1, -1))
                    feats_g.append(np.asarray(models.feature_net(_tensor(b)), np.float64).reshape(1, -1))
            scored.append((rpath, gpath))

    unavailable = {k: v for k, v in models.reasons.items() if v}
    for key, model in (("ids", models.arcface), ("lpips", models.lpips), ("niqe", models.niqe_params)):
        if model is None:
            unavailable.setdefault(key, f"no {key} model")
    if models.feature_net is None:
        unavailable.setdefault("fid", "no FID feature network")
    if protocol == "refldm" and models.musiq is None:
        unavailable.setdefault("musiq", "no MUSIQ model")
    if models.lpips is None:
        unavailable.setdefault("flpips" if protocol == "refldm" else "lpips_box", unavailable["lpips"])
    columns = COLUMNS[protocol]
    metrics: dict[str, float] = {}
    for col, _ in columns:
        values = [r[col] for r in rows if col in r]
        metrics[col] = float(np.mean(values)) if values else math.nan
    metrics["fid"] = math.nan
    try:
        if protocol == "refldm":
            metrics["fid"] = refldm.set_fid(models, [r for r, _ in scored], [g for _, g in scored])
        elif models.feature_net is not None:
            metrics["fid"] = frechet_distance(np.concatenate(feats_r), np.concatenate(feats_g))
    except ValueError as e:
        unavailable["fid"] = str(e)
    notes = [f"protocol: {protocol} ({PROTOCOL_NOTES[protocol]})"]
    if not math.isnan(metrics["fid"]):
        notes.append(f"FID against {models.fid_reference if protocol == 'refldm' else 'the GT set'}")
    result = EvalResult(
        name or restored.name, metrics, rows, unavailable, errors, protocol=protocol, notes=notes
    )
    if out is not None:
        result.outputs = write_tables(result, Path(out))
    return result


PROTOCOL_NOTES = {
    "refldm": "ReF-LDM scripts/eval.py: flat <stem>.png pairs, PIL resize to 512, pyiqa metric definitions",
    "refface": "relative-path pairs at stored size, BasicSR-form PSNR/SSIM/NIQE",
}


def _fmt(col: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}" if col in ("fid", "psnr", "niqe", "musiq") else f"{value:.3f}"


def markdown_table(results: list[EvalResult]) -> str:
    """Results in ReF-LDM Table 7 layout, one row per method, with the protocol and FID reference noted."""
    columns = results[0].columns if results else TABLE_COLUMNS
    head = "| Method | " + " | ".join(label for _, label in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for r in results:
        lines.append(
            f"| {r.name} | " + " | ".join(_fmt(c, r.metrics.get(c, math.nan)) for c, _ in columns) + " |"
        )
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    reasons = sorted({f"{k}: {v}" for r in results for k, v in r.unavailable.items()})
    if reasons:
        lines += ["", "n/a = unavailable:"] + [f"- {n}" for n in reasons]
    return "\n".join(lines) + "\n"


def write_tables(result: EvalResult, out: Path) -> dict[str, str]:
    """Write ``metrics.csv`` / ``metrics.md`` (Table 7 layout), ``per_image.csv`` and ``errors.csv``."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": result.name, "protocol": result.protocol, "images": len(result.per_image)}
    summary.update({c: result.metrics.get(c, math.nan) for c, _ in result.columns})
    files = {
        "metrics.csv": pd.DataFrame([summary]).to_csv(index=False),
        "metrics.md": markdown_table([result]),
        "per_image.csv": pd.DataFrame(result.per_image).to_csv(index=False),
        "errors.csv": result.errors.to_frame().to_csv(index=False),
    }
    for fname, text in files.items():
        write_text(out / fname, text)
    return {k: str(out / k) for k in files}
