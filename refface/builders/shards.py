"""WebDataset shards of a dataset root: reproducible tars, resumable, with an index written last.

One sample per target image of a split's reference CSV. Members of sample ``KEY`` (``EXT`` is the
image codec: ``png`` by default, ``jpg`` or ``webp``):

    KEY.hq.EXT            the HQ target
    KEY.ref0.EXT ...      its references, in CSV order (up to ``max_refs``)
    KEY.id.npy            identity embedding of the target (float32, (D,)), when embeddings exist
    KEY.refemb.npy        identity embeddings of the stored references (float32, (K, D))
    KEY.attrs.json        attributes + prompt, negative-quality and negative-attribute prompts
    KEY.meta.json         key, identity, split, source path, sha256 of source, reference paths
    KEY.lq.EXT            (fixed sets) the LQ input
    KEY.degrade.json      (fixed sets) its degradation params

Keys are the target path without extension, with every character outside ``[A-Za-z0-9_-]``
replaced by ``_`` (WebDataset splits key and extension at the first dot).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.manifests.shard_index import (
    ShardEntry,
    ShardIndex,
    index_path,
    read_shard_index,
    shard_name,
    shard_record_path,
)
from refface.mining.embed import embeddings_files

log = logging.getLogger(__name__)

STAGE = "shards"
CODECS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Fixed tar member metadata so the same samples always give the same bytes.
TAR_MTIME = 0
TAR_USER = "refface"
TAR_MODE = 0o644
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


class ShardError(Exception):
    """A shard that is missing, truncated or does not match its index; the message names it."""


# ----------------------------------------------------------------------------------------------
# Reading a dataset root
# ----------------------------------------------------------------------------------------------


def image_root_of(root: str | os.PathLike) -> Path:
    """The folder image paths of a dataset root are relative to (``build.json`` key ``image_root``).

    A relative ``image_root`` is taken relative to the dataset root; without ``build.json`` the
    dataset root itself is the image root.
    """
    root = Path(root)
    build = root / "build.json"
    if build.exists():
        value = json.loads(build.read_text()).get("image_root")
        if value:
            path = Path(value)
            return path if path.is_absolute() else root / path
    return root


def read_split_references(root: str | os.PathLike, split: str) -> pd.DataFrame:
    """``{split}_references.csv`` of a root with ``ref_image`` as lists (and ``lq_image`` when present)."""
    from refface.manifests.references import read_references, references_filename

    path = Path(root) / references_filename(split)
    if not path.exists():
        raise FileNotFoundError(f"no reference list for split {split!r}: {path} does not exist")
    return read_references(path)


def dataset_image_paths(root: str | os.PathLike) -> list[str]:
    """Every image of a root: ``images.parquet`` paths, else all targets and refs of the reference CSVs."""
    root = Path(root)
    if (root / "images.parquet").exists():
        return sorted(pd.read_parquet(root / "images.parquet", columns=["path"])["path"].astype(str))
    paths: set[str] = set()
    for split in ("train", "val", "test"):
        if (root / f"{split}_references.csv").exists():
            df = read_split_references(root, split)
            paths.update(df["gt_image"])
            for refs in df["ref_image"]:
                paths.update(refs)
    if not paths:
        raise FileNotFoundError(f"{root} has neither images.parquet nor reference CSVs")
    return sorted(paths)


def load_embedding_table(root: str | os.PathLike) -> dict[str, np.ndarray]:
    """{image path: float32 embedding} from ``embeddings.npy`` + ``embeddings.parquet``; {} when absent.

    With ``embeddings.json`` the files are read by :func:`refface.mining.embed.load_embeddings`
    (which validates them); without it, by row number directly.
    """
    root = Path(root)
    files = embeddings_files(root)
    if not files or not all((root / f).exists() for f in files) or not (root / "embeddings.parquet").exists():
        return {}
    if (root / "embeddings.json").exists():
        # The embedder's own reader checks the three files agree (rows, dim).
        from refface.mining.embed import load_embeddings

        emb = load_embeddings(root)
        return {p: emb.vectors[i] for i, p in enumerate(emb.paths)}
    matrix = np.load(root / "embeddings.npy", mmap_mode="r")
    table = pd.read_parquet(root / "embeddings.parquet")
    rows = table["row"].to_numpy() if "row" in table.columns else np.arange(len(table))
    if len(table) != matrix.shape[0]:
        raise ValueError(
            f"{root}: embeddings.parquet has {len(table)} rows but embeddings.npy has {matrix.shape[0]}"
        )
    return {
        str(p): np.asarray(matrix[int(r)], dtype=np.float32) for p, r in zip(table["path"], rows, strict=True)
    }


def load_identity_table(root: str | os.PathLike) -> dict[str, int]:
    """{image path: identity} from ``identities.parquet``; {} when absent (-1 = singleton)."""
    path = Path(root) / "identities.parquet"
    if not path.exists():
        return {}
    df = pd.read_parquet(path, columns=["path", "identity"])
    return dict(zip(df["path"].astype(str), df["identity"].astype(int), strict=True))


def load_attribute_table(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{image path: attributes row} from ``attributes.parquet``; {} when absent."""
    from refface.mining.attributes import read_attributes

    df = read_attributes(root)
    if df is None:
        return {}
    return {str(r["path"]): r for r in df.to_dict("records")}


