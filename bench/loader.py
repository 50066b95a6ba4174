"""Training input speed: samples/s per CPU core of the full pipeline at 512², and shard write MB/s vs a file copy.

A dataset root of 512x512 PNG faces (the shared LFW photos upscaled, else synthetic images) with
identities of ``--per-id`` images, every image a target whose references are the other images of
its identity. Figures, measured side by side in one run:

- loader: samples/s of ``make_refldm_dataloader`` in one process (``num_workers=0``, one core):
  read shard, decode target + 5 references, reference augmentation, flips, on-the-fly LQ with
  ``refldm-train``; plus the same pipeline without the degradation and the decode-only floor.
- writer: MB/s of ``write_shards`` against a plain sequential copy of the same source files into
  one file on the same disk (both fsync'ed), as a ratio.

    .venv/bin/python bench/loader.py [--images 60] [--per-id 6] [--samples 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Per-core figures: every thread pool (BLAS, OpenMP, OpenCV, torch) limited to one thread, as in
# one DataLoader worker per core; set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("REFFACE_PROGRESS", "0")

RESULTS = Path(__file__).resolve().parent / "results"
FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "lfw"


def build_root(root: Path, n_images: int, per_id: int, size: int = 512) -> tuple[Path, list[Path], str]:
    """A dataset root of ``n_images`` PNG crops in identities of ``per_id``; returns (root, files, source)."""
    import cv2
    import pandas as pd

    from refface.manifests.io import encode_png, read_image

    faces = sorted(FACES.glob("*/*.jpg")) if FACES.exists() else []
    source = "shared LFW photos upscaled to 512" if len(faces) >= n_images else "synthetic"
    rng = np.random.default_rng(0)
    images = root / "images"
    rows, files = [], []
    for i in range(n_images):
        ident = i // per_id
        rel = f"id{ident:04d}/img{i % per_id}.png"
        if source == "synthetic":
            yy, xx = np.mgrid[0:size, 0:size] / size
            base = np.stack([np.sin(xx * (3 + i % 5)), np.cos(yy * (2 + i % 7)), xx * yy], -1) * 100 + 128
            img = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        else:
            img = cv2.resize(read_image(faces[i]), (size, size), interpolation=cv2.INTER_CUBIC)
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(encode_png(img))
        rows.append((rel, ident))
        files.append(images / rel)
    (root / "build.json").write_text(json.dumps({"image_root": "images"}))
    refs = [(p, repr([q for q, j in rows if j == i and q != p])) for p, i in rows]
    pd.DataFrame(refs, columns=["gt_image", "ref_image"]).to_csv(root / "train_references.csv", index=False)
    return root, files, source


def copy_baseline(files: list[Path], target: Path) -> tuple[float, int]:
    """Seconds and bytes to copy ``files`` sequentially into one file (the disk's plain write speed)."""
    start = time.perf_counter()
    total = 0
    with open(target, "wb") as out:
        for f in files:
            with open(f, "rb") as src:
                total += out.write(src.read())
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - start, total


def time_shard_write(root: Path, out: Path, codec: str) -> tuple[float, int]:
    import webdataset  # noqa: F401 - its import (it pulls torch) is a one-off cost, not write speed

    from refface.builders.shards import ShardsConfig, write_shards

    start = time.perf_counter()
    result = write_shards(root, out, ShardsConfig(codec=codec, shard_bytes=200_000_000), force=True)
    for tar in out.glob("*.tar"):
        with open(tar, "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - start, result["bytes"]


def time_loader(shards: Path, samples: int, degrade: bool, augment: bool) -> float:
    """Samples/s of the ReF-LDM training loader in this process (one core)."""
    from refface.manifests.webdataset import ShardError  # noqa: F401 - import cost outside the timing
    from refface.train import loaders, samplers

    loader = loaders.make_refldm_dataloader(
        shards, batch_size=1, num_workers=0, resolution=512, num_refs=5, seed=0, samples_per_epoch=samples
    )
    # Variants switch stages off by replacing them in the freshly reloaded module.
    if not degrade:
        samplers.LazyDegrader.__call__ = lambda self, img, key: img  # decode + augment only
    if not augment:
        samplers.augment_reference = lambda img, rng, aug=None: img
    it = iter(loader)
    next(it)  # warm-up: imports, first shard open
    start = time.perf_counter()
    n = 0
    for _batch in it:
        n += 1
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60, help="images in the bench root (all are targets)")
    parser.add_argument("--per-id", type=int, default=6, help="images per identity (refs = the others)")
    parser.add_argument("--samples", type=int, default=96, help="samples timed per loader figure")
    parser.add_argument("--codec", default="png", choices=["png", "jpeg", "webp"])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader.json")
    args = parser.parse_args(argv)
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    import importlib

    from refface.degradations import make_degrader

    try:
        make_degrader("refldm-train", 0, 512)
        have_degrader = True
    except ImportError as e:
        print(f"note: {e}; the full-pipeline figure is left out")
        have_degrader = False

    work = Path(tempfile.mkdtemp(prefix="refface-bench-loader-", dir=args.workdir))
    try:
        root, files, source = build_root(work / "root", args.images, args.per_id)
        copy_s, copy_bytes = copy_baseline(files, work / "copy.bin")
        write_s, shard_bytes = time_shard_write(root, work / "shards", args.codec)
        copy_mbs = copy_bytes / 1e6 / copy_s
        write_mbs = shard_bytes / 1e6 / write_s
        figures = {}
        # Each variant runs in a fresh module state (the variants patch stages out).
        import refface.train.loaders as loaders_module
        import refface.train.samplers as samplers_module

        for name, degrade, augment in (
            ("full (decode + 5 refs + augment + degrade)", True, True),
            ("no degrade (decode + 5 refs + augment)", False, True),
            ("decode only (target + 5 refs)", False, False),
        ):
            if degrade and not have_degrader:
                continue
            importlib.reload(samplers_module)
            importlib.reload(loaders_module)
            figures[name] = round(time_loader(work / "shards", args.samples, degrade, augment), 2)
        importlib.reload(samplers_module)
        importlib.reload(loaders_module)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = {
        "bench": "loader",
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "input": f"{args.images} images 512x512 PNG ({source}), {args.per_id} per identity",
        "loader_samples_per_s_per_core": figures,
        "writer": {
            "codec": args.codec,
            "shard_MB_per_s": round(write_mbs, 1),
            "copy_MB_per_s": round(copy_mbs, 1),
            "ratio_shards_to_copy": round(write_mbs / copy_mbs, 3),
            "shard_bytes": shard_bytes,
            "source_bytes": copy_bytes,
        },
        "degrader": have_degrader,
        # The box is shared: the load at the end tells how much other work ran beside the bench.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    from refface.manifests.atomic import write_json, write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    lines = [
        "# Training input speed (bench/loader.py)",
        "",
        f"Device: {out['device']}, load average {out['load_average_1m_at_end']} at the end of the run. "
        f"Input: {out['input']}.",
        "",
        "| loader (ReF-LDM, 512², 1 process) | samples/s per core |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in figures.items()],
        "",
        f"Shard write ({args.codec}): {out['writer']['shard_MB_per_s']} MB/s; plain sequential copy of the "
        f"same files: {out['writer']['copy_MB_per_s']} MB/s; ratio {out['writer']['ratio_shards_to_copy']} "
        "(MB/s of bytes written; the shards hold each image once as a target and again as a reference).",
    ]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
