"""Folder of photos -> dataset root: decode, detect, align, embed; tables, embeddings, errors, crops."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refface.executors import EXECUTORS, uses_gpu
from refface.manifests.atomic import sha256_bytes, write_parquet
from refface.manifests.embedding_shards import DEFAULT_FOLDER
from refface.manifests.embeddings import SHARDED_LAYOUT, Embeddings, save_embedding_tables, save_embeddings
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import DEFAULT_MAX_PIXELS, decode_image, list_images, write_png
from refface.manifests.layout import EMBEDDINGS_NPY, FACES, IMAGES
from refface.mining.align import ffhq_crop
from refface.mining.detect import (
    DETECTORS,
    FACE_POLICIES,
    detect,
    detector_files,
    make_detector,
    onnx_providers,
)
from refface.mining.embed import EMBEDDERS, embedder_weights, make_embedder, weights_fingerprint
from refface.mining.parts import stream_vectors, tables_from_parts, write_part, write_vector_shards
from refface.mining.tta import DEFAULT_TTA, check_tta
from refface.stages import fingerprint, folder_fingerprint, map_chunks, run_stage

log = logging.getLogger(__name__)

STAGE = "mine"


@dataclass
class MiningConfig:
    """How a folder is turned into faces and embeddings (CLI flags of ``refface embed`` map onto it).

    Attributes:
        detector: ``dlib`` (offline), ``scrfd`` (insightface det_10g.onnx) or ``prealigned``.
        embedder: ``dlib`` (offline, 128-d) or ``arcface`` (insightface ONNX, 512-d).
        model_path: embedder weights file (ArcFace ONNX, or a dlib .dat); None = default location.
        tta: test-time augmentation of the embedder: ``flip`` (default: the chip and its
            horizontal mirror in one batch, the re-normalized mean of the two; 1.6x the embedding
            time, see docs/mining.md) or ``none`` (the aligned chip alone).
        model_root: folder holding ``det_10g.onnx`` for SCRFD; None = ``~/.insightface/models/buffalo_l``.
        dlib_detector: ``hog`` (fast, default) or ``mmod`` (CNN, slower, more poses).
        face_policy: which face to keep when several are found (``largest``, ``central``,
            ``largest_central``).
        crop_size: side of the FFHQ-style aligned crops.
        save_crops: write ``aligned/<relpath>.png`` crops.
        max_pixels: decompression-bomb limit; bigger images become error rows.
        workers: worker processes (results do not depend on it).
        chunk_size: images per unit of work and per resumable part file.
        executor: where chunks run, a key of ``refface.executors.EXECUTORS`` (``local`` process
            pool or ``ray``); results do not depend on it.
        shard_rows: 0 writes the vectors as one ``embeddings.npy``; N > 0 writes them as shards of
            about N faces (whole chunks each) in ``embeddings_shards/`` with an ``index.json``,
            and no single file, for sets too big for one file or one process's memory.
    """

    detector: str = "dlib"
    embedder: str = "dlib"
    model_path: str | None = None
    tta: str = DEFAULT_TTA
    model_root: str | None = None
    dlib_detector: str = "hog"
    face_policy: str = "largest_central"
    crop_size: int = 512
    save_crops: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 2
    chunk_size: int = 32
    executor: str = "local"
    shard_rows: int = 0

    def validate(self) -> None:
        """Raise ValueError with an actionable message on a bad setting."""
        if self.detector not in DETECTORS:
            raise ValueError(f"detector {self.detector!r} unknown; choose one of {', '.join(DETECTORS)}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"embedder {self.embedder!r} unknown; choose one of {', '.join(EMBEDDERS)}")
        check_tta(self.tta)
        if self.face_policy not in FACE_POLICIES:
            raise ValueError(
                f"face policy {self.face_policy!r} unknown; choose one of {', '.join(FACE_POLICIES)}"
            )
        if self.dlib_detector not in ("hog", "mmod"):
            raise ValueError(f"dlib detector must be 'hog' or 'mmod', got {self.dlib_detector!r}")
        if self.crop_size < 16:
            raise ValueError(f"crop size {self.crop_size} is too small; use e.g. 512")
        if self.workers < 1 or self.chunk_size < 1:
            raise ValueError("workers and chunk size must be at least 1")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")
        if self.shard_rows < 0:
            raise ValueError(f"shard_rows must be 0 (one embeddings.npy) or positive, got {self.shard_rows}")

        if self.executor not in EXECUTORS:
            raise ValueError(f"executor {self.executor!r} unknown; choose one of {', '.join(EXECUTORS)}")

    def stage_config(self) -> dict:
        """The settings that decide the outputs (worker count and executor do not)."""
        cfg = asdict(self)
        cfg.pop("workers")
        cfg.pop("executor")
        if not cfg["shard_rows"]:
            cfg.pop("shard_rows")  # the single-file layout keeps the fingerprints it always had
        if cfg["tta"] == "none":
            cfg.pop("tta")  # so do roots embedded without test-time augmentation
        return cfg


@dataclass
class MiningResult:
    """What one ``mine_folder`` call produced (or found already done)."""

    root: Path
    n_images: int
    n_decoded: int
    n_faces: int
    n_errors: int
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    ran: bool = True
    model: str = ""

    @property
    def faces_per_second(self) -> float:
        return self.n_faces / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------ per-worker state
_STATE: dict[str, Any] = {}


def _init_worker(config: dict, image_root: str, dataset_root: str) -> None:
    """Load the detector and embedder once per worker process."""
    cfg = MiningConfig(**config)
    det_kwargs = {"model": cfg.dlib_detector} if cfg.detector == "dlib" else {}
    det_path = cfg.model_root if cfg.detector == "scrfd" else None
    _STATE.update(
        config=cfg,
        image_root=Path(image_root),
        dataset_root=Path(dataset_root),
        detector=make_detector(cfg.detector, det_path, **det_kwargs),
        embedder=make_embedder(cfg.embedder, cfg.model_path, tta=cfg.tta),
    )


def crop_relpath(relpath: str) -> str:
    """Where an image's aligned crop goes inside the dataset root."""
    return (Path("aligned") / Path(relpath).with_suffix(".png")).as_posix()


