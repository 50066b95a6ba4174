"""Restore LQ faces with a trained ReF-LDM: a folder (+ references) or a ReF-LDM reference CSV -> PNGs."""

from __future__ import annotations

import ast
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MAX_REFS = 5


@dataclass
class RestoreItem:
    """One image to restore: its output key (relative path without extension), LQ file and references."""

    key: str
    lq: Path
    refs: list[Path] = field(default_factory=list)


def load_refldm(checkpoint: str | os.PathLike, device: str = "cpu"):
    """Load ``(unet, vqgan, config)`` from a training output.

    Args:
        checkpoint: an exported model folder (``<output>/refldm/model`` with ``unet/`` and ``vqgan/``),
            a stage folder (``<output>/refldm``: its ``model/`` when present, else its latest
            checkpoint), or one checkpoint folder (``.../checkpoints/step_N``, EMA weights preferred).

    Raises:
        FileNotFoundError: nothing loadable there; the message says what was expected.
    """
    from diffusers import VQModel

    from refface.train.loop import find_checkpoint
    from refface.train.refldm.model import RefLDMUNet
    from refface.train.refldm.train import (
        MODEL_DIR,
        RefLDMConfig,
        build_vqgan_for,
        load_module_weights,
    )

    path = Path(checkpoint)
    if (path / "refldm").is_dir() and not (path / "state.json").is_file():
        path = path / "refldm"  # the run folder given: use its stage C
    if (path / MODEL_DIR / "unet" / "config.json").is_file():
        path = path / MODEL_DIR
    if (path / "unet" / "config.json").is_file():
        meta = json.loads((path / "refldm.json").read_text()) if (path / "refldm.json").is_file() else {}
        cfg = RefLDMConfig.from_dict(meta.get("config", {}))
        unet = RefLDMUNet.from_pretrained(path / "unet")
        vq = VQModel.from_pretrained(path / "vqgan")
    else:
        ckpt = path if (path / "state.json").is_file() else find_checkpoint(path, "latest")
        if ckpt is None:
            raise FileNotFoundError(
                f"no ReF-LDM model in {path}: expected an exported 'model/' folder (unet/, vqgan/) or a "
                "training folder with checkpoints/step_N/state.json"
            )
        meta = json.loads((ckpt / "state.json").read_text())
        cfg = RefLDMConfig.from_dict(meta["task"])
        if cfg.task.stage == "vqgan":
            raise ValueError(
                f"{ckpt} is a stage A (autoencoder) checkpoint; restore needs stage ldm or refldm"
            )
        unet = RefLDMUNet.from_unet_config(cfg.unet)
        load_module_weights(ckpt, "unet", unet)
        vq = build_vqgan_for(cfg)
    unet.to(device).eval().requires_grad_(False)
    vq.to(device).eval().requires_grad_(False)
    return unet, vq, cfg


def _ref_list(cell) -> list[str]:
    """ReF-LDM CSV's ``ref_image`` cell: a Python-list string like ``['01234.png', '05678.png']``."""
    if isinstance(cell, str) and cell.strip().startswith("["):
        return [str(x) for x in ast.literal_eval(cell)]
    return [] if cell is None or (isinstance(cell, float) and np.isnan(cell)) else [str(cell)]


def _resolve(name: str, roots: list[Path]) -> Path:
    for root in roots:
        if (root / name).is_file():
            return root / name
    return roots[0] / name


def _dataset_image_root(folder: Path) -> Path | None:
    """The ``image_root`` a dataset root's ``build.json`` records, if ``folder`` is one."""
    import json

    build = folder / "build.json"
    if not build.is_file():
        return None
    root = json.loads(build.read_text()).get("image_root")
    return Path(root) if root else None


