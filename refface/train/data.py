"""Training inputs: WebDataset shards or a dataset root, ReF-LDM and MGFR sampling, augmentation, LQ on the fly.

Every random choice of a sample (reference pick, augmentation, flip, degradation, negative-quality
draw) comes from a generator seeded by ``(seed, epoch, key)``, so a resumed run sees the same data
whatever the worker count. Batches follow CONTRIBUTING.md's contracts: images float32
``(B, 3, H, W)`` in [-1, 1].

Epochs: the loaders, and their ``dataset``, have ``set_epoch(epoch)`` (the training loop calls it
before each pass). It must be called before ``iter(loader)``: DataLoader workers receive a copy of
the dataset when the iterator is created, so a later call reaches them only at the next pass. The
loaders built here never keep persistent workers, and ``set_epoch`` raises on one that does while
its workers are alive. The shard pipeline is rebuilt from ``(seed, epoch)`` at every pass, so an
epoch's stream does not depend on how many passes came before it (a resumed run included).
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refface.seeding import item_seed

log = logging.getLogger(__name__)

TRAIN_PRESET = "refldm-train"
DEFAULT_EMBEDDING_DIM = 512


@dataclass(frozen=True)
class RefAugment:
    """ReF-LDM reference augmentation (torchvision semantics, implemented with cv2/numpy)."""

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    degrees: float = 2.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.95, 1.05)
    perspective: float = 0.2
    perspective_p: float = 1.0  # the official ReF-LDM dataset: RandomPerspective(0.2, p=1.0)
    hflip_p: float = 0.5


# ----------------------------------------------------------------------------------------------
# Image ops (uint8 HWC RGB in, uint8 HWC RGB out)
# ----------------------------------------------------------------------------------------------


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``x``size`` (area filter when shrinking, bicubic when growing); no-op when equal."""
    import cv2

    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def color_jitter(img: np.ndarray, rng: np.random.Generator, aug: RefAugment) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter in a random order (as torchvision ColorJitter).

    Each op is torchvision's blend (with black, the mean grey, the greyscale image; hue as a shift
    in HSV), done in uint8 with cv2 for speed: results match torchvision up to rounding per step.
    """
    import cv2

    factors = {
        "b": rng.uniform(1 - aug.brightness, 1 + aug.brightness),
        "c": rng.uniform(1 - aug.contrast, 1 + aug.contrast),
        "s": rng.uniform(1 - aug.saturation, 1 + aug.saturation),
        "h": rng.uniform(-aug.hue, aug.hue),
    }
    strength = {"b": aug.brightness, "c": aug.contrast, "s": aug.saturation, "h": aug.hue}
    x = img
    for op in rng.permutation(["b", "c", "s", "h"]):
        f = float(factors[op])
        if strength[op] == 0:
            continue  # as torchvision: a zero range means the op is off (the HSV round trip is lossy)
        if op == "b":
            x = cv2.convertScaleAbs(x, alpha=f)
        elif op == "c":
            mean = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
            x = cv2.addWeighted(x, f, x, 0.0, (1.0 - f) * mean)
        elif op == "s":
            gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            x = cv2.addWeighted(x, f, gray, 1.0 - f, 0.0)
        else:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
            hsv[..., 0] += np.uint8(int(round(f * 256)) % 256)  # uint8 wraps: hue is circular
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    return x


def affine_matrix(rng: np.random.Generator, aug: RefAugment, w: int, h: int) -> np.ndarray:
    """3x3 matrix: rotation ±degrees, translation ±translate·size, scale in ``aug.scale`` about the centre."""
    import cv2

    angle = rng.uniform(-aug.degrees, aug.degrees)
    scale = rng.uniform(*aug.scale)
    tx = rng.uniform(-aug.translate, aug.translate) * w
    ty = rng.uniform(-aug.translate, aug.translate) * h
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D((w * 0.5, h * 0.5), angle, scale)
    m[:2, 2] += (tx, ty)
    return m


def perspective_matrix(rng: np.random.Generator, distortion: float, w: int, h: int) -> np.ndarray:
    """3x3 matrix moving each corner inwards by up to ``distortion``·half-size (torchvision RandomPerspective)."""
    import cv2

    hw, hh = distortion * w / 2, distortion * h / 2
    src = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    sx = rng.uniform(0, hw, 4)
    sy = rng.uniform(0, hh, 4)
    dst = np.float32(
        [[sx[0], sy[0]], [w - 1 - sx[1], sy[1]], [w - 1 - sx[2], h - 1 - sy[2]], [sx[3], h - 1 - sy[3]]]
    )
    return cv2.getPerspectiveTransform(src, dst)


def random_perspective(img: np.ndarray, rng: np.random.Generator, distortion: float) -> np.ndarray:
    """Apply a random perspective distortion on its own (see :func:`perspective_matrix`)."""
    import cv2

    h, w = img.shape[:2]
    m = perspective_matrix(rng, distortion, w, h)
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def augment_reference(img: np.ndarray, rng: np.random.Generator, aug: RefAugment | None = None) -> np.ndarray:
    """The ReF-LDM reference augmentation: colour jitter, affine, perspective (p), horizontal flip (p).

    Affine, perspective and flip are composed into one matrix and applied in a single warp: one
    resampling instead of three (faster and less blur than torchvision's chain, same geometry).
    """
    import cv2

    aug = aug or RefAugment()
    h, w = img.shape[:2]
    img = color_jitter(img, rng, aug)
    m = affine_matrix(rng, aug, w, h)
    if rng.random() < aug.perspective_p:
        m = perspective_matrix(rng, aug.perspective, w, h) @ m
    if rng.random() < aug.hflip_p:
        m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def to_tensor(img: np.ndarray, out=None):
    """(H, W, 3) uint8 -> float32 (3, H, W) in [-1, 1], written into ``out`` when given.

    Channel planes are copied by numpy and scaled in place: a few times faster than torch's
    permute + float + div on a busy CPU, with identical values (x / 127.5 - 1 in float32).
    """
    import torch

    h, w = img.shape[:2]
    if out is None:
        out = torch.empty(3, h, w)
    planes = out.numpy()
    for c in range(3):
        planes[c] = img[:, :, c]
    planes /= 127.5
    planes -= 1.0
    return out


def fill_references(n: int, k: int, rng: np.random.Generator | None) -> list[int]:
    """Indices of ``k`` reference slots from ``n`` references: distinct when n >= k, else repeated to fill.

    With ``rng`` the choice and the slot order are shuffled (training); without, the first ``k`` in
    order, cycled (evaluation). Empty when ``n == 0``.
    """
    if n == 0:
        return []
    if rng is None:
        return [i % n for i in range(k)]
    if n >= k:
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    picks = [i % n for i in range(k)]
    return [int(i) for i in rng.permutation(picks)]


# ----------------------------------------------------------------------------------------------
# Raw samples: one format for shards and for dataset roots
# ----------------------------------------------------------------------------------------------


def decode_shard_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample (member suffix -> bytes) as a raw sample.

    Raw sample: ``key``, ``hq`` (H, W, 3) uint8, ``refs`` list of uint8 images, ``id_embedding``
    (D,) or None, ``ref_embeddings`` (K, D) or None, ``attrs`` dict, ``meta`` dict, ``lq`` or None.
    """
    from refface.builders.shards import decode_member

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
        from refface.builders.shards import ShardsConfig, image_root_of, plan_jobs

        self.root = Path(root)
        self.image_root = image_root_of(self.root)
        self.jobs = plan_jobs(self.root, ShardsConfig(split=split, max_refs=max_refs))

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from refface.builders.shards import attrs_record
        from refface.manifests.errors import ImageError
        from refface.manifests.io import read_image

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
            "ref_embeddings": np.stack(embs) if embs and all(e is not None for e in embs) else None,
            "attrs": attrs_record(job.attrs),
            "meta": {"key": job.key, "identity": job.identity, "split": job.split, "path": job.gt},
            "lq": lq,
            "degrade": None,
        }


