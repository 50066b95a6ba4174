"""FFHQ-aligned crops for builds from ordinary photos, and the flat 512 px GT folders of val/test sets.

ReF-LDM's loaders read every image at 512x512 (stretching whatever they get) and its inference and eval
scripts save and look up flat ``<stem>.png`` names. So a build from photos that are not FFHQ-aligned
writes ``aligned/<unique stem>.png`` crops (facexlib's FFHQ template, ``--crop-size`` px) and its CSVs
point at them; a photo whose detected landmarks already sit on the template (an FFHQ-aligned square
image) is only resized, not warped. Val/test targets also get ``gt512/<unique stem>.png``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.manifests.atomic import file_digest, sha256_file, write_bytes, write_parquet
from refface.manifests.embeddings import Embeddings, embeddings_digest, save_embeddings
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import read_image, write_png
from refface.manifests.references import read_references
from refface.manifests.root import DatasetRoot
from refface.mining.align import ffhq_crop, ffhq_template
from refface.stages import map_chunks, run_stage

ALIGNED_DIR = "aligned"
MINED_DIR = "mined"
GT_DIR = "gt512"
EVAL_SIZE = 512
# Landmarks within this fraction of the side from facexlib's FFHQ template count as already aligned.
ALIGNED_TOLERANCE = 0.03


def unique_stems(paths: list[str]) -> dict[str, str]:
    """A flat, unique file stem per relative path: its own stem, or the path joined by ``__`` on a clash."""
    counts = Counter(Path(p).stem for p in paths)
    out = {}
    for p in paths:
        stem = Path(p).stem
        out[p] = stem if counts[stem] == 1 else Path(p).with_suffix("").as_posix().replace("/", "__")
    if len(set(out.values())) != len(out):
        raise ValueError("image paths do not map to unique flat names")
    return out


def eval_names(targets: list[str]) -> dict[str, str]:
    """``<unique stem>.png`` of each val/test target: its LQ file, its flat GT file and its result's name."""
    return {p: f"{s}.png" for p, s in unique_stems(sorted(set(targets))).items()}


def is_ffhq_aligned(landmarks: np.ndarray, width: int, height: int, tol: float = ALIGNED_TOLERANCE) -> bool:
    """Whether a square image's five landmarks already sit on the FFHQ template at its size."""
    if width != height:
        return False
    return bool(np.abs(np.asarray(landmarks).reshape(5, 2) - ffhq_template(width)).max() < tol * width)


def _align_chunk(items: list[tuple[str, list[float], str, int]]) -> list[str]:
    """(source, 10 landmark floats, target, size) -> errors; aligned sources are resized, others warped."""
    import cv2

    errors = []
    for src, lm, dst, size in items:
        try:
            img = read_image(src)
            lm5 = np.asarray(lm, dtype=np.float64).reshape(5, 2)
            if is_ffhq_aligned(lm5, img.shape[1], img.shape[0]):
                shrink = img.shape[0] > size
                out = cv2.resize(
                    img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
                )
            else:
                out = ffhq_crop(img, lm5, size)
            write_png(dst, out)
        except (ImageError, ValueError) as e:
            errors.append(f"{src}\t{e}")
    return errors