def _clean_reason(reason: str) -> str:
    """Drop memory addresses some decoders put in messages, so errors tables are reproducible."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "<data>", reason)


def _short(reason: str) -> str:
    """Group reasons for summaries: the part before any detail after a colon."""
    return reason.split(":", 1)[0].strip()


# ONNX detectors/embedders run on CUDA when onnxruntime has it: Ray workers then share a GPU.
@uses_gpu(0.5)
def _mine_chunk(items: list[tuple[int, str]]) -> dict:
    """Unit of work: decode, detect, align and embed a chunk of (image_id, relpath) items."""
    cfg: MiningConfig = _STATE["config"]
    detector, embedder = _STATE["detector"], _STATE["embedder"]
    images, faces, errors, crops = [], [], [], []
    for image_id, rel in items:
        stage = "read"
        try:
            try:
                data = (_STATE["image_root"] / rel).read_bytes()
            except OSError as e:
                raise ImageError(f"cannot read file: {e.strerror or e}") from e
            stage = "decode"
            img = decode_image(data, max_pixels=cfg.max_pixels)
            images.append(
                {
                    "image_id": image_id,
                    "path": rel,
                    "sha256": sha256_bytes(data),
                    "width": int(img.shape[1]),
                    "height": int(img.shape[0]),
                }
            )
            stage = "detect"
            found = detect(detector, img, cfg.face_policy)
            face = found.face
            stage = "align"
            crop = embedder.crop(img, face)
            if cfg.save_crops:
                write_png(
                    _STATE["dataset_root"] / crop_relpath(rel), ffhq_crop(img, face.landmarks, cfg.crop_size)
                )
        except ImageError as e:
            errors.append({"path": rel, "stage": stage, "reason": _clean_reason(str(e))})
            continue
        except Exception as e:  # noqa: BLE001 - one bad image must not end the run
            log.debug("unexpected failure on %s", rel, exc_info=True)
            errors.append({"path": rel, "stage": stage, "reason": _clean_reason(f"{type(e).__name__}: {e}")})
            continue
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        faces.append(
            {
                "image_id": image_id,
                "path": rel,
                "n_faces": found.n_faces,
                "face_index": found.chosen,
                "x0": x0,
                "y0": y0,
                "x1": x1,
                "y1": y1,
                "det_score": float(face.score),
                "lm": [float(v) for v in np.asarray(face.landmarks).reshape(-1)],
            }
        )
        crops.append(crop)
    vectors, norms = _embed_or_isolate(embedder, crops, faces, errors)
    return {"images": images, "faces": faces, "errors": errors, "vectors": vectors, "norms": norms}


def _embed_or_isolate(embedder, crops: list, faces: list, errors: list) -> tuple[np.ndarray, np.ndarray]:
    """Embed a chunk's crops in one batch; if the batch fails, retry one by one and drop the bad ones."""
    try:
        return embedder.embed_crops(crops)
    except Exception:  # noqa: BLE001 - find the offending crop instead of losing the chunk
        log.debug("batch embedding failed, retrying crop by crop", exc_info=True)
    kept_v, kept_n, kept_faces = [], [], []
    for crop, face in zip(crops, faces, strict=True):
        try:
            v, n = embedder.embed_crops([crop])
        except Exception as e:  # noqa: BLE001
            errors.append(
                {"path": face["path"], "stage": "embed", "reason": _clean_reason(f"{type(e).__name__}: {e}")}
            )
            continue
        kept_v.append(v)
        kept_n.append(n)
        kept_faces.append(face)
    faces[:] = kept_faces
    if not kept_v:
        return embedder.embed_crops([])
    return np.concatenate(kept_v), np.concatenate(kept_n)


