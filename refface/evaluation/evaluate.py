"""Restoration metrics (IDS, LPIPS, fLPIPS, NIQE, MUSIQ, FID, PSNR, SSIM) of a restored folder vs. its GT, per protocol."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refface.console import track
from refface.evaluation import protocol as refldm
from refface.evaluation.metrics import frechet_distance, niqe, psnr, ssim
from refface.evaluation.models import EvalModels, load_models
from refface.evaluation.tables import COLUMNS, PROTOCOL_NOTES, EvalResult, write_tables
from refface.evaluation.weights import PROTOCOLS, EvalWeights
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import list_images, read_image

# The LPIPS-box region: hair and background do not count.
from refface.mining.quality import FACE_BOX
from refface.train.refldm.identity import embed

logger = logging.getLogger(__name__)


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
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _face_box(h: int, w: int):
    m = torch.zeros(1, 1, h, w)
    x0, y0, x1, y1 = FACE_BOX
    m[..., round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = 1.0
    return m


def _score_refface(models: EvalModels, key: str, a: np.ndarray, b: np.ndarray, errors, path: str) -> dict:
    row: dict[str, Any] = {"key": key, "psnr": psnr(a, b), "ssim": ssim(a, b)}
    ta, tb = _tensor(a), _tensor(b)
    if models.arcface is not None:
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
