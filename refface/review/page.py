"""``ROOT/review/``: the static identity review page (index.html + review.js/css + data.js + thumbs/).

Plain files opened from disk: no server, no build step. ``data.js`` sets ``window.REFFACE_REVIEW`` (a
script, not JSON fetched at run time, because browsers refuse ``fetch`` on ``file://``). Thumbnails are
small JPEGs of the aligned face, named by a hash of the image path and content, written once: a rerun
only writes the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from refface.manifests.atomic import write_bytes, write_text
from refface.manifests.io import read_image
from refface.manifests.layout import IMAGES
from refface.manifests.root import DatasetRoot
from refface.mining.align import ffhq_crop
from refface.stages import map_chunks

from .corrections import corrections_from_labels, format_corrections
from .data import ReviewConfig, clustered_identities, read_labels, review_data

REVIEW_DIR = "review"
THUMBS_DIR = "thumbs"
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = ("index.html", "review.js", "review.css")
LABEL_CORRECTIONS = "corrections_from_labels.csv"


def thumb_name(path: str, sha256: str) -> str:
    return hashlib.sha1(f"{path}\0{sha256}".encode()).hexdigest()[:20] + ".jpg"


def make_thumb(source: str, landmarks: list[float] | None, size: int) -> bytes:
    """JPEG bytes of the aligned face (FFHQ crop from the landmarks) or of the whole image."""
    import io

    import cv2
    from PIL import Image

    img = read_image(source)
    if landmarks is not None and len(landmarks) == 10:
        face = ffhq_crop(img, np.asarray(landmarks, dtype=np.float64).reshape(5, 2), size)
    else:
        h, w = img.shape[:2]
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        face = cv2.resize(img[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="JPEG", quality=82)
    return buf.getvalue()


def _thumb_chunk(items: list[tuple[str, list[float] | None, str, int]]) -> list[str]:
    """Write one chunk of thumbnails; returns ``path\\treason`` for each that failed."""
    errors = []
    for source, landmarks, target, size in items:
        try:
            write_bytes(target, make_thumb(source, landmarks, size))
        except Exception as e:  # noqa: BLE001 - any unreadable image becomes a grey tile and an error line
            errors.append(f"{source}\t{type(e).__name__}: {e}")
    return errors


def write_thumbs(
    root: Path, paths: list[str], out: Path, config: ReviewConfig
) -> tuple[list[str], list[str]]:
    """Thumbnail file names (relative to the page) for ``paths``; writes the missing ones."""
    image_root = DatasetRoot(root).image_root() or root
    sha: dict[str, str] = {}
    if (root / IMAGES).exists():
        images = pd.read_parquet(root / IMAGES)
        if "sha256" in images.columns:
            sha = dict(zip(images["path"].astype(str), images["sha256"].astype(str), strict=True))
    landmarks: dict[str, list[float]] = {}
    if (root / "faces.parquet").exists():
        faces = pd.read_parquet(root / "faces.parquet").drop_duplicates("path")
        if "lm" in faces.columns:
            landmarks = {
                str(p): [float(v) for v in lm] for p, lm in zip(faces["path"], faces["lm"], strict=True)
            }
    size = config.thumb_size
    names = [f"{THUMBS_DIR}/{thumb_name(p, sha.get(p, ''))}" for p in paths]
    todo = [
        (str(image_root / p), landmarks.get(p), str(out / name), size)
        for p, name in zip(paths, names, strict=True)
        if not (out / name).exists()
    ]
    errors: list[str] = []
    if todo:
        (out / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
        chunks = map_chunks(_thumb_chunk, todo, 64, config.workers, "thumbnails")
        errors = [e for part in chunks for e in part]
    return names, errors


def write_review(root: str | Path, config: ReviewConfig | None = None, out: str | Path | None = None) -> dict:
    """Write the review page of a built root into ``out`` (default ``ROOT/review``).

    Returns:
        A summary: page path, faces, identities, flagged faces, possible-same-person pairs, near
        singletons, thumbnails written, thumbnail errors.
    """
    config = config or ReviewConfig()
    root = Path(root)
    out = Path(out) if out is not None else root / REVIEW_DIR
    out.mkdir(parents=True, exist_ok=True)
    data = review_data(root, config)
    before = len(list((out / THUMBS_DIR).glob("*.jpg"))) if (out / THUMBS_DIR).exists() else 0
    names, errors = write_thumbs(root, data["paths"], out, config)
    data["thumbs"] = names
    data["thumb_errors"] = errors
    data["thumb_size"] = config.thumb_size
    write_text(out / "data.js", "window.REFFACE_REVIEW = " + json.dumps(data, separators=(",", ":")) + ";\n")
    for name in STATIC_FILES:
        shutil.copyfile(STATIC / name, out / name)
    extra = {}
    if config.labels:
        rows = corrections_from_labels(clustered_identities(root), read_labels(config.labels, root))
        write_text(out / LABEL_CORRECTIONS, format_corrections(rows))
        extra = {"corrections from labels": f"{len(rows)} rows in {out / LABEL_CORRECTIONS}"}
    pairs = {tuple(sorted((c["id"], other))) for c in data["clusters"] for other, _ in c["near"]}
    after = len(list((out / THUMBS_DIR).glob("*.jpg"))) if (out / THUMBS_DIR).exists() else 0
    return {
        "page": str(out / "index.html"),
        "faces": len(data["paths"]),
        "identities": len(data["clusters"]),
        "flagged faces": int(sum(data["flagged"])),
        "possible same person pairs": len(pairs),
        "singletons near a cluster": sum(len(c["singletons"]) for c in data["clusters"]),
        "identities holding two or more labels": sum(len(c["labels"]) > 1 for c in data["clusters"]),
        "thumbnails written": after - before,
        "thumbnail errors": len(errors),
        **extra,
    }
