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

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from refface.seeding import item_seed
from refface.train.augment import RefAugment
from refface.train.samplers import TRAIN_PRESET, MGFRSampler, RefLDMSampler, Sampler, SamplingConfig
from refface.train.sources import (
    ReferenceDataset,
    infer_embedding_dim,
    is_dataset_root,
    make_shard_dataset,
    resolve_shards,
)

log = logging.getLogger(__name__)


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

    def __init__(self, raw: ReferenceDataset, transform: Sampler):
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

        def __init__(self, urls: Sequence[str], sampler: Sampler, options: dict[str, Any]):
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


def _make_stream(urls: Sequence[str], sampler: Sampler, options: dict[str, Any]):
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
            dataset: Any = self.dataset  # the datasets this loader is built on all have set_epoch
            dataset.set_epoch(epoch)
            if self.shuffle_seed is not None and self.generator is not None:
                self.generator.manual_seed(_shuffle_seed(self.shuffle_seed, epoch))

    return EpochDataLoader


def _shuffle_seed(seed: int, epoch: int) -> int:
    return int(item_seed(seed, f"epoch{int(epoch)}") % (2**63))


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are drawn from a source, shared by the ReF-LDM and MGFR loaders.

    Attributes:
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes.
        resolution: square output size; stored images are resized when they differ.
        max_refs: references read per target (the first K of its list); ReF-LDM fills K slots.
        seed: base seed; every sample's randomness derives from (seed, epoch, key).
        epoch: first epoch (changes augmentation, LQ and order; the same after a resume).
        split: which split's shards / CSV to read.
        train: augment and degrade on the fly; False gives deterministic evaluation samples.
        preset: degradation preset for the on-the-fly LQ.
        resampled: WebDataset resampling (DDP-safe uneven shards); None = ``train``.
        shuffle_buffer: sample shuffle buffer size (0 = off; always off in evaluation).
        samples_per_epoch: samples per epoch over all ranks (default: the index's sample count).
        skip_bad_shards: warn and skip unreadable shards instead of raising.
        drop_last: drop an incomplete last batch; None = ``train``.
    """

    batch_size: int
    num_workers: int
    resolution: int = 512
    max_refs: int = 5
    seed: int = 0
    epoch: int = 0
    split: str = "train"
    train: bool = True
    preset: str = TRAIN_PRESET
    resampled: bool | None = None
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None
    skip_bad_shards: bool = False
    drop_last: bool | None = None

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            resolution=self.resolution, seed=self.seed, epoch=self.epoch, train=self.train, preset=self.preset
        )


def make_loader(source, sampler: Sampler, config: LoaderConfig):
    """A DataLoader with ``set_epoch`` over ``source`` (shards, or a dataset root map-style) through ``sampler``."""
    import torch
    import webdataset as wds

    c = config
    resampled = c.train if c.resampled is None else c.resampled
    shuffle_buffer = c.shuffle_buffer if c.train else 0
    drop_last = c.train if c.drop_last is None else c.drop_last
    loader_class = _loader_class()
    sampler.set_epoch(c.epoch)
    if not isinstance(source, (list, tuple)) and is_dataset_root(source, c.split):
        dataset = _MapDataset(ReferenceDataset(source, c.split, max_refs=c.max_refs), sampler)
        generator = torch.Generator().manual_seed(_shuffle_seed(c.seed, c.epoch))
        # persistent_workers stays off: workers must be re-created per pass to see set_epoch.
        return loader_class(
            dataset,
            batch_size=c.batch_size,
            shuffle=sampler.config.train,
            generator=generator,
            shuffle_seed=c.seed if sampler.config.train else None,
            num_workers=c.num_workers,
            drop_last=drop_last,
            worker_init_fn=_worker_init if c.num_workers > 0 else None,
        )
    urls, count = resolve_shards(source, c.split, c.skip_bad_shards)
    total = c.samples_per_epoch or count
    per_worker = None
    if resampled:
        if total is None:
            raise ValueError("samples_per_epoch is needed with resampling when the shards have no index")
        _rank, world, _w, _n = wds.utils.pytorch_worker_info()
        per_worker = math.ceil(total / (world * max(1, c.num_workers)))
    options = {
        "seed": c.seed,
        "resampled": resampled,
        "shuffle_buffer": shuffle_buffer,
        "samples_per_worker": per_worker,
        "skip_bad_shards": c.skip_bad_shards,
    }
    dataset = _make_stream(urls, sampler, options)
    return loader_class(
        dataset,
        batch_size=c.batch_size,
        num_workers=c.num_workers,
        drop_last=drop_last,
        worker_init_fn=_worker_init if c.num_workers > 0 else None,
    )


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
        num_refs: reference slots K (references repeat to fill, shuffled); also the references read.
        The others are :class:`LoaderConfig`'s. Later epochs: ``loader.set_epoch(e)`` before
        ``iter(loader)`` (the training loop does it). ``train=False`` gives deterministic evaluation
        samples (first K references in order, stored fixed LQ when present).
        ref_augment: :class:`RefAugment` fields to change (config ``data.extra.ref_augment``).
    """
    config = LoaderConfig(
        batch_size=batch_size,
        num_workers=num_workers,
        resolution=resolution,
        max_refs=num_refs,
        seed=seed,
        epoch=epoch,
        split=split,
        train=train,
        preset=preset,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        samples_per_epoch=samples_per_epoch,
        skip_bad_shards=skip_bad_shards,
        drop_last=drop_last,
    )
    augment = RefAugment(**(ref_augment or {}))
    sampling = dataclasses.replace(config.sampling(), augment=augment)
    return make_loader(source, RefLDMSampler(sampling, num_refs), config)


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
    max_refs: int = 5,
    resampled: bool | None = None,
    shuffle_buffer: int = 1000,
    samples_per_epoch: int | None = None,
    skip_bad_shards: bool = False,
    drop_last: bool | None = None,
):
    """MGFR batches ``{"gt", "lq", "ref", "id_embedding" (B, D), "prompt", "negative_quality" (B,),
    "negative_attribute" (B,), "attrs_missing" (B,), "key"}``.

    Args are those of :func:`make_refldm_dataloader` (:class:`LoaderConfig`), plus:
        negative_quality_fraction: share of samples whose target is degraded and whose prompt is the
            negative-quality prompt (0 in evaluation).
        negative_attribute_fraction: share of samples whose target is degraded and whose prompt is the
            sample's negative-attribute prompt (0 in evaluation).
        embedding_dim: D of ``id_embedding`` (default: :func:`infer_embedding_dim`); samples without
            an embedding get zeros of this size.
        max_refs: references read per target; training picks one of them per sample.
    """
    config = LoaderConfig(
        batch_size=batch_size,
        num_workers=num_workers,
        resolution=resolution,
        max_refs=max_refs,
        seed=seed,
        epoch=epoch,
        split=split,
        train=train,
        preset=preset,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        samples_per_epoch=samples_per_epoch,
        skip_bad_shards=skip_bad_shards,
        drop_last=drop_last,
    )
    sampler = MGFRSampler(
        config.sampling(),
        negative_quality_fraction=negative_quality_fraction,
        negative_attribute_fraction=negative_attribute_fraction,
        # One D for every sample, so a sample without an embedding still collates with the others.
        embedding_dim=embedding_dim or infer_embedding_dim(source, split),
    )
    return make_loader(source, sampler, config)
