"""The ReF-LDM evaluation protocol (``scripts/eval.py``): flat ``<stem>.png`` pairing, 512 px, pyiqa metrics.

Per restored ``<name>.png`` (sorted) the GT is ``<gt dir>/<name>.png``. Both are read with PIL, resized
to 512x512 with PIL's default filter when their size differs, converted to RGB, and scored:
IDS (ArcFace cosine, official crop), LPIPS (VGG v0.1), fLPIPS (LPIPS of both images multiplied by a
parsing face mask), PSNR / SSIM / NIQE (pyiqa definitions), MUSIQ (pyiqa, KonIQ) and FID of the restored
files in clean mode against reference statistics (FFHQ trainval70k 512 in the paper) or the GT set.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from refface.evaluation import fid, identity, iqa, niqe
from refface.evaluation.iqa import unit_float
from refface.evaluation.parsing import face_mask
from refface.manifests.errors import ImageError

SIZE = (512, 512)


def read_official(path: str | os.PathLike, size: tuple[int, int] | None = SIZE) -> np.ndarray:
    """uint8 RGB as ``eval.py`` reads it: resize (PIL default filter) before the RGB conversion."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(str(path)) as img:
            img.load()
            if size is not None and img.size != size:
                img = img.resize(size)
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.array(img)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from e


def pair_flat(restored: Path, gt: Path, refs_csv: str | os.PathLike | None = None):
    """``eval.py``'s pairing: every ``*.png`` directly in ``restored`` with the same name in ``gt``.

    Returns:
        ``(pairs, missing)``: ``[(stem, restored_path, gt_path)]`` and the stems without a GT file.
    """
    names = sorted(p.name for p in restored.glob("*.png"))
    if refs_csv is not None:
        import pandas as pd

        df = pd.read_csv(refs_csv)
        column = "lq_image" if "lq_image" in df.columns else "gt_image"
        if column not in df.columns:
            raise ValueError(f"{refs_csv} has no 'gt_image' column (ReF-LDM reference CSV expected)")
        wanted = {Path(p).stem for p in df[column].astype(str)}
        names = [n for n in names if Path(n).stem in wanted]
    pairs = [(Path(n).stem, restored / n, gt / n) for n in names if (gt / n).is_file()]
    missing = [Path(n).stem for n in names if not (gt / n).is_file()]
    return pairs, missing


def _tensor(rgb: np.ndarray):
    return unit_float(rgb) * 2.0 - 1.0


def score_pair(models: Any, key: str, pred: np.ndarray, gt: np.ndarray, errors, path: str) -> dict:
    """One row of per-image metrics under the ReF-LDM protocol (unavailable metrics are left out)."""
    row: dict[str, Any] = {"key": key, "psnr": iqa.psnr(pred, gt), "ssim": iqa.ssim(pred, gt)}
    if models.arcface is not None:
        row["ids"] = identity.ids(models.arcface, pred, gt)
    if models.lpips is not None:
        row["lpips"] = float(models.lpips(_tensor(pred), _tensor(gt))[0])
        if models.parser is not None:
            try:
                mask = parsing_mask(models.parser, key, gt)
                row["flpips"] = float(models.lpips(_tensor(pred * mask), _tensor(gt * mask))[0])
            except (FileNotFoundError, ValueError) as e:
                errors.add(path, "evaluate/flpips", str(e))
    if models.niqe_params is not None:
        try:
            row["niqe"] = niqe.niqe(pred, models.niqe_params)
        except ValueError as e:
            errors.add(path, "evaluate/niqe", str(e))
    if models.musiq is not None:
        row["musiq"] = models.musiq(pred)
    return row


def parsing_mask(parser, key: str, gt: np.ndarray) -> np.ndarray:
    return face_mask(parser(key, gt))[..., None]


def set_fid(models: Any, restored_files: list[Path], gt_files: list[Path]) -> float:
    """FID of the restored files (as stored, clean mode) against the reference stats or the GT set."""
    if models.feature_net is None:
        return math.nan
    feats = fid.image_features([read_official(p, None) for p in restored_files], models.feature_net)
    mu, sigma = fid.statistics(feats)
    if models.fid_stats is not None:
        ref_mu, ref_sigma = models.fid_stats
    else:
        ref = fid.image_features([read_official(p, None) for p in gt_files], models.feature_net)
        ref_mu, ref_sigma = fid.statistics(ref)
    return fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
