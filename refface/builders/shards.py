"""Writing WebDataset shards of a dataset root: reproducible tars, resumable, with an index written last.

The sample layout is :mod:`refface.manifests.webdataset`'s. Samples are encoded in worker processes
(pure, picklable functions), written in key order into shards that rotate by count and size, each
renamed into place with a done-record when complete; the split's index is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from refface.console import make_progress
from refface.degradations import make_degrader
from refface.manifests.atomic import write_json
from refface.manifests.embeddings import embeddings_files
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import decode_image, encode_png, read_image
from refface.manifests.layout import (
    ATTRIBUTES,
    EMBEDDINGS_META,
    EMBEDDINGS_TABLE,
    IDENTITIES,
    SPLITS,
    references_filename,
)
from refface.manifests.root import DatasetRoot, PathEscapesRoot, safe_relative
from refface.manifests.shard_index import (
    ShardEntry,
    ShardIndex,
    index_path,
    read_shard_index,
    shard_name,
    shard_record_path,
)
from refface.manifests.webdataset import (
    CODECS,
    TAR_MODE,
    TAR_MTIME,
    TAR_USER,
    SampleJob,
    json_bytes,
    npy_bytes,
    plan_jobs,
    tar_size,
)
from refface.mining.attributes import attrs_record
from refface.stages import fingerprint, folder_fingerprint

log = logging.getLogger(__name__)

STAGE = "shards"


@dataclass(frozen=True)
class EncodeContext:
    root: str
    image_root: str
    codec: str = "png"
    quality: int = 95
    png_compress_level: int = 6
    lq_preset: str | None = None
    seed: int = 0


def encode_image(rgb: np.ndarray, codec: str, quality: int, png_compress_level: int = 6) -> bytes:
    """Encode an RGB uint8 image with the shard codec (PNG lossless; JPEG/WebP at ``quality``)."""
    if codec == "png":
        return encode_png(rgb, compress_level=png_compress_level)
    buf = io.BytesIO()
    fmt = {"jpeg": "JPEG", "webp": "WEBP"}[codec]
    Image.fromarray(rgb).save(buf, format=fmt, quality=int(quality))
    return buf.getvalue()


def _stored_image(data: bytes, path: str, ctx: EncodeContext) -> tuple[bytes, tuple[int, int]]:
    """Bytes to store for a source image and its (width, height).

    A plain 8-bit RGB PNG source under the PNG codec is stored verbatim (bit-exact and no re-encode);
    anything else is decoded (EXIF applied, any mode to RGB) and encoded with the codec.
    """
    if ctx.codec == "png" and path.lower().endswith(".png"):
        try:
            with Image.open(io.BytesIO(data)) as img:
                plain = img.format == "PNG" and img.mode == "RGB" and "exif" not in img.info
                size = img.size
                if plain:
                    # Checks every chunk's CRC without inflating the pixels: catches damaged files
                    # at a fraction of a decode's cost.
                    img.verify()
            if plain:
                return data, size
        except Exception:  # any failure here: let the full decode below give the reason
            pass
    rgb = decode_image(data)
    return encode_image(rgb, ctx.codec, ctx.quality, ctx.png_compress_level), (rgb.shape[1], rgb.shape[0])


def _read_source(image_root: str, rel: str) -> bytes:
    """The file ``rel`` names under the image root; a path leaving the root is refused unopened."""
    try:
        return (Path(image_root) / safe_relative(rel)).read_bytes()
    except PathEscapesRoot as e:
        raise ImageError(str(e)) from e
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from e


def _inside(rel: str) -> bool:
    try:
        safe_relative(rel)
    except PathEscapesRoot:
        return False
    return True


def _resolve_lq(ctx: EncodeContext, lq: str) -> Path | None:
    for base in (Path(ctx.image_root), Path(ctx.root)):
        if (base / lq).exists():
            return base / lq
    return None


def encode_sample(
    job: SampleJob, ctx: EncodeContext
) -> tuple[dict[str, bytes] | None, list[tuple[str, str]]]:
    """Encode one sample's members. Returns (members or None, [(path, reason) error rows]).

    An unreadable target drops the sample; an unreadable reference drops only that reference.
    """
    ext = CODECS[ctx.codec]
    errors: list[tuple[str, str]] = []
    try:
        data = _read_source(ctx.image_root, job.gt)
        hq_bytes, (width, height) = _stored_image(data, job.gt, ctx)
    except ImageError as e:
        return None, [(job.gt, str(e))]
    members: dict[str, bytes] = {"__key__": job.key.encode(), f"hq.{ext}": hq_bytes}
    ref_paths: list[str] = []
    ref_sha: list[str] = []
    ref_embs: list[np.ndarray | None] = []
    for rel, emb in zip(job.refs, job.ref_embeddings, strict=True):
        try:
            ref_data = _read_source(ctx.image_root, rel)
            stored, _ = _stored_image(ref_data, rel, ctx)
        except ImageError as e:
            errors.append((rel, f"reference of {job.gt}: {e}"))
            continue
        members[f"ref{len(ref_paths)}.{ext}"] = stored
        ref_paths.append(rel)
        ref_sha.append(hashlib.sha256(ref_data).hexdigest())
        ref_embs.append(emb)
    if job.embedding is not None:
        members["id.npy"] = npy_bytes(job.embedding.astype(np.float32))
    if ref_embs and all(e is not None for e in ref_embs):
        members["refemb.npy"] = npy_bytes(np.stack([e for e in ref_embs if e is not None]).astype(np.float32))
    members["attrs.json"] = json_bytes(attrs_record(job.attrs))
    meta = {
        "key": job.key,
        "identity": int(job.identity),
        "split": job.split,
        "path": job.gt,
        "sha256": hashlib.sha256(data).hexdigest(),
        "height": int(height),
        "width": int(width),
        "refs": ref_paths,
        "ref_sha256": ref_sha,
    }
    if job.lq is not None:
        lq_rgb, params = _fixed_lq(job, ctx, hq_bytes, errors)
        if lq_rgb is not None:
            members[f"lq.{ext}"] = encode_image(lq_rgb, ctx.codec, ctx.quality, ctx.png_compress_level)
            members["degrade.json"] = json_bytes(params)
            meta["lq"] = params.get("source", job.lq)
    members["meta.json"] = json_bytes(meta)
    return members, errors


def _fixed_lq(
    job: SampleJob, ctx: EncodeContext, hq_bytes: bytes, errors: list
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The fixed LQ of a val/test sample: the built LQ file when it exists, else degraded here."""
    if job.lq and not _inside(job.lq):
        errors.append((job.lq, f"lq of {job.gt}: {PathEscapesRoot.__name__}: path leaves the image root"))
        return None, {}
    path = _resolve_lq(ctx, job.lq) if job.lq and job.lq != job.gt else None
    if path is not None:
        try:
            lq = read_image(path)
        except ImageError as e:
            errors.append((job.lq, f"lq of {job.gt}: {e}"))
            return None, {}
        params: dict[str, Any] = {"source": job.lq}
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            params["params"] = json.loads(sidecar.read_text())
        return lq, params
    if ctx.lq_preset is None:
        return None, {}
    hq = decode_image(hq_bytes)
    lq, params = make_degrader(ctx.lq_preset, ctx.seed, out_size=None).degrade(hq, job.key)
    return lq, {"source": None, "preset": ctx.lq_preset, "seed": ctx.seed, "params": params}


