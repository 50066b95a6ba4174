"""Tests for the training input pipeline: augmentation, rank/worker splitting, batch contracts, bad shards."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from refface.builders.shards import ShardsConfig, write_shards
from refface.manifests.io import read_image
from refface.manifests.shard_index import index_path, read_shard_index
from refface.manifests.webdataset import ShardError
from refface.train.augment import (
    RefAugment,
    augment_reference,
    color_jitter,
    fill_references,
    random_perspective,
    resize_square,
    to_tensor,
)
from refface.train.loaders import make_mgfr_dataloader, make_refldm_dataloader  # noqa: E402
from refface.train.sources import make_shard_dataset, resolve_shards  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from common.tiny_root import make_tiny_root

    base = tmp_path_factory.mktemp("data")
    root = make_tiny_root(base / "root")
    # One sample per shard: 10 train shards, so 3 ranks x 2 workers all get some.
    write_shards(root, base / "shards", ShardsConfig(split="train", shard_count=1))
    write_shards(root, base / "shards", ShardsConfig(split="val"))
    return {"root": root, "shards": base / "shards"}


def _keys(ds) -> list[str]:
    return list(ds)


def test_fill_references():
    rng = np.random.default_rng(0)
    assert fill_references(0, 5, rng) == []
    assert fill_references(2, 5, None) == [0, 1, 0, 1, 0]
    picks = fill_references(2, 5, rng)
    assert sorted(picks) == [0, 0, 0, 1, 1]
    distinct = fill_references(9, 5, rng)
    assert len(set(distinct)) == 5 and all(0 <= i < 9 for i in distinct)


def test_reference_augmentation_is_seeded_and_bounded():
    rng = np.random.default_rng(1)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    a = augment_reference(img, np.random.default_rng(5))
    b = augment_reference(img, np.random.default_rng(5))
    c = augment_reference(img, np.random.default_rng(6))
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Zero-strength jitter and zero distortion leave the image as it is.
    still = RefAugment(brightness=0, contrast=0, saturation=0, hue=0)
    assert np.array_equal(color_jitter(img, rng, still), img)
    assert np.array_equal(random_perspective(img, rng, 0.0), img)
    # Small geometric changes: most of the image keeps its colour statistics.
    assert abs(float(a.mean()) - float(img.mean())) < 40


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_every_sample_once_per_epoch_over_ranks_and_workers(data, shuffle_buffer: int):
    urls, count = resolve_shards(data["shards"], "train")
    assert count == 10
    seen: Counter = Counter()
    world, workers = 3, 2
    for rank in range(world):
        for worker in range(workers):
            env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "WORKER": str(worker),
                "NUM_WORKERS": str(workers),
            }
            with mock.patch.dict(os.environ, env):
                ds = make_shard_dataset(
                    urls, lambda raw: raw["key"], resampled=False, shuffle_buffer=shuffle_buffer
                )
                seen.update(_keys(ds))
    index = read_shard_index(index_path(data["shards"], "train"))
    expected = {s.first_key for s in index.shards}
    assert set(seen) == expected and all(v == 1 for v in seen.values())


def test_dataloader_workers_see_each_sample_once(data):
    urls, _ = resolve_shards(data["shards"], "train")
    ds = make_shard_dataset(urls, _key_of, resampled=False, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = list(loader)
    assert len(keys) == 10 and len(set(keys)) == 10


def _key_of(raw):
    return raw["key"]


def test_resampled_epoch_length_and_determinism(data):
    urls, _ = resolve_shards(data["shards"], "train")

    def run(epoch: int) -> list[str]:
        return _keys(make_shard_dataset(urls, _key_of, seed=3, epoch=epoch, samples_per_worker=12))

    first = run(0)
    assert len(first) == 12 and set(first) <= {f"id{i}_img{j}" for i in range(3) for j in range(4)}
    assert run(0) == first
    assert run(1) != first
    # A fresh process (another str-hash seed) draws the same stream: a resumed run sees the same data.
    import subprocess
    import sys

    code = (
        "import sys; from refface.train.sources import make_shard_dataset, resolve_shards; "
        f"urls, _ = resolve_shards({str(data['shards'])!r}, 'train'); "
        "print(','.join(make_shard_dataset(urls, lambda r: r['key'], seed=3, epoch=0, samples_per_worker=12)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().split(",") == first


def _check_refldm_batch(batch, b: int, k: int, res: int):
    assert set(batch) == {"gt", "lq", "refs", "ref_mask", "key"}
    assert batch["gt"].shape == (b, 3, res, res) and batch["gt"].dtype == torch.float32
    assert batch["lq"].shape == (b, 3, res, res)
    assert batch["refs"].shape == (b, k, 3, res, res)
    assert batch["ref_mask"].shape == (b, k) and batch["ref_mask"].dtype == torch.bool
    assert isinstance(batch["key"], list) and len(batch["key"]) == b
    for name in ("gt", "lq", "refs"):
        assert batch[name].min() >= -1 and batch[name].max() <= 1


def test_refldm_eval_batches_from_shards_and_root_agree(data):
    from_shards = make_refldm_dataloader(data["shards"], 3, 0, resolution=32, split="val", train=False)
    from_root = make_refldm_dataloader(data["root"], 3, 0, resolution=32, split="val", train=False)
    a, b = next(iter(from_shards)), next(iter(from_root))
    _check_refldm_batch(a, 3, 5, 32)
    order = [b["key"].index(k) for k in a["key"]]
    for name in ("gt", "lq", "refs", "ref_mask"):
        assert torch.equal(a[name], b[name][order])
    # Val targets have 2 references each: 5 slots cycle through them, all valid.
    assert a["ref_mask"].all()
    assert torch.equal(a["refs"][:, 0], a["refs"][:, 2])
    key = a["key"][0]
    source = read_image(data["root"] / "images" / (key.replace("_", "/", 1) + ".png"))
    expected = to_tensor(resize_square(source, 32))
    assert torch.equal(a["gt"][0], expected)


def test_mgfr_eval_batch_contract(data):
    loader = make_mgfr_dataloader(data["shards"], 3, 0, resolution=32, split="val", train=False)
    batch = next(iter(loader))
    keys = {"gt", "lq", "ref", "id_embedding", "prompt", "negative_quality", "negative_attribute", "key"}
    assert set(batch) == keys | {"attrs_missing"}
    assert batch["ref"].shape == (3, 3, 32, 32) and batch["id_embedding"].shape == (3, 8)
    assert batch["id_embedding"].dtype == torch.float32
    assert batch["negative_quality"].dtype == torch.bool and not batch["negative_quality"].any()
    assert isinstance(batch["prompt"], list) and all(isinstance(p, str) and p for p in batch["prompt"])


def test_truncated_shard_named_or_skipped(data, tmp_path: Path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    bad = shards / "train-000004.tar"
    bad.write_bytes(bad.read_bytes()[:700])
    with pytest.raises(ShardError, match="train-000004.tar"):
        resolve_shards(shards, "train")
    urls, count = resolve_shards(shards, "train", skip_bad_shards=True)
    assert count == 9 and str(bad) not in urls


def test_corrupt_shard_content_named_or_skipped(data, tmp_path: Path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    bad = shards / "train-000004.tar"
    raw = bytearray(bad.read_bytes())
    raw[0:100] = b"\x07" * 100  # same size, broken tar header: only reading finds it
    bad.write_bytes(bytes(raw))
    urls, _ = resolve_shards(shards, "train")
    with pytest.raises(ShardError, match="train-000004.tar"):
        _keys(make_shard_dataset(urls, _key_of, resampled=False, shuffle_buffer=0))
    keys = _keys(make_shard_dataset(urls, _key_of, resampled=False, shuffle_buffer=0, skip_bad_shards=True))
    assert len(keys) == 9 and len(set(keys)) == 9


def test_refldm_training_batches_are_seeded(data):
    def batch(epoch: int):
        loader = make_refldm_dataloader(
            data["shards"], 4, 0, resolution=32, seed=7, epoch=epoch, shuffle_buffer=0
        )
        return next(iter(loader))

    a = batch(0)
    _check_refldm_batch(a, 4, 5, 32)
    assert a["ref_mask"].all()
    b = batch(0)
    for name in ("gt", "lq", "refs"):
        assert torch.equal(a[name], b[name])
    assert a["key"] == b["key"]
    assert not torch.equal(a["lq"], a["gt"])


def test_refldm_training_from_root(data):
    loader = make_refldm_dataloader(data["root"], 2, 0, resolution=32, seed=1)
    _check_refldm_batch(next(iter(loader)), 2, 5, 32)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_mgfr_negative_quality_fraction(data, fraction: float):
    from refface.mining.attributes import NEGATIVE_QUALITY_PROMPT

    loader = make_mgfr_dataloader(
        data["shards"], 5, 0, resolution=32, negative_quality_fraction=fraction, seed=2, shuffle_buffer=0
    )
    batch = next(iter(loader))
    assert batch["gt"].shape == (5, 3, 32, 32) and batch["id_embedding"].shape == (5, 8)
    assert bool(batch["negative_quality"].all()) is (fraction == 1.0)
    assert bool(batch["negative_quality"].any()) is (fraction == 1.0)
    if fraction == 1.0:
        assert all(p == NEGATIVE_QUALITY_PROMPT for p in batch["prompt"])
    else:
        assert NEGATIVE_QUALITY_PROMPT not in batch["prompt"]


def test_sample_content_depends_on_key_not_on_workers(data):
    def by_key(workers: int) -> dict:
        loader = make_refldm_dataloader(
            data["shards"], 1, workers, resolution=32, seed=4, resampled=False, shuffle_buffer=0
        )
        return {b["key"][0]: b for b in loader}

    one, two = by_key(0), by_key(2)
    assert set(one) == set(two) and len(one) == 10
    for key, batch in one.items():
        for name in ("gt", "lq", "refs"):
            assert torch.equal(batch[name], two[key][name])


def test_mgfr_missing_embeddings_are_zeros_of_the_data_dim(tmp_path: Path):
    import pandas as pd
    from common.tiny_root import make_tiny_root

    root = make_tiny_root(tmp_path / "root")
    table = pd.read_parquet(root / "embeddings.parquet")
    emb = np.load(root / "embeddings.npy")
    keep = ~table["path"].str.startswith("id3/")  # the val identity loses every embedding
    np.save(root / "embeddings.npy", emb[keep.to_numpy()])
    kept = table[keep].reset_index(drop=True)
    kept["row"] = range(len(kept))
    kept.to_parquet(root / "embeddings.parquet")
    batch = next(iter(make_mgfr_dataloader(root, 3, 0, resolution=32, split="val", train=False)))
    assert batch["id_embedding"].shape == (3, 8)
    assert not batch["id_embedding"].any()


def _samples_by_key(loader) -> dict[str, dict]:
    return {b["key"][0]: {n: b[n][0] for n in ("gt", "lq", "refs")} for b in loader}


def _epoch_loader(data, source: str, workers: int, epoch: int = 0):
    # Batches of one: every sample is kept (drop_last) and can be compared by key.
    return make_refldm_dataloader(
        data[source], 1, workers, resolution=32, seed=5, epoch=epoch, resampled=False, shuffle_buffer=0
    )


@pytest.mark.parametrize("source", ["shards", "root"])
def test_set_epoch_redraws_lq_and_augmentation_reproducibly(data, source: str):
    loader = _epoch_loader(data, source, 0)
    loader.set_epoch(0)
    first = _samples_by_key(loader)
    loader.set_epoch(1)
    second = _samples_by_key(loader)
    loader.set_epoch(1)
    again = _samples_by_key(loader)
    assert len(first) == 10 and set(first) == set(second) == set(again)
    for key in first:
        assert not torch.equal(first[key]["lq"], second[key]["lq"])
        assert not torch.equal(first[key]["refs"], second[key]["refs"])
        for name in ("gt", "lq", "refs"):
            assert torch.equal(second[key][name], again[key][name])
    # A loader built at epoch 1 (a resumed run) draws exactly what set_epoch(1) drew.
    resumed = _samples_by_key(_epoch_loader(data, source, 0, epoch=1))
    for key in first:
        for name in ("gt", "lq", "refs"):
            assert torch.equal(second[key][name], resumed[key][name])


@pytest.mark.parametrize("source", ["shards", "root"])
def test_epoch_draws_do_not_depend_on_workers(data, source: str):
    def run(workers: int) -> tuple[list[str], dict[str, dict]]:
        loader = _epoch_loader(data, source, workers)
        loader.set_epoch(2)
        samples = _samples_by_key(loader)
        return list(samples), samples

    order0, zero = run(0)
    order2, two = run(2)
    assert len(zero) == 10 and set(zero) == set(two)
    if source == "root":
        assert order0 == order2  # map-style: the shuffle is a function of (seed, epoch) only
    for key in zero:
        for name in ("gt", "lq", "refs"):
            assert torch.equal(zero[key][name], two[key][name])


def test_resampled_stream_is_a_function_of_the_epoch(data):
    def keys_and_lq(loader):
        batches = list(loader)
        return [k for b in batches for k in b["key"]], torch.cat([b["lq"] for b in batches])

    loader = make_refldm_dataloader(data["shards"], 4, 0, resolution=32, seed=6, samples_per_epoch=12)
    loader.set_epoch(1)
    keys1, lq1 = keys_and_lq(loader)
    loader.set_epoch(0)
    keys0, _ = keys_and_lq(loader)
    loader.set_epoch(1)
    keys1b, lq1b = keys_and_lq(loader)
    assert len(keys1) == 12 and keys1 != keys0
    # The same stream however many passes came before (WebDataset's own pass counters do not leak in).
    assert keys1 == keys1b and torch.equal(lq1, lq1b)
    # The training loop reaches the epoch through the dataset too.
    loader.dataset.set_epoch(0)
    assert keys_and_lq(loader)[0] == keys0


class _RecordingTask:
    """A one-weight task that records the keys and LQ of every batch the training loop feeds it."""

    def __init__(self) -> None:
        self.weight = torch.nn.Linear(1, 1)
        self.seen: list[tuple[list[str], torch.Tensor]] = []

    def trainable_modules(self):
        return {"weight": self.weight}

    def frozen_modules(self):
        return {}

    def bind(self, modules, weight_dtype, device):
        self.modules = modules

    def compute_loss(self, batch, generator):
        self.seen.append((list(batch["key"]), batch["lq"].clone()))
        x = batch["lq"].mean(dim=(1, 2, 3)).unsqueeze(1)
        return self.modules["weight"](x).square().mean(), {}

    def validation_grid(self, batch, generator):
        return np.zeros((8, 8, 3), np.uint8)

    def config_dict(self):
        return {"name": "recording"}


@pytest.mark.parametrize("source", ["shards", "root"])
def test_training_loop_sets_the_epoch_and_resume_sees_the_same_data(data, source: str, tmp_path: Path):
    from accelerate.state import AcceleratorState, GradientState

    from refface.train.loop import train
    from refface.train.loop_config import LoopConfig

    def run(out: Path, max_steps: int) -> list[tuple[list[str], torch.Tensor]]:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        # 10 samples in batches of 4: two batches an epoch, so 5 steps span three epochs.
        loader = make_refldm_dataloader(data[source], 4, 0, resolution=32, seed=9, samples_per_epoch=8)
        task = _RecordingTask()
        config = LoopConfig(
            output_dir=str(out), max_steps=max_steps, checkpoint_every=1, validate_every=0, report_to="none"
        )
        train(task, loader, config)
        return task.seen

    full = run(tmp_path / "full", 5)
    resumed = run(tmp_path / "split", 3) + run(tmp_path / "split", 5)
    assert len(full) == len(resumed) == 5
    for (keys_a, lq_a), (keys_b, lq_b) in zip(full, resumed, strict=True):
        assert keys_a == keys_b and torch.equal(lq_a, lq_b)
    # The same sample in two epochs gets two different LQ images.
    epoch0 = {k: lq for keys, lqs in full[:2] for k, lq in zip(keys, lqs, strict=True)}
    epoch1 = {k: lq for keys, lqs in full[2:4] for k, lq in zip(keys, lqs, strict=True)}
    common = set(epoch0) & set(epoch1)
    assert common and all(not torch.equal(epoch0[k], epoch1[k]) for k in common)
