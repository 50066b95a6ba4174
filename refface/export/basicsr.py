"""``refface export basicsr``: paired GT/LQ folders, ``meta_info`` files and BasicSR/GFPGAN options.

Layout of ``OUT``::

    train/gt/<key>.png                       HQ images of the train split (for HQ-only training)
    train/meta_info.txt
    <split>/<lq set>/gt/<key>.png            val/test targets of every degraded set ...
    <split>/<lq set>/lq/<key>.png            ... and their LQ images, paired by name
    <split>/<lq set>/meta_info.txt
    names.csv                                key -> path in the root, split, identity, references
    options.yml                              dataset blocks for BasicSR / GFPGAN option files

``key`` is the image path flattened into one file name (BasicSR pairs files by name in one folder).
Files are symbolic links to the root's images by default; a source that is not a PNG is decoded and
written as PNG so GT and LQ share the ``.png`` extension ``paired_paths_from_meta_info_file`` expects.
``--copy`` writes real files instead of links.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from refface.console import track
from refface.manifests.atomic import write_text
from refface.manifests.io import read_image, write_png
from refface.manifests.webdataset import sample_key, unique_keys

from .source import ExportSource, read_source


@dataclass(frozen=True)
class BasicSRExportConfig:
    """Settings of ``refface export basicsr``.

    Attributes:
        copy: write real files instead of symbolic links.
        out_size: ``out_size`` of the GFPGAN HQ-only block (the crops' side).
    """

    copy: bool = False
    out_size: int = 512


def flat_key(path: str) -> str:
    return sample_key(path)


def _place(source_file: Path, target: Path, copy: bool) -> tuple[int, int, int]:
    """Put ``source_file`` at ``target`` (PNG): a link when possible; returns (h, w, c)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    img = read_image(source_file)
    if source_file.suffix.lower() == ".png" and not copy:
        os.symlink(source_file.resolve(), target)
    elif source_file.suffix.lower() == ".png":
        target.write_bytes(source_file.read_bytes())
    else:
        write_png(target, img)
    h, w = img.shape[:2]
    return h, w, img.shape[2] if img.ndim == 3 else 1


def _meta_line(name: str, shape: tuple[int, int, int]) -> str:
    # BasicSR's meta_info format: "<file> (h,w,c)"; its readers keep the first field.
    return f"{name} ({shape[0]},{shape[1]},{shape[2]})\n"


def export_basicsr(root: str | Path, out: str | Path, config: BasicSRExportConfig | None = None) -> dict:
    """Write the BasicSR folders of a built root; returns a summary."""
    config = config or BasicSRExportConfig()
    source = read_source(root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names: list[dict] = []
    folders: dict[str, dict] = {}
    keys = _keys(source)
    if "train" in source.splits:
        rows = source.splits["train"]
        meta = []
        for path in track(
            [p for p, listed in zip(rows.paths, rows.listed, strict=True) if listed], "basicsr train"
        ):
            name = keys[path] + ".png"
            meta.append(
                _meta_line(name, _place(source.file_of(path), out / "train" / "gt" / name, config.copy))
            )
        write_text(out / "train" / "meta_info.txt", "".join(meta))
        folders["train"] = {
            "gt": out / "train" / "gt",
            "meta": out / "train" / "meta_info.txt",
            "n": len(meta),
        }
    for split, rows in source.splits.items():
        for path, ident, refs, listed in zip(rows.paths, rows.identity, rows.refs, rows.listed, strict=True):
            names.append(
                {
                    "key": keys[path],
                    "path": path,
                    "split": split,
                    "identity": ident,
                    "in_split_list": listed,
                    "references": " ".join(keys[r] for r in refs),
                }
            )
        if split == "train":
            continue
        for s in source.lq_sets:
            targets = [p for p, t in zip(rows.paths, rows.is_target, strict=True) if t and p in s.files]
            if not targets:
                continue
            base = out / split / s.name
            meta, scales = [], set()
            for path in track(targets, f"basicsr {split} {s.name}"):
                name = keys[path] + ".png"
                shape = _place(source.file_of(path), base / "gt" / name, config.copy)
                lq_shape = _place(s.folder / s.files[path], base / "lq" / name, config.copy)
                scales.add(shape[1] / lq_shape[1])
                meta.append(_meta_line(name, shape))
            write_text(base / "meta_info.txt", "".join(meta))
            scale = scales.pop() if len(scales) == 1 else None
            folders[f"{split}/{s.name}"] = {
                "gt": base / "gt",
                "lq": base / "lq",
                "meta": base / "meta_info.txt",
                "n": len(meta),
                "scale": int(scale) if scale and float(scale).is_integer() else 1,
            }
    write_text(out / "names.csv", pd.DataFrame(names).to_csv(index=False, lineterminator="\n"))
    write_text(out / "options.yml", options_yaml(folders, config))
    return {
        "out": str(out),
        **{f"{k} pairs" if k != "train" else "train HQ images": v["n"] for k, v in folders.items()},
        "options": str(out / "options.yml"),
        "links": not config.copy,
    }


def _keys(source: ExportSource) -> dict[str, str]:
    paths = sorted({p for rows in source.splits.values() for p in rows.paths})
    return dict(zip(paths, unique_keys(paths), strict=True))


def options_yaml(folders: dict[str, dict], config: BasicSRExportConfig) -> str:
    """Dataset blocks to paste into BasicSR / GFPGAN option files, pointing at the exported folders."""
    import yaml

    blocks: dict[str, dict] = {}
    if "train" in folders:
        blocks["train_hq_only"] = {
            "name": "refface-train",
            "type": "FFHQDegradationDataset",  # GFPGAN's: degrades HQ images on the fly
            "dataroot_gt": str(folders["train"]["gt"].resolve()),
            "io_backend": {"type": "disk"},
            "use_hflip": True,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "out_size": config.out_size,
            "blur_kernel_size": 41,
            "kernel_list": ["iso", "aniso"],
            "kernel_prob": [0.5, 0.5],
            "blur_sigma": [0.1, 10],
            "downsample_range": [0.8, 8],
            "noise_range": [0, 20],
            "jpeg_range": [60, 100],
            "color_jitter_prob": None,
            "color_jitter_pt_prob": None,
            "gray_prob": 0.01,
            "crop_components": False,
            "use_shuffle": True,
            "num_worker_per_gpu": 4,
            "batch_size_per_gpu": 4,
            "dataset_enlarge_ratio": 1,
            "prefetch_mode": None,
        }
    for key, f in folders.items():
        if key == "train":
            continue
        blocks["paired_" + key.replace("/", "_")] = {
            "name": f"refface-{key.replace('/', '-')}",
            "type": "PairedImageDataset",
            "dataroot_gt": str(f["gt"].resolve()),
            "dataroot_lq": str(f["lq"].resolve()),
            "meta_info_file": str(f["meta"].resolve()),
            "filename_tmpl": "{}",
            "io_backend": {"type": "disk"},
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "scale": f["scale"],
            "phase": "val",
        }
    head = (
        "# Dataset blocks for BasicSR / GFPGAN option files, written by `refface export basicsr`.\n"
        "# Copy one block under `datasets: train:` or `datasets: val:`. train_hq_only is GFPGAN's\n"
        "# FFHQDegradationDataset (HQ images, degraded on the fly, GFPGAN's published ranges); the\n"
        "# paired_* blocks are BasicSR's PairedImageDataset over the fixed LQ sets (scale = GT / LQ side).\n"
    )
    return head + yaml.safe_dump({"datasets": blocks}, sort_keys=False)