def sample_key(path: str) -> str:
    """WebDataset key of a target path: no extension, no dots, no slashes."""
    stem = path.rsplit(".", 1)[0] if "." in Path(path).name else path
    return _KEY_BAD.sub("_", stem)


def unique_keys(paths: Sequence[str]) -> list[str]:
    """Keys for ``paths``; two paths that sanitize alike get a short hash of the path appended."""
    import hashlib

    keys = [sample_key(p) for p in paths]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return [
        k if counts[k] == 1 else f"{k}_{hashlib.sha256(p.encode()).hexdigest()[:8]}"
        for k, p in zip(keys, paths, strict=True)
    ]


def attrs_record(attrs: dict[str, Any] | None) -> dict[str, Any]:
    """The ``attrs.json`` content: attributes (when known) and the three prompts."""
    from refface.mining.attributes import (
        FALLBACK_PROMPT,
        NEGATIVE_QUALITY_PROMPT,
        build_negative_attribute_prompt,
    )

    record: dict[str, Any] = {"negative_quality_prompt": NEGATIVE_QUALITY_PROMPT}
    if attrs:
        # Every attribute column of the table (deepface's or the vocabulary's), JSON-ready.
        for name, value in attrs.items():
            if name in ("path", "scores", "prompt", "negative_attribute_prompt"):
                continue
            if isinstance(value, (float, np.floating)):
                value = None if np.isnan(value) else float(value)
            elif isinstance(value, np.integer):
                value = int(value)
            record[name] = value
        record["prompt"] = str(attrs.get("prompt") or FALLBACK_PROMPT)
        negative = attrs.get("negative_attribute_prompt")
        if not negative and {"age", "gender", "emotion"} <= set(attrs):
            negative = build_negative_attribute_prompt(attrs)
        record["negative_attribute_prompt"] = str(negative or "")
    else:
        record["prompt"] = FALLBACK_PROMPT
        record["negative_attribute_prompt"] = ""
    return record


# ----------------------------------------------------------------------------------------------
# Encoding one sample (pure, picklable: runs in worker processes)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleJob:
    """Everything needed to encode one sample, so workers never read the tables."""

    key: str
    split: str
    gt: str
    refs: tuple[str, ...]
    lq: str | None
    identity: int
    embedding: np.ndarray | None
    ref_embeddings: tuple[np.ndarray | None, ...]
    attrs: dict[str, Any] | None


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
    from PIL import Image

    from refface.manifests.io import encode_png

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
    from PIL import Image

    from refface.manifests.io import decode_image

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
    from refface.manifests.errors import ImageError

    try:
        return (Path(image_root) / rel).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from e


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, default=_json_default) + "\n").encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


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
    import hashlib

    from refface.manifests.errors import ImageError

    ext = CODECS[ctx.codec]
    errors: list[tuple[str, str]] = []
    try:
        data = _read_source(ctx.image_root, job.gt)
        hq_bytes, (width, height) = _stored_image(data, job.gt, ctx)
    except ImageError as e:
        return None, [(job.gt, str(e))]
    members: dict[str, bytes] = {"__key__": job.key.encode(), f"hq.{ext}": hq_bytes}
    ref_paths, ref_sha, ref_embs = [], [], []
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
        members["id.npy"] = _npy_bytes(job.embedding.astype(np.float32))
    if ref_embs and all(e is not None for e in ref_embs):
        members["refemb.npy"] = _npy_bytes(np.stack(ref_embs).astype(np.float32))
    members["attrs.json"] = _json_bytes(attrs_record(job.attrs))
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
            members["degrade.json"] = _json_bytes(params)
            meta["lq"] = params.get("source", job.lq)
    members["meta.json"] = _json_bytes(meta)
    return members, errors