def _encode_star(args: tuple[SampleJob, EncodeContext]):
    return encode_sample(*args)


@dataclass(frozen=True)
class ShardsConfig:
    """Settings of ``refface shards``; CLI flags map onto these one to one."""

    split: str = "train"
    max_refs: int = 5
    codec: str = "png"
    quality: int = 95
    png_compress_level: int = 6
    shard_bytes: int = 1_000_000_000
    shard_count: int = 100_000
    lq_preset: str | None = None
    seed: int = 0
    workers: int = 1

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; use train, val or test")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.max_refs < 0:
            raise ValueError("max_refs must be >= 0")
        if self.shard_bytes < 1 or self.shard_count < 1:
            raise ValueError("shard_bytes and shard_count must be positive")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be within 1..100")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")


class _HashingFile:
    """A write-only file that hashes and counts what passes through (no second read of the shard)."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())  # a shard counts as done only once it is on disk
            self.file.close()


class _ShardRotation:
    """Writes samples into numbered shards, rotating by count and bytes; a shard is renamed into
    place and gets its done-record only when complete, so a killed run resumes at a shard boundary."""

    def __init__(self, folder: Path, split: str, config: ShardsConfig, fp: str, start_number: int):
        self.folder = folder
        self.split = split
        self.config = config
        self.fp = fp
        self.number = start_number
        self.writer: Any = None  # webdataset's TarWriter while a shard is open
        self.tmp: Path | None = None
        self.count = 0
        self.size = 0
        self.first_key = ""
        self.last_key = ""
        self.entries: list[ShardEntry] = []

    def _open(self) -> None:
        import webdataset as wds

        name = shard_name(self.split, self.number)
        self.tmp = self.folder / f".{name}.tmp"
        self.stream = _HashingFile(self.tmp)
        self.writer = wds.TarWriter(
            self.stream, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_USER, mode=TAR_MODE
        )
        self.count = 0
        self.size = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        need = tar_size(members)
        if self.writer is not None and (
            self.count >= self.config.shard_count or self.size + need > self.config.shard_bytes
        ):
            self.close()
        if self.writer is None:
            self._open()
            self.first_key = key
        self.writer.write({"__key__": key, **{k: v for k, v in members.items() if k != "__key__"}})
        self.count += 1
        self.size += need
        self.last_key = key

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.stream.close()
        name = shard_name(self.split, self.number)
        final = self.folder / name
        if self.tmp is None:
            raise RuntimeError("no shard is open")
        os.replace(self.tmp, final)
        entry = ShardEntry(
            name=name,
            samples=self.count,
            bytes=self.stream.size,
            sha256=self.stream.sha256.hexdigest(),
            first_key=self.first_key,
            last_key=self.last_key,
        )
        write_json(shard_record_path(self.folder, name), {"fingerprint": self.fp, **asdict(entry)})
        self.entries.append(entry)
        self.writer = None
        self.number += 1

    def abort(self) -> None:
        if self.writer is not None:
            self.stream.close()
            if self.tmp is not None and self.tmp.exists():
                self.tmp.unlink()
            self.writer = None


def _finished_records(folder: Path, split: str, fp: str) -> list[ShardEntry]:
    """The run of consecutive finished shards (0, 1, ...) of a previous run with the same fingerprint."""
    entries = []
    number = 0
    while True:
        name = shard_name(split, number)
        record = shard_record_path(folder, name)
        if not record.exists():
            break
        data = json.loads(record.read_text())
        if data.pop("fingerprint", None) != fp:
            break
        entry = ShardEntry(**data)
        shard = folder / name
        if not shard.exists() or shard.stat().st_size != entry.bytes:
            break
        entries.append(entry)
        number += 1
    return entries


def _remove_stale(folder: Path, split: str, keep: int) -> None:
    """Delete shards and records of ``split`` numbered ``keep`` and above (leftovers of another run)."""
    for path in sorted(folder.glob(f"{split}-*.tar")) + sorted(
        (folder / ".done").glob(f"{split}-*.tar.json")
    ):
        number = int(path.name.split("-")[1].split(".")[0])
        if number >= keep:
            path.unlink()
    for tmp in folder.glob(f".{split}-*.tar.tmp"):
        tmp.unlink()


def write_shards(
    root: str | os.PathLike, out: str | os.PathLike, config: ShardsConfig | None = None, force: bool = False
) -> dict[str, Any]:
    """Write a split of a dataset root as WebDataset shards into ``out``; the index is written last.

    Reruns with the same inputs and config do nothing; a killed run resumes after its last finished
    shard and ends with the same bytes as an uninterrupted one.

    Returns:
        Summary: split, samples, shards, bytes, skipped (bool), errors (count), resumed_shards, index path.
    """
    config = config or ShardsConfig()
    config.validate()
    root, folder = Path(root), Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    image_root = DatasetRoot(root).image_root() or root
    jobs = plan_jobs(root, config.split, config.max_refs)
    used = sorted({j.gt for j in jobs} | {r for j in jobs for r in j.refs})
    used = [p for p in used if _inside(p)]
    table_files = [
        f
        for f in (
            references_filename(config.split),
            *embeddings_files(root),
            EMBEDDINGS_TABLE,
            EMBEDDINGS_META,
            IDENTITIES,
            ATTRIBUTES,
        )
        if (root / f).exists()
    ]
    inputs = {"images": folder_fingerprint(image_root, used), "tables": folder_fingerprint(root, table_files)}
    config_fp = {k: v for k, v in asdict(config).items() if k != "workers"}
    fp = fingerprint(STAGE, config_fp, inputs)
    idx_path = index_path(folder, config.split)
    if not force and idx_path.exists():
        index = read_shard_index(idx_path)
        if index.inputs.get("fingerprint") == fp and all(p.exists() for p in index.shard_paths(folder)):
            log.info("shards %s: up to date, skipped", config.split)
            return {
                "split": config.split,
                "samples": index.num_samples,
                "shards": len(index.shards),
                "bytes": index.num_bytes,
                "skipped": True,
                "errors": 0,
                "resumed_shards": len(index.shards),
                "index": str(idx_path),
            }
    if idx_path.exists():
        idx_path.unlink()
    done = [] if force else _finished_records(folder, config.split, fp)
    _remove_stale(folder, config.split, keep=len(done))
    start = 0
    if done:
        last = done[-1].last_key
        start = next((i + 1 for i, j in enumerate(jobs) if j.key == last), 0)
        if start == 0:  # the finished shards do not belong to this job list: start over
            done = []
            _remove_stale(folder, config.split, keep=0)
    ctx = EncodeContext(
        root=str(root),
        image_root=str(image_root),
        codec=config.codec,
        quality=config.quality,
        png_compress_level=config.png_compress_level,
        lq_preset=config.lq_preset,
        seed=config.seed,
    )
    errors = ErrorsTable()
    rotation = _ShardRotation(folder, config.split, config, fp, start_number=len(done))
    todo = jobs[start:]
    try:
        with make_progress() as progress:
            task = progress.add_task(f"shards {config.split}", total=len(jobs))
            progress.advance(task, start)
            for members, errs in _encoded(todo, ctx, config.workers):
                for path, reason in errs:
                    errors.add(path, STAGE, reason)
                if members is not None:
                    rotation.write(members["__key__"].decode(), members)
                progress.advance(task)
        rotation.close()
    except BaseException:
        rotation.abort()
        raise
    entries = done + rotation.entries
    index = ShardIndex(
        split=config.split,
        shards=entries,
        config=config_fp,
        inputs={"fingerprint": fp, "root": str(root), **inputs},
    )
    if len(errors):
        errors.write(folder, name=f"errors-{config.split}")
    index.write(folder)
    return {
        "split": config.split,
        "samples": index.num_samples,
        "shards": len(entries),
        "bytes": index.num_bytes,
        "skipped": False,
        "errors": len(errors),
        "resumed_shards": len(done),
        "index": str(idx_path),
    }


def _encoded(jobs: Sequence[SampleJob], ctx: EncodeContext, workers: int) -> Iterator:
    """Encoded samples in job order (the shard order does not depend on the worker count)."""
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            yield encode_sample(job, ctx)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_encode_star, ((j, ctx) for j in jobs), chunksize=4)
