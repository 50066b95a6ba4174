"""The WebDataset format of refface shards, shared by the writer (``refface.builders.shards``) and the
reader (``refface.train``): sample keys, member names, member encoding and decoding, tar iteration,
verification against the shard index, and the per-target sample plan of a dataset root.

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

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refface.console import track
from refface.manifests.atomic import sha256_file
from refface.manifests.io import decode_image
from refface.manifests.root import DatasetRoot
from refface.manifests.shard_index import ShardEntry, ShardError, find_indexes, read_shard_index

log = logging.getLogger(__name__)

CODECS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


# Fixed tar member metadata so the same samples always give the same bytes.
TAR_MTIME = 0


TAR_USER = "refface"


TAR_MODE = 0o644


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(path: str) -> str:
    """WebDataset key of a target path: no extension, no dots, no slashes."""
    stem = path.rsplit(".", 1)[0] if "." in Path(path).name else path
    return _KEY_BAD.sub("_", stem)


def unique_keys(paths: Sequence[str]) -> list[str]:
    """Keys for ``paths``; two paths that sanitize alike get a short hash of the path appended."""
    keys = [sample_key(p) for p in paths]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return [
        k if counts[k] == 1 else f"{k}_{hashlib.sha256(p.encode()).hexdigest()[:8]}"
        for k, p in zip(keys, paths, strict=True)
    ]


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


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, default=_json_default) + "\n").encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def plan_jobs(root: str | os.PathLike, split: str, max_refs: int) -> list[SampleJob]:
    """One job per target of the split's reference CSV, sorted by key (the shard order).

    Each job carries the target's first ``max_refs`` references, its identity, the embeddings of the
    target and references (when the root holds embeddings) and its attributes row (when known).
    """
    dataset = DatasetRoot(root)
    refs = dataset.references(split)
    embeddings = _embedding_by_path(dataset)
    identities = dataset.identity_of()
    attributes = dataset.attributes_of()
    gts = [str(g) for g in refs["gt_image"]]
    keys = unique_keys(gts)
    has_lq = "lq_image" in refs.columns
    jobs = []
    for i, (key, gt) in enumerate(zip(keys, gts, strict=True)):
        ref_list = tuple(str(r) for r in refs["ref_image"].iloc[i][:max_refs])
        jobs.append(
            SampleJob(
                key=key,
                split=split,
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


def _embedding_by_path(root: DatasetRoot) -> dict[str, np.ndarray]:
    """{image path: float32 embedding} of the first face of each image; {} without embeddings."""
    if not root.has_vector_files():
        return {}
    emb = root.embeddings(first_per_image=True)
    return {p: emb.vectors[i] for i, p in enumerate(emb.paths)}


def tar_size(members: dict[str, bytes]) -> int:
    """Bytes the sample takes in a tar: a 512-byte header per member plus data padded to 512."""
    return sum(512 + (len(v) + 511) // 512 * 512 for k, v in members.items() if k != "__key__")


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Samples of one shard as {"__key__": key, member suffix: bytes}; raises ShardError on damage."""
    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = info.name.partition(".")
                member = tar.extractfile(info)
                if member is None:
                    raise ShardError(f"shard {path}: member {info.name} cannot be read")
                data = member.read()
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