def collect_items(input_path: Path, references: Path | None = None) -> list[RestoreItem]:
    """The images to restore and their references.

    ``input_path`` is a folder of LQ images or a ReF-LDM reference CSV (``lq_image`` — or ``gt_image``
    when there is no LQ column — and ``ref_image``; names resolve against ``references``, the CSV's
    folder and its ``lq``/``hq`` subfolders). With a folder, references come from ``references``: a
    CSV like the above, a subfolder per input (``<references>/<stem>/*``), or one file per input with
    the same name.
    """
    from refface.manifests.io import IMAGE_EXTENSIONS, list_images

    def from_csv(csv: Path, lq_root: Path | None) -> list[RestoreItem]:
        import pandas as pd

        df = pd.read_csv(csv)
        lq_col = "lq_image" if "lq_image" in df.columns else "gt_image"
        if lq_col not in df.columns or "ref_image" not in df.columns:
            raise ValueError(
                f"{csv} needs columns lq_image (or gt_image) and ref_image (ReF-LDM reference CSV)"
            )
        roots = [r for r in (references if references and references.is_dir() else None, csv.parent) if r]
        # A CSV inside a built dataset root names images relative to the root's image folder.
        image_root = _dataset_image_root(csv.parent)
        if image_root is not None:
            roots.append(image_root)
        lq_roots = ([lq_root] if lq_root else []) + roots + [csv.parent / "lq"]
        ref_roots = roots + [csv.parent / "hq", csv.parent / "gt"]
        items = []
        for lq_name, refs in zip(df[lq_col].astype(str), df["ref_image"], strict=True):
            items.append(
                RestoreItem(
                    key=str(Path(lq_name).with_suffix("")),
                    lq=_resolve(lq_name, lq_roots),
                    refs=[_resolve(r, ref_roots) for r in _ref_list(refs)],
                )
            )
        return items

    if input_path.is_file() and input_path.suffix.lower() == ".csv":
        return from_csv(input_path, None)
    if not input_path.is_dir():
        raise FileNotFoundError(f"input not found: {input_path} (a folder of LQ images or a reference CSV)")
    if references is not None and references.suffix.lower() == ".csv":
        return from_csv(references, input_path)
    items = []
    for rel in list_images(input_path):
        stem = str(Path(rel).with_suffix(""))
        refs: list[Path] = []
        if references is not None:
            sub = references / stem
            parent = references / Path(rel).parent
            if sub.is_dir():
                refs = [sub / p for p in list_images(sub)]
            elif parent.is_dir():
                refs = sorted(
                    p for p in parent.glob(f"{Path(rel).stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS
                )
        items.append(RestoreItem(stem, input_path / rel, refs))
    return items


def _load(path: Path, size: int) -> np.ndarray:
    import cv2

    from refface.manifests.io import read_image

    img = read_image(path)
    if img.shape[:2] != (size, size):
        img = cv2.resize(
            img, (size, size), interpolation=cv2.INTER_CUBIC if img.shape[0] < size else cv2.INTER_AREA
        )
    return img


def restore_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    references: str | os.PathLike | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, int]:
    """Restore LQ faces with ReF-LDM (DDIM, η = 0, CFG toward the references) and write PNGs.

    Args:
        input_dir: folder of aligned LQ faces, or a ReF-LDM reference CSV (LQ + reference lists).
        output_dir: restored PNGs go to ``<output_dir>/<key>.png``; ``errors.csv`` lists failures.
        checkpoint: see :func:`load_refldm`.
        references: reference CSV, or folder (``<stem>/`` subfolders or same-named files).
        steps: DDIM steps (default 100).
        guidance_scale: CFG scale (default: the training config's, 1.5).
        batch_size: images per sampling batch (default 4).
        seed: base seed; each image's noise comes from ``(seed, key)``, so outputs do not depend on
            batching or on which images were already done.
        device: torch device (default cuda when available).

    Returns:
        Counts: ``restored``, ``skipped`` (already there), ``errors``.
    """
    import torch

    from refface.console import track
    from refface.manifests.errors import ErrorsTable, ImageError
    from refface.manifests.io import write_png
    from refface.seeding import item_seed
    from refface.train.refldm.sampling import restore

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(output_dir)
    items = collect_items(Path(input_dir), Path(references) if references else None)
    todo = [it for it in items if not (out / f"{it.key}.png").is_file()]
    errors = ErrorsTable()
    counts = {"restored": 0, "skipped": len(items) - len(todo), "errors": 0}
    if todo:
        unet, vq, cfg = load_refldm(checkpoint, device)
        size = cfg.data.resolution
        factor = cfg.vqgan.factor
        scale = cfg.task.guidance_scale if guidance_scale is None else guidance_scale
        bs = batch_size or 4
        batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
        for batch in track(batches, "restoring (ReF-LDM)"):
            lqs, refs, masks, keys = [], [], [], []
            for it in batch:
                try:
                    lq = _load(it.lq, size)
                    ref_imgs = [_load(r, size) for r in it.refs[:MAX_REFS]]
                except ImageError as e:
                    errors.add(str(it.lq), "restore", str(e))
                    continue
                pad = MAX_REFS - len(ref_imgs)
                masks.append([True] * len(ref_imgs) + [False] * pad)
                ref_imgs += [np.zeros_like(lq)] * pad
                lqs.append(lq)
                refs.append(np.stack(ref_imgs))
                keys.append(it.key)
            if not keys:
                continue

            def to_t(a):
                return torch.from_numpy(np.asarray(a)).to(device).float() / 127.5 - 1.0

            lq_t = to_t(np.stack(lqs)).permute(0, 3, 1, 2)
            ref_t = to_t(np.stack(refs)).permute(0, 1, 4, 2, 3)
            mask_t = torch.tensor(masks, device=device)
            if not bool(mask_t.any()):
                ref_t, mask_t = None, None  # no references at all: the LQ-only model
            h = size // factor
            noise = torch.stack(
                [
                    torch.randn(
                        cfg.unet.latent_channels,
                        h,
                        h,
                        generator=torch.Generator().manual_seed(item_seed(seed, k) >> 1),
                    )
                    for k in keys
                ]
            )
            images = restore(
                unet,
                vq,
                lq_t,
                ref_t,
                mask_t,
                quantize=cfg.vqgan.quantize_on_decode,
                noise=cfg.noise,
                steps=steps or 100,
                guidance_scale=scale,
                init_noise=noise,
            )
            arr = ((images.cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
            for key, img in zip(keys, arr, strict=True):
                write_png(out / f"{key}.png", img)
                counts["restored"] += 1
    counts["errors"] = len(errors)
    if len(errors):
        errors.write(out, "errors")
    return counts
