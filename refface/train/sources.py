"""Where raw samples come from: WebDataset shards (resolved from a folder, pattern or list, checked
against their index) or a dataset root's reference CSV (map-style, no shards; small data)."""

from __future__ import annotations

import functools
import glob
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refface.manifests.errors import ImageError
from refface.manifests.io import read_image
from refface.manifests.root import DatasetRoot
from refface.manifests.shard_index import index_path, read_shard_index
from refface.manifests.webdataset import ShardError, decode_member, iter_tar_samples, plan_jobs
from refface.mining.attributes import attrs_record
from refface.seeding import item_seed
from refface.train.samplers import DEFAULT_EMBEDDING_DIM

log = logging.getLogger(__name__)


def decode_shard_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample (member suffix -> bytes) as a raw sample.

    Raw sample: ``key``, ``hq`` (H, W, 3) uint8, ``refs`` list of uint8 images, ``id_embedding``
    (D,) or None, ``ref_embeddings`` (K, D) or None, ``attrs`` dict, ``meta`` dict, ``lq`` or None.
    """
    refs = []
    i = 0
    while True:
        name = next((s for s in sample if s.startswith(f"ref{i}.") and s != f"ref{i}.npy"), None)
        if name is None:
            break
        refs.append(decode_member(name, sample[name]))
        i += 1
    hq_name = next(s for s in sample if s.startswith("hq."))
    lq_name = next((s for s in sample if s.startswith("lq.")), None)
    return {
        "key": sample["__key__"],
        "hq": decode_member(hq_name, sample[hq_name]),
        "refs": refs,
        "id_embedding": decode_member("id.npy", sample["id.npy"]) if "id.npy" in sample else None,
        "ref_embeddings": decode_member("refemb.npy", sample["refemb.npy"])
        if "refemb.npy" in sample
        else None,
        "attrs": decode_member("attrs.json", sample["attrs.json"]) if "attrs.json" in sample else {},
        "meta": decode_member("meta.json", sample["meta.json"]) if "meta.json" in sample else {},
        "lq": decode_member(lq_name, sample[lq_name]) if lq_name else None,
        "degrade": decode_member("degrade.json", sample["degrade.json"])
        if "degrade.json" in sample
        else None,
    }


class ReferenceDataset:
    """Map-style raw samples straight from a dataset root's reference CSV (no shards; small data)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", max_refs: int = 5):
        dataset = DatasetRoot(root)
        self.root = dataset.path
        self.image_root = dataset.image_root() or self.root
        self.jobs = plan_jobs(self.root, split, max_refs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        job = self.jobs[i]
        refs, embs = [], []
        for rel, emb in zip(job.refs, job.ref_embeddings, strict=True):
            try:
                refs.append(read_image(self.image_root / rel))
                embs.append(emb)
            except ImageError as e:
                log.warning("reference %s of %s skipped: %s", rel, job.gt, e)
        lq = None
        if job.lq and job.lq != job.gt:
            for base in (self.image_root, self.root):
                if (base / job.lq).exists():
                    lq = read_image(base / job.lq)
                    break
        return {
            "key": job.key,
            "hq": read_image(self.image_root / job.gt),
            "refs": refs,
            "id_embedding": job.embedding,
            "ref_embeddings": np.stack([e for e in embs if e is not None])
            if embs and all(e is not None for e in embs)
            else None,
            "attrs": attrs_record(job.attrs),
            "meta": {"key": job.key, "identity": job.identity, "split": job.split, "path": job.gt},
            "lq": lq,
            "degrade": None,
        }


def is_dataset_root(source: str | os.PathLike, split: str = "train") -> bool:
    """A dataset root with a reference CSV for ``split`` (read map-style), rather than shards."""
    return DatasetRoot(source).has_references(split)


def resolve_shards(
    source: str | os.PathLike | Sequence[str], split: str = "train", skip_bad_shards: bool = False
) -> tuple[list[str], int | None]:
    """Shard URLs of a source and its sample count (None when unknown).

    ``source``: a shard folder (its ``index-<split>.json`` when present, else every ``*.tar``), a
    brace or glob pattern, or a list of shard paths. With an index, shards whose size differs from
    the index (truncated, replaced) raise :class:`ShardError` naming them, or are dropped with a
    warning when ``skip_bad_shards``.
    """
    import braceexpand

    if isinstance(source, (list, tuple)):
        return [str(s) for s in source], None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"shards must be a folder, a brace pattern or a list of tar paths, got {source!r}")
    path = Path(source)
    if path.is_dir():
        ipath = index_path(path, split)
        if not ipath.exists():
            urls = sorted(str(p) for p in path.glob(f"{split}-*.tar")) or sorted(
                str(p) for p in path.glob("*.tar")
            )
            if not urls:
                raise FileNotFoundError(f"no shards in {path}")
            return urls, None
        index = read_shard_index(ipath)
        urls, count = [], 0
        for entry in index.shards:
            shard = path / entry.name
            size = shard.stat().st_size if shard.exists() else -1
            if size != entry.bytes:
                what = "missing" if size < 0 else f"{size} bytes, the index says {entry.bytes}"
                message = (
                    f"shard {shard} is truncated or corrupt ({what}); run `refface shards verify {path}`"
                )
                if not skip_bad_shards:
                    raise ShardError(message)
                log.warning("skipping bad shard: %s", message)
                continue
            urls.append(str(shard))
            count += entry.samples
        if not urls:
            raise ShardError(f"no usable shards in {path}")
        return urls, count
    urls = [
        u for pattern in braceexpand.braceexpand(str(source)) for u in sorted(glob.glob(pattern)) or [pattern]
    ]
    return urls, None


