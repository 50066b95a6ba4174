"""Whole-photo restoration: detect and align every face, restore it with ReF-LDM, paste it back.

Each face is aligned to the FFHQ template (refface.mining's detectors and ``similarity_matrix``),
restored at the model's size with its references, warped back with the inverse affine and
blended in under a soft mask. Pixels outside every face's mask keep their exact input values.
In a photo of several people each reference goes to the face it resembles most (identity
embeddings), so one person's references never reshape a stranger's face.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refface.console import track
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import list_images, read_image, write_png
from refface.mining.align import FFHQ_BORDER_VALUE, ffhq_template, similarity_matrix, warp
from refface.mining.detect import PrealignedDetector, detect, make_detector
from refface.mining.embed import make_embedder
from refface.mining.tta import DEFAULT_TTA, check_tta
from refface.train.refldm.restore import MAX_REFS, Restorer

logger = logging.getLogger(__name__)

# How references reach the faces of a photo: ``nearest`` gives each reference to the face it is
# most like (identity embeddings), ``all`` gives every face every reference.
REF_MATCH = ("nearest", "all")
# Faces and references are aligned at least this large for matching, whatever the model's size.
MATCH_SIZE = 256


@dataclass
class AlignedFace:
    """One face of a photo: its FFHQ-aligned crop and the (2, 3) matrix photo -> crop."""

    crop: np.ndarray
    matrix: np.ndarray
    bbox: np.ndarray


def align_faces(img: np.ndarray, faces, size: int) -> list[AlignedFace]:
    """FFHQ-aligned ``size`` crops of every detected face (``refface.mining.detect.Face`` list)."""
    out = []
    for face in faces:
        m = similarity_matrix(np.asarray(face.landmarks, dtype=np.float64), ffhq_template(size))
        out.append(AlignedFace(warp(img, m, size, FFHQ_BORDER_VALUE), m, np.asarray(face.bbox)))
    return out


def soft_mask(size: int, edge: int | None = None) -> np.ndarray:
    """A ``size x size`` float mask: 1 inside, falling smoothly to 0 over ``edge`` pixels at the border."""
    import cv2

    edge = edge or max(2, size // 24)
    mask = np.zeros((size, size), np.float32)
    mask[edge:-edge, edge:-edge] = 1.0
    k = 2 * (edge // 2) + 1
    mask = cv2.GaussianBlur(mask, (k, k), 0).astype(np.float32, copy=False)
    mask[:1], mask[-1:], mask[:, :1], mask[:, -1:] = 0, 0, 0, 0
    return mask


def paste_back(
    img: np.ndarray, restored: list[np.ndarray], faces: list[AlignedFace]
) -> tuple[np.ndarray, np.ndarray]:
    """Blend each restored crop into ``img`` through the inverse of its alignment.

    Returns:
        The new photo (uint8, same size) and the union of the soft masks (float, photo size): pixels
        where it is 0 are the input's, unchanged.
    """
    import cv2

    h, w = img.shape[:2]
    out = img.astype(np.float32)
    union = np.zeros((h, w), np.float32)
    for crop, face in zip(restored, faces, strict=True):
        size = crop.shape[0]
        inv = cv2.invertAffineTransform(face.matrix)
        pasted = cv2.warpAffine(crop, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        mask = cv2.warpAffine(soft_mask(size), inv, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
        mask = np.clip(mask, 0.0, 1.0)
        m = mask[..., None]
        out = np.where(m > 0, out * (1.0 - m) + pasted.astype(np.float32) * m, out)
        union = np.maximum(union, mask)
    result = np.where(union[..., None] > 0, np.clip(np.rint(out), 0, 255), img).astype(np.uint8)
    return result, union


def reference_crops(paths: list[Path], detector, size: int) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """FFHQ-aligned crops of reference photos: the main face of each (aligned or not).

    A square image where no face is found is taken as already aligned. Returns the crops and
    ``(path, reason)`` for the references that could not be used.
    """
    crops, bad = [], []
    for path in paths:
        try:
            img = read_image(path)
        except ImageError as e:
            bad.append((str(path), str(e)))
            continue
        try:
            face = detect(detector, img).face
        except ImageError:
            if img.shape[0] == img.shape[1]:
                crops.append(img)
                continue
            bad.append((str(path), "no face found in the reference"))
            continue
        crops.append(align_faces(img, [face], size)[0].crop)
    return crops, bad


def embed_aligned(embedder, crops: list[np.ndarray]) -> np.ndarray:
    """(N, D) unit identity vectors of FFHQ-aligned crops (their landmarks are the template's)."""
    aligned = PrealignedDetector()
    return embedder.embed_crops([embedder.crop(c, aligned(c)[0]) for c in crops])[0]


def assign_references(face_vectors: np.ndarray, ref_vectors: np.ndarray) -> list[list[int]]:
    """For each face, the indices of the references that resemble it more than any other face
    of the photo (cosine similarity of unit vectors; a tie goes to the first face)."""
    n_faces = len(face_vectors)
    if n_faces == 0:
        return []
    owner = np.argmax(np.asarray(ref_vectors) @ np.asarray(face_vectors).T, axis=1)
    return [np.flatnonzero(owner == f).tolist() for f in range(n_faces)]


def _inputs(path: Path) -> list[tuple[str, Path]]:
    if path.is_dir():
        return [(str(Path(rel).with_suffix("")), path / rel) for rel in list_images(path)]
    if path.is_file():
        return [(path.stem, path)]
    raise FileNotFoundError(f"input not found: {path} (a photo or a folder of photos)")


def restore_photos(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    refs: Sequence[str | os.PathLike] | None = None,
    detector: str = "dlib",
    detector_model: str | os.PathLike | None = None,
    preset: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    ref_match: str = "nearest",
    embedder: str = "dlib",
    embedder_model: str | os.PathLike | None = None,
    tta: str = DEFAULT_TTA,
    restorer=None,
) -> dict[str, int]:
    """Restore every face of a photo (or of each photo in a folder) and paste it back.

    Args:
        input_path: a photo or a folder of photos (any size, any number of faces).
        output_dir: ``<output_dir>/<name>.png`` (the whole photo, same size) and
            ``<output_dir>/faces/<name>_<i>.png`` (each restored aligned face); ``errors.csv``.
        checkpoint: the ReF-LDM model (see :func:`refface.train.refldm.restore.load_refldm`).
        refs: reference photos (aligned or not; a folder means its images), up to 5 per face.
        detector, detector_model: the face detector (``dlib`` or ``scrfd``; see refface.mining.detect).
        ref_match: ``nearest``: in a photo of several faces each reference goes to the face it
            resembles most and faces no reference resembles are restored without any; ``all``:
            every face gets every reference. A photo of one face always gets them all.
        embedder, embedder_model: the identity embedder ``nearest`` matches with (``dlib`` or
            ``arcface``; see refface.mining.embed) and its test-time augmentation (``flip`` or ``none``).
        preset, steps, guidance_scale, seed, device: see :class:`refface.train.refldm.restore.Restorer`.
        restorer: an already built restorer (callable like :class:`Restorer`), instead of loading one.

    Returns:
        Counts: ``photos``, ``faces``, ``faces_with_refs``, ``skipped`` (photos already done),
        ``errors``.
    """
    if ref_match not in REF_MATCH:
        raise ValueError(f"unknown ref_match {ref_match!r}; choose one of {', '.join(REF_MATCH)}")
    check_tta(tta)
    out = Path(output_dir)
    items = _inputs(Path(input_path))
    todo = [(k, p) for k, p in items if not (out / f"{k}.png").is_file()]
    errors = ErrorsTable()
    counts = {"photos": 0, "faces": 0, "faces_with_refs": 0, "skipped": len(items) - len(todo), "errors": 0}
    if todo:
        if restorer is None:
            restorer = Restorer(
                checkpoint,
                preset=preset,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                device=device,
            )
        det = make_detector(detector, detector_model)
        ref_paths: list[Path] = []
        for ref in refs or []:
            r = Path(ref)
            ref_paths += [r / rel for rel in list_images(r)] if r.is_dir() else [r]
        match_size = max(restorer.size, MATCH_SIZE)
        ref_aligned, bad = reference_crops(ref_paths, det, match_size)
        for bad_path, reason in bad:
            errors.add(bad_path, "reference", reason)
        if refs and not ref_aligned:
            raise ValueError("none of the references could be used (see the errors above)")
        ref_crops = [restorer.resize(c) for c in ref_aligned]
        matcher = (
            make_embedder(embedder, embedder_model, tta=tta) if ref_crops and ref_match == "nearest" else None
        )
        ref_vectors = embed_aligned(matcher, ref_aligned) if matcher is not None else None
        for key, path in track(todo, "restoring photos (ReF-LDM)"):
            try:
                img = read_image(path)
            except ImageError as e:
                errors.add(str(path), "restore", str(e))
                continue
            found = det(img)
            faces = align_faces(img, found, restorer.size)
            if not faces:
                errors.add(str(path), "detect", "no face found")
                write_png(out / f"{key}.png", img)
                counts["photos"] += 1
                continue
            lqs = [restorer.resize(f.crop) for f in faces]
            keys = [f"{key}_{i}" for i in range(len(faces))]
            owned = [list(range(len(ref_crops)))] * len(faces)
            if matcher is not None and ref_vectors is not None and len(faces) > 1:
                at_match = faces if match_size == restorer.size else align_faces(img, found, match_size)
                crops = [f.crop for f in at_match]
                owned = assign_references(embed_aligned(matcher, crops), ref_vectors)
                for k, idx in zip(keys, owned, strict=True):
                    logger.info("%s: %d reference(s)", k, len(idx))
            face_refs = [[ref_crops[i] for i in idx][:MAX_REFS] for idx in owned]
            restored = restorer(lqs, face_refs, keys)
            restored = [_to_crop_size(r, f.crop.shape[0]) for r, f in zip(restored, faces, strict=True)]
            result, _ = paste_back(img, restored, faces)
            for k, r in zip(keys, restored, strict=True):
                write_png(out / "faces" / f"{k}.png", r)
            write_png(out / f"{key}.png", result)
            counts["photos"] += 1
            counts["faces"] += len(faces)
            counts["faces_with_refs"] += sum(1 for r in face_refs if r)
    counts["errors"] = len(errors)
    if len(errors):
        errors.write(out, "errors")
    return counts


def _to_crop_size(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.shape[0] == size:
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
