"""Restore LQ faces with a trained ReF-LDM: a folder (+ references) or a ReF-LDM reference CSV -> PNGs."""

from __future__ import annotations

import ast
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refface.console import track
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import IMAGE_EXTENSIONS, list_images, read_image, write_png
from refface.manifests.root import DatasetRoot
from refface.seeding import item_seed
from refface.train.checkpoints import find_checkpoint
from refface.train.refldm.config import RefLDMConfig
from refface.train.refldm.model import RefLDMUNet
from refface.train.refldm.sampling import get_preset, restore, to_uint8
from refface.train.refldm.tasks import MODEL_DIR, build_vqgan_for, load_module_weights

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


def collect_items(input_path: Path, references: Path | None = None) -> list[RestoreItem]:
    """The images to restore and their references.

    ``input_path`` is a folder of LQ images or a ReF-LDM reference CSV (``lq_image`` — or ``gt_image``
    when there is no LQ column — and ``ref_image``; names resolve against ``references``, the CSV's
    folder and its ``lq``/``hq`` subfolders). With a folder, references come from ``references``: a
    CSV like the above, a subfolder per input (``<references>/<stem>/*``), or one file per input with
    the same name.
    """

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
        image_root = DatasetRoot(csv.parent).image_root()
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


def _load(path: Path, size: int, resize: str = "cv2") -> np.ndarray:
    return _resize(read_image(path), size, resize)


def _resize(img: np.ndarray, size: int, resize: str = "cv2") -> np.ndarray:
    """An RGB image at ``size x size``: ``pil`` resizes as the official script (PIL's default filter),
    ``cv2`` bicubic when enlarging and area when shrinking."""
    import cv2

    if img.shape[:2] == (size, size):
        return img
    if resize == "pil":
        from PIL import Image

        return np.asarray(Image.fromarray(img).resize((size, size)))
    return cv2.resize(
        img, (size, size), interpolation=cv2.INTER_CUBIC if img.shape[0] < size else cv2.INTER_AREA
    )


def initial_noise(keys: list[str], shape: tuple[int, ...], preset, seed: int, device: str):
    """The initial latents of a batch: per image from ``(seed, key)``, or the official single draw.

    The official script seeds the global generator and draws ``randn(1, C, h, w)`` on the sampling
    device; ``preset.noise == "seed"`` repeats that draw for every image.
    """
    import torch

    if preset.noise == "seed":
        draws = []
        for _ in keys:
            g = torch.Generator(device).manual_seed(seed)
            draws.append(torch.randn((1, *shape), generator=g, device=device)[0])
        return torch.stack(draws)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(item_seed(seed, k) >> 1)) for k in keys]
    )