def _shard_url_of(exn: BaseException) -> str:
    for arg in getattr(exn, "args", ()):
        if isinstance(arg, str) and (".tar" in arg):
            return arg
    return "<unknown shard>"


def _raise_naming_shard(exn: BaseException) -> bool:
    if isinstance(exn, ShardError):
        raise exn
    raise ShardError(f"shard {_shard_url_of(exn)} is truncated or corrupt: {exn}") from exn


def _warn_and_skip(exn: BaseException) -> bool:
    log.warning("skipping unreadable data in shard %s: %s", _shard_url_of(exn), exn)
    return True


def _chain(*fns: Callable | None) -> Callable:
    steps = [f for f in fns if f is not None]

    def run(sample):
        for f in steps:
            sample = f(sample)
        return sample

    return run


def _map_stage(src, fn: Callable, handler: Callable):
    """A generator stage applying ``fn`` with an injected error handler.

    Unlike ``wds.map`` it does not copy ``__key__`` into the result, so batches hold exactly the
    contract's keys.
    """
    for sample in src:
        try:
            result = fn(sample)
        except Exception as exn:  # the handler decides: re-raise naming the shard, or skip
            if handler(exn):
                continue
            break
        yield result


def make_shard_dataset(
    urls: Sequence[str],
    transform: Callable[[dict[str, Any]], Any] | None,
    *,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    samples_per_worker: int | None = None,
    skip_bad_shards: bool = False,
):
    """The WebDataset pipeline: shards split by node and worker, shuffle buffer, decode, transform.

    With ``resampled`` each worker draws shards with replacement from a generator seeded by
    (seed, epoch, rank, worker) and ``with_epoch(samples_per_worker)`` ends its epoch; without, every
    shard goes to exactly one (rank, worker), so each sample is seen once per pass.
    """
    import webdataset as wds

    handler = _warn_and_skip if skip_bad_shards else _raise_naming_shard
    ds = wds.WebDataset(
        list(urls),
        resampled=resampled,
        shardshuffle=False if resampled else (len(urls) if shuffle_buffer > 0 else False),
        detshuffle=True,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        handler=handler,
        empty_check=False,
        seed=wds.utils.make_seed(seed, epoch),
    )
    if resampled:
        # WebDataset's own resampler reseeds from pid and time; this one is deterministic per
        # (rank, worker, seed, epoch) so a resumed run draws the same shards.
        ds.pipeline[0] = wds.ResampledShards(
            list(urls), seed=wds.utils.make_seed(seed, epoch), deterministic=True
        )
    if shuffle_buffer > 0:
        # Integer seeds only: wds.make_seed hashes its arguments, and str hashes change per process.
        ds = ds.shuffle(shuffle_buffer, seed=item_seed(seed, f"sample-shuffle/{epoch}") % (2**31))
    ds = ds.compose(functools.partial(_map_stage, fn=_chain(decode_shard_sample, transform), handler=handler))
    if resampled and samples_per_worker:
        ds = ds.with_epoch(samples_per_worker)
    return ds


def infer_embedding_dim(
    source, split: str = "train", default: int | None = DEFAULT_EMBEDDING_DIM
) -> int | None:
    """D of the identity embeddings of a source: ``embeddings.json`` / ``embeddings.npy`` of a root,
    else the first shard sample that carries one, else ``default``."""

    if not isinstance(source, (list, tuple)) and is_dataset_root(source, split):
        dim = DatasetRoot(source).embedding_dim()
        return default if dim is None else dim
    try:
        urls, _ = resolve_shards(source, split, skip_bad_shards=True)
        for sample in iter_tar_samples(urls[0]):
            for name in ("id.npy", "refemb.npy"):
                if name in sample:
                    return int(decode_member(name, sample[name]).shape[-1])
    except Exception as e:  # unreadable here: the loader reports it properly
        log.debug("embedding size not inferred from %s: %s", source, e)
    return default
