"""Tests for refface shards: round trip, reproducible tars, rotation, resume, verify and bad input."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common.tiny_root import EMB_DIM, make_tiny_root

from refface.builders.shards import ShardsConfig, write_shards
from refface.manifests.io import read_image
from refface.manifests.shard_index import find_indexes, index_path, read_shard_index
from refface.manifests.webdataset import (
    ShardError,
    decode_member,
    iter_tar_samples,
    sample_key,
    unique_keys,
    verify_shards,
)


@pytest.fixture()
def tiny_root(tmp_path: Path) -> Path:
    return make_tiny_root(tmp_path / "root")


def _read_all(folder: Path, split: str = "train") -> dict[str, dict]:
    index = read_shard_index(index_path(folder, split))
    out = {}
    for path in index.shard_paths(folder):
        for sample in iter_tar_samples(path):
            out[sample["__key__"]] = sample
    return out


def test_keys_have_no_dots_and_are_unique():
    assert sample_key("a/b.c/img.01.png") == "a_b_c_img_01"
    keys = unique_keys(["a/b.png", "a_b.png", "c.png"])
    assert len(set(keys)) == 3 and all("." not in k for k in keys)
    assert keys[2] == "c"


def test_round_trip_bit_exact(tiny_root: Path, tmp_path: Path):
    out = tmp_path / "shards"
    result = write_shards(tiny_root, out, ShardsConfig(split="train", shard_count=4))
    assert result["samples"] == 10 and result["shards"] == 3 and result["errors"] == 0
    assert verify_shards(out)["samples"] == 10
    samples = _read_all(out)
    emb = np.load(tiny_root / "embeddings.npy")
    emb_paths = list(pd.read_parquet(tiny_root / "embeddings.parquet")["path"])
    refs_csv = pd.read_csv(tiny_root / "train_references.csv")
    assert len(samples) == len(refs_csv)
    for gt, ref_text in zip(refs_csv["gt_image"], refs_csv["ref_image"], strict=True):
        sample = samples[sample_key(gt)]
        meta = decode_member("meta.json", sample["meta.json"])
        source = tiny_root / "images" / gt
        assert meta["path"] == gt and meta["split"] == "train"
        assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert np.array_equal(decode_member("hq.png", sample["hq.png"]), read_image(source))
        refs = eval(ref_text)  # the CSV's Python-list cell
        assert meta["refs"] == refs[:5]
        for j, ref in enumerate(meta["refs"]):
            assert np.array_equal(
                decode_member("ref0.png", sample[f"ref{j}.png"]), read_image(tiny_root / "images" / ref)
            )
        np.testing.assert_array_equal(decode_member("id.npy", sample["id.npy"]), emb[emb_paths.index(gt)])
        refemb = decode_member("refemb.npy", sample["refemb.npy"])
        assert refemb.shape == (len(refs), EMB_DIM)
        assert meta["identity"] == int(gt[2])
        attrs = decode_member("attrs.json", sample["attrs.json"])
        assert attrs["prompt"] and attrs["negative_quality_prompt"]


def test_tars_are_reproducible_with_fixed_metadata(tiny_root: Path, tmp_path: Path):
    a = write_shards(tiny_root, tmp_path / "a", ShardsConfig(shard_count=3))
    b = write_shards(tiny_root, tmp_path / "b", ShardsConfig(shard_count=3, workers=2))
    ia, ib = read_shard_index(a["index"]), read_shard_index(b["index"])
    assert [s.sha256 for s in ia.shards] == [s.sha256 for s in ib.shards]
    with tarfile.open(tmp_path / "a" / ia.shards[0].name) as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uname == "refface" and m.uid == 0 for m in members)
    first_key = members[0].name.split(".")[0]
    names = [m.name for m in members if m.name.startswith(first_key + ".")]
    assert names == sorted(names)


def test_rotation_by_bytes_and_count(tiny_root: Path, tmp_path: Path):
    by_count = write_shards(tiny_root, tmp_path / "c", ShardsConfig(shard_count=1))
    assert by_count["shards"] == 10
    # Any sample is larger than 1 kB, so each shard holds exactly one sample.
    by_bytes = write_shards(tiny_root, tmp_path / "b", ShardsConfig(shard_bytes=1000))
    assert by_bytes["shards"] == 10
    index = read_shard_index(by_bytes["index"])
    assert all(s.samples == 1 for s in index.shards)


def test_rerun_skips_and_killed_run_resumes_to_same_bytes(tiny_root: Path, tmp_path: Path):
    out = tmp_path / "s"
    config = ShardsConfig(shard_count=3)
    first = write_shards(tiny_root, out, config)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert write_shards(tiny_root, out, config)["skipped"] is True
    # Simulate a run killed while writing the third shard: no index, no last shard, a temp file left.
    index_path(out, "train").unlink()
    names = sorted(before)
    (out / names[-1]).unlink()
    (out / names[-2]).unlink()
    (out / ".done" / f"{names[-2]}.json").unlink()
    (out / f".{names[-2]}.tmp").write_bytes(b"partial")
    resumed = write_shards(tiny_root, out, config)
    assert resumed["resumed_shards"] == first["shards"] - 2
    assert resumed["skipped"] is False
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert not list(out.glob(".*.tmp"))


def test_changed_config_rewrites(tiny_root: Path, tmp_path: Path):
    out = tmp_path / "s"
    write_shards(tiny_root, out, ShardsConfig(shard_count=3))
    again = write_shards(tiny_root, out, ShardsConfig(shard_count=5))
    assert again["resumed_shards"] == 0 and again["shards"] == 2
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_val_split_carries_fixed_lq(tiny_root: Path, tmp_path: Path):
    out = tmp_path / "v"
    write_shards(tiny_root, out, ShardsConfig(split="val"))
    samples = _read_all(out, "val")
    assert len(samples) == 3
    for key, sample in samples.items():
        lq_path = tiny_root / "lq" / f"{key.split('_')[1]}.png"
        assert np.array_equal(decode_member("lq.png", sample["lq.png"]), read_image(lq_path))
        assert decode_member("degrade.json", sample["degrade.json"])["source"].startswith("lq/")
    assert set(find_indexes(out)) == {"val"}


@pytest.mark.parametrize("codec, ext", [("jpeg", "jpg"), ("webp", "webp")])
def test_lossy_codecs(tiny_root: Path, tmp_path: Path, codec: str, ext: str):
    out = tmp_path / codec
    write_shards(tiny_root, out, ShardsConfig(codec=codec, quality=90))
    sample = next(iter(_read_all(out).values()))
    assert f"hq.{ext}" in sample and "hq.png" not in sample
    assert decode_member(f"hq.{ext}", sample[f"hq.{ext}"]).shape == (48, 48, 3)
    assert verify_shards(out)["samples"] == 10


def test_truncated_and_corrupt_shards(tiny_root: Path, tmp_path: Path):
    out = tmp_path / "s"
    write_shards(tiny_root, out, ShardsConfig(shard_count=4))
    index = read_shard_index(index_path(out, "train"))
    bad = out / index.shards[1].name
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=index.shards[1].name):
        verify_shards(out)
    result = verify_shards(out, skip_bad_shards=True)
    assert len(result["bad"]) == 1 and index.shards[1].name in result["bad"][0]
    assert result["samples"] == 10 - index.shards[1].samples
    # Same size, one byte flipped inside an image: caught by the checksum.
    flipped = bytearray(data)
    flipped[2000] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match="sha256"):
        verify_shards(out)


def test_bad_input_becomes_error_rows(tmp_path: Path):
    root = make_tiny_root(tmp_path / "root", corrupt_ref=True)
    out = tmp_path / "s"
    result = write_shards(root, out, ShardsConfig())
    # id1/img2.png is garbage: as a target it is dropped, as a reference it is left out.
    assert result["samples"] == 9 and result["errors"] == 3
    errors = pd.read_parquet(out / "errors-train.parquet")
    assert set(errors["path"]) == {"id1/img2.png"} and set(errors["stage"]) == {"shards"}
    meta = decode_member("meta.json", _read_all(out)["id1_img0"]["meta.json"])
    assert meta["refs"] == ["id1/img1.png"]


def test_cli_write_and_verify(tiny_root: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from refface.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["shards", str(tiny_root), "--out", str(out), "--shard-count", "4"])
    assert res.exit_code == 0, res.output
    assert (out / "index-train.json").exists()
    res = runner.invoke(app, ["shards", "verify", str(out)])
    assert res.exit_code == 0, res.output
    shard = out / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    res = runner.invoke(app, ["shards", "verify", str(out)])
    assert res.exit_code == 1 and "train-000002.tar" in res.output
    res = runner.invoke(app, ["shards", "verify", str(out), "--skip-bad-shards"])
    assert res.exit_code == 0 and "train-000002.tar" in res.output
    res = runner.invoke(app, ["shards", str(tiny_root), "--out", str(out), "--codec", "gif"])
    assert res.exit_code == 2 and "codec" in res.output


def test_val_without_lq_files_degrades_with_preset(tmp_path: Path):
    root = make_tiny_root(tmp_path / "root")
    refs = pd.read_csv(root / "val_references.csv")
    refs["lq_image"] = refs["gt_image"]  # no LQ built yet: the CSV names the target itself
    refs.to_csv(root / "val_references.csv", index=False)
    out = tmp_path / "v"
    write_shards(root, out, ShardsConfig(split="val", lq_preset="refldm-moderate", seed=3))
    samples = _read_all(out, "val")
    for sample in samples.values():
        lq = decode_member("lq.png", sample["lq.png"])
        params = decode_member("degrade.json", sample["degrade.json"])
        assert lq.shape == (48, 48, 3) and params["preset"] == "refldm-moderate" and params["seed"] == 3
        assert "scale" in params["params"]
    again = tmp_path / "v2"
    write_shards(root, again, ShardsConfig(split="val", lq_preset="refldm-moderate", seed=3))
    assert (out / "val-000000.tar").read_bytes() == (again / "val-000000.tar").read_bytes()