def model_devices(config: MiningConfig) -> dict:
    """What the detector and the embedder run on: onnxruntime providers (in order of use) for ONNX
    models, the CPU for dlib (raises CpuFallbackError when a GPU would silently go unused)."""
    detector: str | list[str] | None = {
        "scrfd": None,
        "dlib": "cpu (dlib)",
        "prealigned": "none (pre-aligned input)",
    }[config.detector]
    embedder: str | list[str] | None = "cpu (dlib)" if config.embedder == "dlib" else None
    if detector is None or embedder is None:
        providers = onnx_providers()
        detector = providers if detector is None else detector
        embedder = providers if embedder is None else embedder
    return {"detector": detector, "embedder": embedder}


def model_identity(config: MiningConfig) -> dict:
    """Names and sha256 fingerprints of every weights file the config reads (fails fast when absent)."""
    det_kwargs = {"model": config.dlib_detector} if config.detector == "dlib" else {}
    det_files = detector_files(config.detector, config.model_root, **det_kwargs)
    emb_file = embedder_weights(config.embedder, config.model_path)
    if not Path(emb_file).is_file():
        raise FileNotFoundError(f"embedder weights not found: {emb_file}")
    cls = EMBEDDERS[config.embedder]
    return {
        "detector_files": {Path(f).name: weights_fingerprint(str(f)) for f in det_files},
        "embedder_file": str(emb_file),
        "embedder_fingerprint": weights_fingerprint(str(emb_file)),
        "embedder_model": "dlib_face_recognition_resnet_model_v1"
        if config.embedder == "dlib"
        else f"arcface:{Path(emb_file).stem}",
        "metric": cls.metric,
        "identity_threshold": cls.identity_threshold,
    }