def align_stage(image_root: Path, root: Path, config: Any) -> tuple[dict, bool]:
    """``aligned/<stem>.png`` crops of every mined face, with the mined tables carried over to their names.

    Writes ``images.parquet``, ``faces.parquet`` (template landmarks), ``sources.parquet`` (crop ->
    source photo, ``prealigned``), the embeddings under the crop names and the errors table.
    """
    import shutil

    mined = root / MINED_DIR

    def work() -> dict:
        emb, paths, vectors = DatasetRoot(mined).embeddings_by_path()
        faces = pd.read_parquet(mined / "faces.parquet").drop_duplicates("path").set_index("path")
        images = pd.read_parquet(mined / "images.parquet").drop_duplicates("path").set_index("path")
        names = {p: f"{s}.png" for p, s in unique_stems(paths).items()}
        out_dir = root / ALIGNED_DIR
        if out_dir.exists():  # crops of an earlier configuration must not linger
            shutil.rmtree(out_dir)
        lm = {p: [float(v) for v in np.ravel(faces.loc[p, "lm"])] for p in paths}
        items = [(str(image_root / p), lm[p], str(out_dir / names[p]), config.crop_size) for p in paths]
        errors = [e for part in map_chunks(_align_chunk, items, 16, config.workers, "aligning") for e in part]
        failed = {e.split("\t")[0] for e in errors}
        keep = [i for i, p in enumerate(paths) if str(image_root / p) not in failed]
        kept = [paths[i] for i in keep]
        out_names = [names[p] for p in kept]
        size = config.crop_size
        prealigned = [
            is_ffhq_aligned(np.asarray(lm[p]), int(images.loc[p, "width"]), int(images.loc[p, "height"]))
            if {"width", "height"} <= set(images.columns)
            else False
            for p in kept
        ]
        write_parquet(
            root / "images.parquet",
            pd.DataFrame(
                {
                    "path": out_names,
                    "sha256": [sha256_file(out_dir / n) for n in out_names],
                    "width": size,
                    "height": size,
                }
            ),
        )
        template = ffhq_template(size).astype(np.float64).ravel().tolist()
        write_parquet(root / "faces.parquet", pd.DataFrame({"path": out_names, "lm": [template] * len(kept)}))
        write_parquet(
            root / "sources.parquet",
            pd.DataFrame({"path": out_names, "source": kept, "prealigned": prealigned}),
        )
        save_embeddings(
            root,
            Embeddings(
                vectors=vectors[keep],
                paths=out_names,
                model=emb.model,
                fingerprint=emb.fingerprint,
                metric=emb.metric,
                identity_threshold=emb.identity_threshold,
                tta=emb.tta,
            ),
        )
        table = ErrorsTable.read(mined)
        for e in errors:
            src, reason = e.split("\t", 1)
            table.add(src, "align", f"crop failed: {reason}")
        table.write(root)
        return {
            "outputs": [
                "images.parquet",
                "faces.parquet",
                "sources.parquet",
                "embeddings.npy",
                "errors.parquet",
            ],
            "crops": len(kept),
            "prealigned": int(sum(prealigned)),
            "failed": len(failed),
        }

    inputs = {"embeddings": embeddings_digest(mined), "faces": file_digest(mined, "faces.parquet")}
    return run_stage(root, "align", {"crop_size": config.crop_size}, inputs, work)


def gt_folder_stage(root: Path, image_root: Path) -> tuple[dict, bool]:
    """``gt512/<unique stem>.png``: every val/test target at 512x512 (PIL bicubic when resized, RGB)."""
    csvs = [f"{s}_references.csv" for s in ("val", "test")]

    def work() -> dict:
        from PIL import Image

        targets: list[str] = []
        for name in csvs:
            if (root / name).exists():
                targets += [str(p) for p in read_references(root / name)["gt_image"]]
        out_dir = root / GT_DIR
        if out_dir.exists():  # targets of an earlier split must not linger
            import shutil

            shutil.rmtree(out_dir)
        written = 0
        for rel, name in eval_names(targets).items():
            dst = out_dir / name
            src = image_root / rel
            with Image.open(src) as img:
                if img.size == (EVAL_SIZE, EVAL_SIZE) and img.format == "PNG" and img.mode == "RGB":
                    write_bytes(dst, src.read_bytes())
                else:
                    import io

                    out = img.convert("RGB").resize((EVAL_SIZE, EVAL_SIZE), Image.Resampling.BICUBIC)
                    buf = io.BytesIO()
                    out.save(buf, format="PNG")
                    write_bytes(dst, buf.getvalue())
            written += 1
        return {"outputs": [GT_DIR], "images": written}

    inputs = {n: file_digest(root, n) for n in csvs}
    return run_stage(root, "gt512", {"size": EVAL_SIZE, "image_root": str(image_root)}, inputs, work)