# ----------------------------------------------------------------------------------------------
# Sampling transforms (raw sample -> training sample of tensors)
# ----------------------------------------------------------------------------------------------


class _Degrade:
    """The CPU degrader, built lazily in each worker (it is not needed in the main process)."""

    def __init__(self, preset: str, seed: int, size: int):
        self.preset = preset
        self.seed = seed
        self.size = size
        self._degrader = None

    def __call__(self, img: np.ndarray, key: str) -> np.ndarray:
        if self._degrader is None:
            from refface.builders.shards import make_degrader

            self._degrader = make_degrader(self.preset, self.seed, out_size=self.size)
        lq, _params = self._degrader.degrade(img, key)
        return lq

    def __getstate__(self):
        return {**self.__dict__, "_degrader": None}


@dataclass
class SamplingConfig:
    """Shared settings of both sampling transforms."""

    resolution: int = 512
    seed: int = 0
    epoch: int = 0
    train: bool = True
    preset: str = TRAIN_PRESET
    augment: RefAugment = RefAugment()


class _Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.degrade = _Degrade(config.preset, config.seed, config.resolution)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentation, LQ and negative-quality choice from now on."""
        self.config.epoch = int(epoch)

    def rng(self, key: str) -> np.random.Generator:
        return np.random.default_rng(item_seed(self.config.seed, f"{self.config.epoch}\0{key}"))

    def degrade_key(self, key: str, tag: str = "lq") -> str:
        # Epoch in the key: a new LQ every epoch, the same one after a resume.
        return f"{self.config.epoch}/{key}/{tag}"

    def gt_and_lq(
        self, raw: dict[str, Any], rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        res = self.config.resolution
        gt = resize_square(raw["hq"], res)
        flip = rng is not None and rng.random() < 0.5
        if raw.get("lq") is not None and not self.config.train:
            lq = resize_square(raw["lq"], res)
        else:
            lq = None
        if flip:
            gt = np.ascontiguousarray(gt[:, ::-1])
        if lq is None:
            lq = self.degrade(gt, self.degrade_key(raw["key"]))
        return gt, lq

    def reference(self, img: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        ref = resize_square(img, self.config.resolution)
        return augment_reference(ref, rng, self.config.augment) if rng is not None else ref


class RefLDMSampler(_Sampler):
    """ReF-LDM sampling: ``num_refs`` references (repeat to fill, shuffled), reference augmentation,
    whole-sample horizontal flip, LQ from the target with the training preset."""

    def __init__(self, config: SamplingConfig, num_refs: int = 5):
        super().__init__(config)
        self.num_refs = num_refs

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        import torch

        rng = self.rng(raw["key"]) if self.config.train else None
        gt, lq = self.gt_and_lq(raw, rng)
        res = self.config.resolution
        slots = fill_references(len(raw["refs"]), self.num_refs, rng)
        refs = torch.empty(self.num_refs, 3, res, res)
        mask = torch.zeros(self.num_refs, dtype=torch.bool)
        for j, i in enumerate(slots):
            to_tensor(self.reference(raw["refs"][i], rng), out=refs[j])
            mask[j] = True
        refs[len(slots) :] = 0.0  # empty slots (no references at all) are zero images, masked out
        return {"gt": to_tensor(gt), "lq": to_tensor(lq), "refs": refs, "ref_mask": mask, "key": raw["key"]}


class MGFRSampler(_Sampler):
    """MGFR sampling: one reference, the identity embedding of that reference, the attribute prompt.

    Negative samples (their target degraded with the training preset): a ``negative_quality_fraction``
    of samples get the negative-quality prompt, a ``negative_attribute_fraction`` the sample's
    negative-attribute prompt (attributes the face does not have). One uniform draw per sample and
    epoch decides, from its own generator, so the shares hold whatever the other draws are. A sample
    drawn for a negative-attribute prompt that has none stays a positive sample (``attrs_missing``
    counts them in the batch logs).

    The identity embedding is the reference's (what the identity extractor sees at inference), else
    the target's, else zeros. A sample without references gets a zero reference and zero embedding.
    """

    def __init__(
        self,
        config: SamplingConfig,
        negative_quality_fraction: float = 0.1,
        embedding_dim: int | None = None,
        negative_attribute_fraction: float = 0.0,
    ):
        super().__init__(config)
        shares = (negative_quality_fraction, negative_attribute_fraction)
        if min(shares) < 0.0 or sum(shares) > 1.0:
            raise ValueError(
                "negative_quality_fraction and negative_attribute_fraction must be >= 0 and sum to at most 1"
            )
        self.negative_quality_fraction = negative_quality_fraction
        self.negative_attribute_fraction = negative_attribute_fraction
        self.embedding_dim = embedding_dim

    def negative_kind(self, key: str) -> str | None:
        """``"quality"``, ``"attribute"`` or None (a positive sample) for ``key`` in this epoch."""
        if not self.config.train:
            return None
        u = np.random.default_rng(item_seed(self.config.seed, f"{self.config.epoch}\0{key}\0negq")).random()
        if u < self.negative_quality_fraction:
            return "quality"
        if u < self.negative_quality_fraction + self.negative_attribute_fraction:
            return "attribute"
        return None

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        import torch

        from refface.mining.attributes import FALLBACK_PROMPT, NEGATIVE_QUALITY_PROMPT
        from refface.mining.embed import check_embedding_dim

        rng = self.rng(raw["key"]) if self.config.train else None
        gt, lq = self.gt_and_lq(raw, rng)
        res = self.config.resolution
        n = len(raw["refs"])
        if n:
            i = int(rng.integers(n)) if rng is not None else 0
            ref = to_tensor(self.reference(raw["refs"][i], rng))
        else:
            i = -1
            ref = torch.zeros(3, res, res)
        emb = None
        if i >= 0 and raw.get("ref_embeddings") is not None:
            emb = raw["ref_embeddings"][i]
        elif raw.get("id_embedding") is not None:
            emb = raw["id_embedding"]
        dim = self.embedding_dim or (len(emb) if emb is not None else DEFAULT_EMBEDDING_DIM)
        if emb is not None:
            check_embedding_dim(
                len(emb),
                f"sample {raw['key']}",
                dim,
                "this input pipeline (embedding_dim)",
                "every sample of one dataset must carry embeddings of one model",
            )
        emb = np.zeros(dim, np.float32) if emb is None else np.asarray(emb, np.float32)
        attrs = raw.get("attrs") or {}
        prompt = attrs.get("prompt") or FALLBACK_PROMPT
        kind = self.negative_kind(raw["key"])
        missing = kind == "attribute" and not attrs.get("negative_attribute_prompt")
        if missing:
            kind = None
        if kind is not None:
            gt = self.degrade(gt, self.degrade_key(raw["key"], "negq"))
            if kind == "quality":
                prompt = attrs.get("negative_quality_prompt") or NEGATIVE_QUALITY_PROMPT
            else:
                prompt = attrs["negative_attribute_prompt"]
        return {
            "gt": to_tensor(gt),
            "lq": to_tensor(lq),
            "ref": ref,
            "id_embedding": torch.from_numpy(emb),
            "prompt": prompt,
            "negative_quality": torch.tensor(kind == "quality"),
            "negative_attribute": torch.tensor(kind == "attribute"),
            "attrs_missing": torch.tensor(missing),
            "key": raw["key"],
        }


# ----------------------------------------------------------------------------------------------
# Sources and pipelines
# ----------------------------------------------------------------------------------------------


def is_dataset_root(source: str | os.PathLike, split: str = "train") -> bool:
    return Path(source).is_dir() and (Path(source) / f"{split}_references.csv").exists()


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

    from refface.builders.shards import ShardError
    from refface.manifests.shard_index import index_path, read_shard_index

    if isinstance(source, (list, tuple)):
        return [str(s) for s in source], None
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
    from refface.builders.shards import ShardError

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


def _worker_init(_worker_id: int) -> None:
    """One BLAS thread per DataLoader worker: the workers already fill the cores, and oversubscribed
    BLAS threads made the degradation several times slower (bench/loader.py).

    Only BLAS: calling ``cv2.setNumThreads`` or the OpenMP runtime in a forked worker whose parent
    already ran their thread pools can hang the worker; torch limits its own pool in workers.
    """
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:
        pass


class _MapDataset:
    """A map-style torch dataset: raw samples from a :class:`ReferenceDataset` through a sampler."""

    def __init__(self, raw: ReferenceDataset, transform: _Sampler):
        self.raw = raw
        self.transform = transform

    @property
    def epoch(self) -> int:
        return self.transform.config.epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw the samples of ``epoch`` (call before iterating: workers copy the dataset then)."""
        self.transform.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int):
        return self.transform(self.raw[i])