def mine_folder(
    image_root: str | os.PathLike,
    dataset_root: str | os.PathLike,
    config: MiningConfig | None = None,
    force: bool = False,
    relpaths: list[str] | None = None,
) -> MiningResult:
    """Turn a folder of photos into a dataset root (images, faces, embeddings, errors tables).

    Every image under ``image_root`` becomes either one face row + one embedding row, or an
    errors row (unreadable, empty, truncated/corrupt, too large, no face found). Work runs in
    chunks on ``config.workers`` processes with a part file per chunk under
    ``<root>/.parts/mine/``, so a killed run resumes and ends with byte-identical outputs; a
    rerun with unchanged inputs and config does nothing.

    Args:
        image_root: folder of images (searched recursively; hidden files skipped).
        dataset_root: output folder (created).
        config: settings; defaults to dlib detection + dlib embeddings.
        force: recompute even when the stage is up to date.
        relpaths: only these images (POSIX paths relative to ``image_root``, e.g. from an images
            table) instead of every image in the folder; they are sorted and de-duplicated.

    Returns:
        A :class:`MiningResult` with counts and timing.
    """
    cfg = config or MiningConfig()
    cfg.validate()
    image_root = Path(image_root).resolve()
    root = Path(dataset_root)
    if relpaths is None:
        relpaths = list_images(image_root)
    else:
        if not image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_root}")
        relpaths = sorted({Path(p).as_posix() for p in relpaths})
        outside = [p for p in relpaths if Path(p).is_absolute() or ".." in Path(p).parts]
        if outside:
            raise ValueError(
                f"image paths must be relative to {image_root} and inside it, got e.g. {outside[0]}"
            )
    models = model_identity(cfg)
    inputs = {
        "image_root": str(image_root),
        "n_files": len(relpaths),
        "files": folder_fingerprint(image_root, relpaths),
        "models": models,
    }
    stage_cfg = cfg.stage_config()
    fp = fingerprint(STAGE, stage_cfg, inputs)
    parts_dir = root / ".parts" / STAGE / fp[:16]
    stats: dict[str, Any] = {}

    def work() -> dict:
        start = time.perf_counter()
        # Checked here, before the workers start: a GPU machine whose onnxruntime cannot use the
        # GPU stops with the fix named instead of mining on the CPU.
        devices = model_devices(cfg)
        items = list(enumerate(relpaths))
        part_path = lambda i: parts_dir / f"chunk-{i:06d}.pkl"  # noqa: E731
        chunk_results = map_chunks(
            _mine_chunk,
            items,
            chunk_size=cfg.chunk_size,
            workers=cfg.workers,
            description="faces",
            part_path=part_path,
            write_part=write_part,
            initializer=_init_worker,
            initargs=(asdict(cfg), str(image_root), str(root)),
            executor=cfg.executor,
            collect=False,
        )
        n_chunks = len(chunk_results)
        images, faces_df, error_rows, norms, dim = tables_from_parts(n_chunks, part_path)
        errors = ErrorsTable()
        errors.extend(error_rows)
        dim = dim or (128 if cfg.embedder == "dlib" else 512)
        write_parquet(root / IMAGES, images)
        write_parquet(root / FACES, faces_df)
        outputs = ["images.parquet", "faces.parquet"]
        paths, image_ids = faces_df["path"].tolist(), faces_df["image_id"].tolist()
        meta = {
            "model": models["embedder_model"],
            "fingerprint": models["embedder_fingerprint"],
            "metric": models["metric"],
            "identity_threshold": models["identity_threshold"],
        }
        if cfg.tta != "none":
            meta["tta"] = cfg.tta
        # Vectors derived from an earlier run (a split of embeddings.npy, or older shards) are stale now.
        shards_dir = root / DEFAULT_FOLDER
        shutil.rmtree(shards_dir, ignore_errors=True)
        if cfg.shard_rows:
            per_shard = max(1, -(-cfg.shard_rows // cfg.chunk_size))
            outputs += write_vector_shards(shards_dir, n_chunks, per_shard, part_path, meta)
            layout = {"dim": dim, "layout": SHARDED_LAYOUT, "shards": DEFAULT_FOLDER}
            outputs += save_embedding_tables(root, paths, image_ids, norms, {**meta, **layout})
            (root / EMBEDDINGS_NPY).unlink(missing_ok=True)
        else:
            vectors = stream_vectors(parts_dir / "vectors.npy", (len(paths), dim), n_chunks, part_path)
            emb = Embeddings(vectors=vectors, paths=paths, image_ids=image_ids, norms=norms, **meta)
            outputs += save_embeddings(root, emb)
        errors.write(root)
        outputs += ["errors.parquet", "errors.csv"]
        if cfg.save_crops:
            outputs += [crop_relpath(p) for p in paths]
        by_reason: dict[str, int] = {}
        for row in errors.rows:
            by_reason[_short(row.reason)] = by_reason.get(_short(row.reason), 0) + 1
        stats.update(
            n_decoded=len(images),
            n_faces=len(faces_df),
            n_errors=len(errors),
            errors_by_reason=dict(sorted(by_reason.items())),
            seconds=time.perf_counter() - start,
        )
        # The parts have served their purpose once every output is in place.
        shutil.rmtree(parts_dir, ignore_errors=True)
        for empty in (parts_dir.parent, parts_dir.parent.parent):
            try:
                empty.rmdir()
            except OSError:
                break
        return {
            "outputs": outputs,
            "counts": {k: v for k, v in stats.items() if k != "seconds"},
            "devices": devices,
        }

    root.mkdir(parents=True, exist_ok=True)
    manifest, ran = run_stage(root, STAGE, stage_cfg, inputs, work, force=force)
    counts = manifest.get("counts", stats)
    return MiningResult(
        root=root,
        n_images=len(relpaths),
        n_decoded=int(counts.get("n_decoded", 0)),
        n_faces=int(counts.get("n_faces", 0)),
        n_errors=int(counts.get("n_errors", 0)),
        errors_by_reason=dict(counts.get("errors_by_reason", {})),
        seconds=float(stats.get("seconds", manifest.get("timings", {}).get("seconds", 0.0))),
        ran=ran,
        model=models["embedder_model"],
    )