class Restorer:
    """A loaded ReF-LDM with its sampling settings: restores aligned faces given as arrays.

    Args:
        checkpoint: see :func:`load_refldm`.
        preset: ``official`` or ``refface`` (:data:`refface.train.refldm.sampling.PRESETS`); default: the
            model's ``task.sampling_preset`` (``official`` for converted release weights).
        steps: DDIM steps (default: the preset's).
        guidance_scale: CFG scale (default: the preset's, else the training config's).
        seed: the preset's seed by default. ``official``: every image starts from the same draw, as the
            official script; ``refface``: each image's noise comes from ``(seed, key)``.
        device: torch device (default cuda when available).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        preset: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        device: str | None = None,
    ):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.unet, self.vq, self.cfg = load_refldm(checkpoint, self.device)
        self.preset = get_preset(preset or self.cfg.task.sampling_preset)
        self.steps = steps or self.preset.steps
        scale = guidance_scale if guidance_scale is not None else self.preset.guidance_scale
        self.guidance_scale = self.cfg.task.guidance_scale if scale is None else scale
        self.ref_encoding = self.preset.ref_encoding or self.cfg.task.ref_encoding
        self.seed = self.preset.seed if seed is None else seed

    @property
    def size(self) -> int:
        return self.cfg.data.resolution

    def load(self, path: Path) -> np.ndarray:
        """An image file at the model's size, resized as the preset says."""
        return _load(path, self.size, self.preset.resize)

    def resize(self, img: np.ndarray) -> np.ndarray:
        """An RGB array at the model's size, resized as the preset says."""
        return _resize(img, self.size, self.preset.resize)

    def __call__(
        self, lqs: list[np.ndarray], refs: list[list[np.ndarray]], keys: list[str]
    ) -> list[np.ndarray]:
        """Restore aligned LQ faces (uint8 RGB at the model's size), each with its references (up to 5)."""
        import torch

        device = self.device
        refs = [list(r[:MAX_REFS]) for r in refs]
        used = max((len(r) for r in refs), default=0)
        masks = [[True] * len(r) + [False] * (used - len(r)) for r in refs]
        padded = [r + [np.zeros_like(lq)] * (used - len(r)) for lq, r in zip(lqs, refs, strict=True)]

        def to_t(a):
            return torch.from_numpy(np.asarray(a)).to(device).float() / 127.5 - 1.0

        lq_t = to_t(np.stack(lqs)).permute(0, 3, 1, 2)
        ref_t, mask_t = None, None  # no references at all: the LQ-only model
        if used:
            ref_t = to_t(np.stack([np.stack(r) for r in padded])).permute(0, 1, 4, 2, 3)
            mask_t = torch.tensor(masks, device=device)
        h = self.size // self.cfg.vqgan.factor
        noise = initial_noise(keys, (self.cfg.unet.latent_channels, h, h), self.preset, self.seed, device)
        images = restore(
            self.unet,
            self.vq,
            lq_t,
            ref_t,
            mask_t,
            quantize=self.cfg.vqgan.quantize_on_decode,
            ref_encoding=self.ref_encoding,
            noise=self.cfg.noise,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            init_noise=noise,
            spacing=self.preset.spacing,
        )
        return list(to_uint8(images.cpu(), self.preset.to_uint8).numpy())


def restore_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    references: str | os.PathLike | None = None,
    preset: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> dict[str, int]:
    """Restore LQ faces with ReF-LDM (DDIM, η = 0, CFG toward the references) and write PNGs.

    Args:
        input_dir: folder of aligned LQ faces, or a ReF-LDM reference CSV (LQ + reference lists).
        output_dir: restored PNGs go to ``<output_dir>/<key>.png``; ``errors.csv`` lists failures.
        checkpoint: see :func:`load_refldm`.
        references: reference CSV, or folder (``<stem>/`` subfolders or same-named files).
        preset, steps, guidance_scale, seed, device: see :class:`Restorer`. Outputs do not depend on
            batching or on which images were already done.
        batch_size: images per sampling batch (default 4).

    Returns:
        Counts: ``restored``, ``skipped`` (already there), ``errors``.
    """
    out = Path(output_dir)
    items = collect_items(Path(input_dir), Path(references) if references else None)
    todo = [it for it in items if not (out / f"{it.key}.png").is_file()]
    errors = ErrorsTable()
    counts = {"restored": 0, "skipped": len(items) - len(todo), "errors": 0}
    if todo:
        restorer = Restorer(
            checkpoint, preset=preset, steps=steps, guidance_scale=guidance_scale, seed=seed, device=device
        )
        bs = batch_size or 4
        batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
        for batch in track(batches, "restoring (ReF-LDM)"):
            lqs, refs, keys = [], [], []
            for it in batch:
                try:
                    lq = restorer.load(it.lq)
                    ref_imgs = [restorer.load(r) for r in it.refs[:MAX_REFS]]
                except ImageError as e:
                    errors.add(str(it.lq), "restore", str(e))
                    continue
                lqs.append(lq)
                refs.append(ref_imgs)
                keys.append(it.key)
            if not keys:
                continue
            for key, img in zip(keys, restorer(lqs, refs, keys), strict=True):
                write_png(out / f"{key}.png", img)
                counts["restored"] += 1
    counts["errors"] = len(errors)
    if len(errors):
        errors.write(out, "errors")
    return counts