@functools.cache
def _stream_class() -> type:
    """:class:`torch.utils.data.IterableDataset` subclass of the shard stream, built on first use so
    that importing this module does not import torch."""
    import torch

    class ShardStream(torch.utils.data.IterableDataset):
        """Shard samples of one epoch: the WebDataset pipeline rebuilt from ``(seed, epoch)`` per pass.

        Rebuilding makes the shard draws, the shuffle and every sample a function of the epoch alone:
        WebDataset's stages keep their own pass counters, which differ between the main process
        (counting every pass) and fresh worker copies (always at their first pass).
        """

        def __init__(self, urls: Sequence[str], sampler: _Sampler, options: dict[str, Any]):
            self.urls = list(urls)
            self.sampler = sampler
            self.options = options

        @property
        def epoch(self) -> int:
            return self.sampler.config.epoch

        def set_epoch(self, epoch: int) -> None:
            """Stream ``epoch`` from the next pass on (call before iterating: workers copy the dataset)."""
            self.sampler.set_epoch(epoch)

        def __iter__(self):
            return iter(make_shard_dataset(self.urls, self.sampler, epoch=self.epoch, **self.options))

        def __reduce__(self):
            # The class is local to a function: pickle (spawned workers) rebuilds it through the factory.
            return _make_stream, (self.urls, self.sampler, self.options)

    return ShardStream