def _fixed_lq(
    job: SampleJob, ctx: EncodeContext, hq_bytes: bytes, errors: list
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The fixed LQ of a val/test sample: the built LQ file when it exists, else degraded here."""
    from refface.manifests.errors import ImageError
    from refface.manifests.io import read_image

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
    from refface.manifests.io import decode_image

    hq = decode_image(hq_bytes)
    lq, params = make_degrader(ctx.lq_preset, ctx.seed, out_size=None).degrade(hq, job.key)
    return lq, {"source": None, "preset": ctx.lq_preset, "seed": ctx.seed, "params": params}


def make_degrader(preset: str, seed: int, out_size: int | None):
    """The CPU degrader for ``preset`` producing ``out_size`` squares (None: the input's size).

    Raises:
        ImportError: the degradations package is missing; the message says what is needed.
    """
    try:
        from refface.degradations import Degrader, get_preset
    except ImportError as e:
        raise ImportError(f"LQ images need refface.degradations (Degrader, get_preset): {e}") from e
    return Degrader(get_preset(preset, out_size=out_size), seed)


def _encode_star(args: tuple[SampleJob, EncodeContext]):
    return encode_sample(*args)


# ----------------------------------------------------------------------------------------------
# Writing shards
# ----------------------------------------------------------------------------------------------


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
        if self.split not in ("train", "val", "test"):
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


def plan_jobs(root: str | os.PathLike, config: ShardsConfig) -> list[SampleJob]:
    """One job per target of the split's reference CSV, sorted by key (the shard order)."""
    root = Path(root)
    refs = read_split_references(root, config.split)
    embeddings = load_embedding_table(root)
    identities = load_identity_table(root)
    attributes = load_attribute_table(root)
    gts = [str(g) for g in refs["gt_image"]]
    keys = unique_keys(gts)
    has_lq = "lq_image" in refs.columns
    jobs = []
    for i, (key, gt) in enumerate(zip(keys, gts, strict=True)):
        ref_list = tuple(str(r) for r in refs["ref_image"].iloc[i][: config.max_refs])
        jobs.append(
            SampleJob(
                key=key,
                split=config.split,
                gt=gt,
                refs=ref_list,
                lq=str(refs["lq_image"].iloc[i]) if has_lq else None,
                identity=int(identities.get(gt, -1)),
                embedding=embeddings.get(gt),
                ref_embeddings=tuple(embeddings.get(r) for r in ref_list),
                attrs=attributes.get(gt),
            )
        )
    jobs.sort(key=lambda j: j.key)
    return jobs


def _member_bytes(members: dict[str, bytes]) -> int:
    """Bytes the sample takes in a tar: a 512-byte header per member plus data padded to 512."""
    return sum(512 + (len(v) + 511) // 512 * 512 for k, v in members.items() if k != "__key__")


class _HashingFile:
    """A write-only file that hashes and counts what passes through (no second read of the shard)."""

    def __init__(self, path: Path):
        import hashlib

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
        self.writer = None
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
        need = _member_bytes(members)
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
        from refface.manifests.atomic import write_json

        if self.writer is None:
            return
        self.writer.close()
        self.stream.close()
        name = shard_name(self.split, self.number)
        final = self.folder / name
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
    from refface.console import make_progress
    from refface.manifests.errors import ErrorsTable
    from refface.stages import fingerprint, folder_fingerprint

    config = config or ShardsConfig()
    config.validate()
    root, folder = Path(root), Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    image_root = image_root_of(root)
    jobs = plan_jobs(root, config)
    used = sorted({j.gt for j in jobs} | {r for j in jobs for r in j.refs})
    table_files = [
        f
        for f in (
            f"{config.split}_references.csv",
            *embeddings_files(root),
            "embeddings.parquet",
            "embeddings.json",
            "identities.parquet",
            "attributes.parquet",
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
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_encode_star, ((j, ctx) for j in jobs), chunksize=4)


# ----------------------------------------------------------------------------------------------
# Reading and verifying shards
# ----------------------------------------------------------------------------------------------


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, bytes]]:
    """Samples of one shard as {"__key__": key, member suffix: bytes}; raises ShardError on damage."""
    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = info.name.partition(".")
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise ShardError(f"shard {path}: member {info.name} is truncated")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[suffix] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard {path} is truncated or corrupt: {e}") from e
    if current is not None:
        yield current


def decode_member(suffix: str, data: bytes) -> Any:
    """Decode one member by its extension: images to (H, W, 3) uint8 RGB, npy, json, else bytes."""
    ext = suffix.rsplit(".", 1)[-1]
    if ext in IMAGE_EXTS:
        from refface.manifests.io import decode_image

        return decode_image(data)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data)
    return data


def verify_shard(path: str | os.PathLike, entry: ShardEntry, decode: bool = True) -> int:
    """Check one shard against its index entry: size, sha256, sample count and that members decode.

    Returns:
        The number of samples read.

    Raises:
        ShardError: anything that does not match; the message names the shard and what is wrong.
    """
    from refface.manifests.atomic import sha256_file

    path = Path(path)
    if not path.exists():
        raise ShardError(f"shard {path} is missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise ShardError(
            f"shard {path} has {size} bytes, the index says {entry.bytes} (truncated or replaced)"
        )
    if sha256_file(path) != entry.sha256:
        raise ShardError(f"shard {path} does not match its sha256 in the index (corrupt)")
    count = 0
    for sample in iter_tar_samples(path):
        if "meta.json" not in sample:
            raise ShardError(f"shard {path}: sample {sample['__key__']} has no meta.json")
        if decode:
            for suffix, data in sample.items():
                if suffix == "__key__":
                    continue
                try:
                    decode_member(suffix, data)
                except Exception as e:  # any decoder failure means the same: a corrupt member
                    raise ShardError(
                        f"shard {path}: {sample['__key__']}.{suffix} does not decode: {e}"
                    ) from e
        count += 1
    if count != entry.samples:
        raise ShardError(f"shard {path} holds {count} samples, the index says {entry.samples}")
    return count


def verify_shards(
    folder: str | os.PathLike, skip_bad_shards: bool = False, decode: bool = True
) -> dict[str, Any]:
    """Re-read every shard of every split index in ``folder`` and check it against the index.

    Args:
        folder: a shard folder written by :func:`write_shards`.
        skip_bad_shards: warn about bad shards and go on instead of raising on the first one.
        decode: also decode every member (images, npy, json), not only count samples.

    Returns:
        {"shards": n, "samples": n, "bad": [messages], "splits": [...]}

    Raises:
        FileNotFoundError: no index in the folder.
        ShardError: a bad shard when ``skip_bad_shards`` is False.
    """
    from refface.console import track
    from refface.manifests.shard_index import find_indexes

    folder = Path(folder)
    indexes = find_indexes(folder)
    if not indexes:
        raise FileNotFoundError(f"no shard index (index-<split>.json) in {folder}; is this a shard folder?")
    total_shards, total_samples, bad = 0, 0, []
    for _split, ipath in indexes.items():
        index = read_shard_index(ipath)
        for entry in track(index.shards, f"verify {index.split}"):
            total_shards += 1
            try:
                total_samples += verify_shard(folder / entry.name, entry, decode=decode)
            except ShardError as e:
                if not skip_bad_shards:
                    raise
                log.warning("skipping bad shard: %s", e)
                bad.append(str(e))
    return {"shards": total_shards, "samples": total_samples, "bad": bad, "splits": sorted(indexes)}