def _make_stream(urls: Sequence[str], sampler: _Sampler, options: dict[str, Any]):
    return _stream_class()(urls, sampler, options)


@functools.cache
def _loader_class() -> type:
    """DataLoader with ``set_epoch`` (built on first use, as :func:`_stream_class`)."""
    import torch

    class EpochDataLoader(torch.utils.data.DataLoader):
        """A DataLoader whose ``set_epoch`` selects the epoch of its dataset and, when it shuffles,
        reseeds its shuffle from ``(seed, epoch)``, so each epoch's order and samples are the same in
        a resumed run."""

        def __init__(self, *args, shuffle_seed: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.shuffle_seed = shuffle_seed

        def set_epoch(self, epoch: int) -> None:
            """Use ``epoch`` from the next ``iter(loader)`` on."""
            if self.persistent_workers and getattr(self, "_iterator", None) is not None:
                raise RuntimeError(
                    "set_epoch cannot reach persistent DataLoader workers that are already running; "
                    "build the loader with persistent_workers=False"
                )
            self.dataset.set_epoch(epoch)
            if self.shuffle_seed is not None and self.generator is not None:
                self.generator.manual_seed(_shuffle_seed(self.shuffle_seed, epoch))

    return EpochDataLoader


def _shuffle_seed(seed: int, epoch: int) -> int:
    return int(item_seed(seed, f"epoch{int(epoch)}") % (2**63))


def _make_loader(
    source,
    sampler: _Sampler,
    batch_size: int,
    num_workers: int,
    *,
    split: str,
    max_refs: int,
    seed: int,
    epoch: int,
    resampled: bool,
    shuffle_buffer: int,
    samples_per_epoch: int | None,
    skip_bad_shards: bool,
    drop_last: bool,
):
    import torch
    import webdataset as wds

    loader_class = _loader_class()
    sampler.set_epoch(epoch)
    if not isinstance(source, (list, tuple)) and is_dataset_root(source, split):
        dataset = _MapDataset(ReferenceDataset(source, split, max_refs=max_refs), sampler)
        generator = torch.Generator().manual_seed(_shuffle_seed(seed, epoch))
        # persistent_workers stays off: workers must be re-created per pass to see set_epoch.
        return loader_class(
            dataset,
            batch_size=batch_size,
            shuffle=sampler.config.train,
            generator=generator,
            shuffle_seed=seed if sampler.config.train else None,
            num_workers=num_workers,
            drop_last=drop_last,
            worker_init_fn=_worker_init if num_workers > 0 else None,
        )
    urls, count = resolve_shards(source, split, skip_bad_shards)
    total = samples_per_epoch or count
    per_worker = None
    if resampled:
        if total is None:
            raise ValueError("samples_per_epoch is needed with resampling when the shards have no index")
        _rank, world, _w, _n = wds.utils.pytorch_worker_info()
        per_worker = math.ceil(total / (world * max(1, num_workers)))
    options = {
        "seed": seed,
        "resampled": resampled,
        "shuffle_buffer": shuffle_buffer,
        "samples_per_worker": per_worker,
        "skip_bad_shards": skip_bad_shards,
    }
    dataset = _make_stream(urls, sampler, options)
    return loader_class(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


def infer_embedding_dim(
    source, split: str = "train", default: int | None = DEFAULT_EMBEDDING_DIM
) -> int | None:
    """D of the identity embeddings of a source: ``embeddings.json`` / ``embeddings.npy`` of a root,
    else the first shard sample that carries one, else ``default``."""
    from refface.builders.shards import decode_member, iter_tar_samples

    if not isinstance(source, (list, tuple)) and is_dataset_root(source, split):
        meta, path = Path(source) / "embeddings.json", Path(source) / "embeddings.npy"
        if meta.exists():
            return int(json.loads(meta.read_text())["dim"])
        return int(np.load(path, mmap_mode="r").shape[1]) if path.exists() else default
    try:
        urls, _ = resolve_shards(source, split, skip_bad_shards=True)
        for sample in iter_tar_samples(urls[0]):
            for name in ("id.npy", "refemb.npy"):
                if name in sample:
                    return int(decode_member(name, sample[name]).shape[-1])
    except Exception as e:  # unreadable here: the loader reports it properly
        log.debug("embedding size not inferred from %s: %s", source, e)
    return default


def make_refldm_dataloader(
    source,
    batch_size: int,
    num_workers: int,
    resolution: int = 512,
    num_refs: int = 5,
    seed: int = 0,
    *,
    epoch: int = 0,
    split: str = "train",
    train: bool = True,
    preset: str = TRAIN_PRESET,
    resampled: bool | None = None,
    shuffle_buffer: int = 1000,
    samples_per_epoch: int | None = None,
    skip_bad_shards: bool = False,
    drop_last: bool | None = None,
    ref_augment: dict | None = None,
):
    """ReF-LDM batches ``{"gt", "lq", "refs" (B, K, 3, H, W), "ref_mask" (B, K), "key"}``.

    Args:
        source: shard folder / pattern / list of shards, or a dataset root (map-style over the CSV).
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes.
        resolution: square output size; stored images are resized when they differ.
        num_refs: reference slots K (references repeat to fill, shuffled).
        seed: base seed; every sample's randomness derives from (seed, epoch, key).
        epoch: first epoch (changes augmentation, LQ and order; the same after a resume). Later
            epochs: ``loader.set_epoch(e)`` before ``iter(loader)`` (the training loop does it).
        split: which split's shards / CSV to read.
        train: augment and degrade on the fly; False gives deterministic evaluation samples
            (first K references in order, stored fixed LQ when present).
        preset: degradation preset for the on-the-fly LQ.
        resampled: WebDataset resampling (DDP-safe uneven shards); False = one pass over the shards
            (default: ``train``).
        shuffle_buffer: sample shuffle buffer size (0 = off).
        samples_per_epoch: samples per epoch over all ranks (default: the index's sample count).
        skip_bad_shards: warn and skip unreadable shards instead of raising.
        drop_last: drop an incomplete last batch (default: ``train``).
        ref_augment: :class:`RefAugment` fields to change (config ``data.extra.ref_augment``).
    """
    augment = RefAugment(**(ref_augment or {}))
    sampler = RefLDMSampler(
        SamplingConfig(
            resolution=resolution, seed=seed, epoch=epoch, train=train, preset=preset, augment=augment
        ),
        num_refs,
    )
    return _make_loader(
        source,
        sampler,
        batch_size,
        num_workers,
        split=split,
        max_refs=num_refs,
        seed=seed,
        epoch=epoch,
        resampled=train if resampled is None else resampled,
        shuffle_buffer=shuffle_buffer if train else 0,
        samples_per_epoch=samples_per_epoch,
        skip_bad_shards=skip_bad_shards,
        drop_last=train if drop_last is None else drop_last,
    )


def make_mgfr_dataloader(
    source,
    batch_size: int,
    num_workers: int,
    resolution: int = 512,
    negative_quality_fraction: float = 0.1,
    seed: int = 0,
    *,
    negative_attribute_fraction: float = 0.0,
    epoch: int = 0,
    split: str = "train",
    train: bool = True,
    preset: str = TRAIN_PRESET,
    embedding_dim: int | None = None,
    resampled: bool | None = None,
    shuffle_buffer: int = 1000,
    samples_per_epoch: int | None = None,
    skip_bad_shards: bool = False,
    drop_last: bool | None = None,
):
    """MGFR batches ``{"gt", "lq", "ref", "id_embedding" (B, D), "prompt", "negative_quality" (B,),
    "negative_attribute" (B,), "attrs_missing" (B,), "key"}``.

    Args are those of :func:`make_refldm_dataloader`, plus:
        negative_quality_fraction: share of samples whose target is degraded and whose prompt is the
            negative-quality prompt (0 in evaluation).
        negative_attribute_fraction: share of samples whose target is degraded and whose prompt is the
            sample's negative-attribute prompt (0 in evaluation).
        embedding_dim: D of ``id_embedding`` (default: :func:`infer_embedding_dim`); samples without
            an embedding get zeros of this size.
    """
    sampler = MGFRSampler(
        SamplingConfig(resolution=resolution, seed=seed, epoch=epoch, train=train, preset=preset),
        negative_quality_fraction=negative_quality_fraction,
        negative_attribute_fraction=negative_attribute_fraction,
        # One D for every sample, so a sample without an embedding still collates with the others.
        embedding_dim=embedding_dim or infer_embedding_dim(source, split),
    )
    return _make_loader(
        source,
        sampler,
        batch_size,
        num_workers,
        split=split,
        max_refs=5,
        seed=seed,
        epoch=epoch,
        resampled=train if resampled is None else resampled,
        shuffle_buffer=shuffle_buffer if train else 0,
        samples_per_epoch=samples_per_epoch,
        skip_bad_shards=skip_bad_shards,
        drop_last=train if drop_last is None else drop_last,
    )
