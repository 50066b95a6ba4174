"""Exports: Hugging Face Parquet dataset read back with `datasets`, BasicSR folders read by basicsr's classes."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from common.basicsr_classes import basicsr_datasets, gfpgan_ffhq_degradation_dataset
from common.review_root import image_paths, make_review_root

from refface.builders.degrade_sets import DegradeConfig, degrade_target
from refface.builders.ffhq_ref import FFHQRefConfig, build_mined
from refface.export.basicsr import BasicSRExportConfig, export_basicsr
from refface.export.hf import HFExportConfig, export_hf, lq_column
from refface.export.source import params_record
from refface.manifests.io import read_image
from refface.manifests.references import read_references
from refface.manifests.splits import read_split_lists

SPLITS = ("train", "val", "test")
PRESETS = ("refldm-severe", "refldm-moderate")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_review_root(tmp_path_factory.mktemp("export") / "root")
    build_mined(
        root,
        FFHQRefConfig(
            plots=False, val_identities=1, test_identities=1, cluster_method="average", identity_threshold=0.4
        ),
        root / "images",
        image_paths(root),
    )
    degrade_target(root, DegradeConfig(presets=PRESETS, workers=1))
    # Attributes as the attributes stage writes them (a few images; the rest get the fallback prompt).
    pd.DataFrame(
        {
            "path": ["id0/0.png", "id1/1.png"],
            "age": [31.0, 52.0],
            "gender": ["Woman", "Man"],
            "race": ["asian", "white"],
            "emotion": ["happy", "neutral"],
            "prompt": ["a photo of a woman", "a photo of a man"],
        }
    ).to_parquet(root / "attributes.parquet", index=False)
    return root


def truth(root: Path) -> dict:
    """Everything the exports must carry, read from the root's own files."""
    lists = read_split_lists(root)
    ids = pd.read_parquet(root / "identities.parquet")
    refs = {}
    for s in SPLITS:
        df = read_references(root / f"{s}_references.csv")
        refs[s] = {g: list(r) for g, r in zip(df["gt_image"], df["ref_image"], strict=True)}
    lq = {}
    for folder in sorted((root / "lq").iterdir()):
        table = pd.read_parquet(folder / "params.parquet")
        lq[folder.name] = {
            r["gt_image"]: (folder / r["lq_image"], params_record(r)) for r in table.to_dict("records")
        }
    return {
        "lists": lists,
        "identity": dict(zip(ids["path"], ids["identity"], strict=True)),
        "refs": refs,
        "lq": lq,
    }


def test_hf_export_round_trips_through_the_datasets_package(root, tmp_path):
    out = tmp_path / "hf"
    summary = export_hf(root, out, HFExportConfig(shard_rows=5))
    assert summary["shards"] == 4 + 1 + 1  # 18 train rows in shards of 5; val and test fit in one
    t = truth(root)
    readme = (out / "README.md").read_text()
    header = readme.split("---")[1]
    import yaml

    meta = yaml.safe_load(header)
    assert [c["config_name"] for c in meta["configs"]] == list(SPLITS)
    assert "license" not in meta and "# license:" in header  # left to the owner
    image_root = root / "images"
    for split in SPLITS:
        ds = datasets.load_dataset(str(out), split, split=split)
        assert ds.features["image"] == datasets.Image()
        info = next(d for d in meta["dataset_info"] if d["config_name"] == split)
        assert info["splits"][0]["num_examples"] == len(ds)
        raw = ds.cast_column("image", datasets.Image(decode=False))
        for name in t["lq"]:
            raw = raw.cast_column(lq_column(name), datasets.Image(decode=False))
        paths = raw["path"]
        assert sorted(t["lists"][split]) == [
            p for p, listed in zip(paths, raw["in_split_list"], strict=True) if listed
        ]
        for row in raw:
            path = row["path"]
            assert row["image"]["bytes"] == (image_root / path).read_bytes()
            assert row["identity"] == t["identity"].get(path, -1)
            refs = t["refs"][split].get(path, [])
            assert row["ref_paths"] == refs and row["is_target"] == (path in t["refs"][split])
            assert [paths[i] for i in row["ref_indices"]] == refs  # addressed by row, stored once
            for name, by_gt in t["lq"].items():
                col = lq_column(name)
                if path in by_gt and split != "train":
                    lq_file, params = by_gt[path]
                    assert row[col]["bytes"] == lq_file.read_bytes()
                    assert json.loads(row[f"{col}_params"]) == params
                else:
                    assert row[col] is None and row[f"{col}_params"] is None
            attrs = json.loads(row["attributes"])
            if path == "id0/0.png":
                assert attrs["gender"] == "Woman" and row["prompt"] == "a photo of a woman"
            assert row["negative_quality_prompt"]
        # Decoded images equal the root's pixels.
        first = ds[0]["image"]
        assert np.array_equal(np.asarray(first.convert("RGB")), read_image(image_root / ds[0]["path"]))
    # Loading the parquet files directly works too.
    direct = datasets.load_dataset("parquet", data_files=str(out / "data" / "test-*.parquet"), split="train")
    assert direct["path"] == datasets.load_dataset(str(out), "test", split="test")["path"]


def test_hf_export_rerun_with_other_shard_size_leaves_no_stale_shards(root, tmp_path):
    out = tmp_path / "hf"
    export_hf(root, out, HFExportConfig(shard_rows=5))
    export_hf(root, out, HFExportConfig(shard_rows=100))
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "val-00000-of-00001.parquet",
    ]


@pytest.mark.parametrize("copy", [False, True])
def test_basicsr_folders_load_with_basicsr_dataset_classes(root, tmp_path, copy):
    import yaml

    classes = basicsr_datasets()
    out = tmp_path / "bsr"
    export_basicsr(root, out, BasicSRExportConfig(copy=copy))
    t = truth(root)
    names = pd.read_csv(out / "names.csv", keep_default_na=False)
    path_of = dict(zip(names["key"], names["path"], strict=False))
    options = yaml.safe_load((out / "options.yml").read_text())["datasets"]
    paired = {k: v for k, v in options.items() if v["type"] == "PairedImageDataset"}
    assert len(paired) == 2 * len(PRESETS)  # val and test, each LQ set
    for block in paired.values():
        ds = classes.PairedImageDataset({**block, "mean": None, "std": None})
        split, set_name = Path(block["dataroot_gt"]).parts[-3:-1]
        assert len(ds) == len(t["refs"][split])
        for k in range(len(ds)):
            item = ds[k]
            key = Path(item["gt_path"]).stem
            assert Path(item["lq_path"]).stem == key
            path = path_of[key]
            gt = (item["gt"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
            lq = (item["lq"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
            assert np.array_equal(gt, read_image(root / "images" / path))
            assert np.array_equal(lq, read_image(t["lq"][set_name][path][0]))
            assert (Path(item["gt_path"]).is_symlink()) is (not copy)
    hq = options["train_hq_only"]
    ffhq_degradation = gfpgan_ffhq_degradation_dataset()
    # basicsr's random JPEG step passes a float quality that OpenCV 5 rejects: off for this read.
    ds = ffhq_degradation({**hq, "use_hflip": False, "mean": [0.0] * 3, "std": [1.0] * 3})
    ds.jpeg_range = None
    assert len(ds) == len(t["lists"]["train"])
    assert {path_of[Path(p).stem] for p in ds.paths} == set(t["lists"]["train"])
    np.random.seed(0)
    item = ds[0]
    gt = (item["gt"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert np.array_equal(gt, read_image(root / "images" / path_of[Path(item["gt_path"]).stem]))
    assert item["lq"].shape == item["gt"].shape  # degraded on the fly at GT size
    meta = (out / "train" / "meta_info.txt").read_text().splitlines()
    assert len(meta) == len(t["lists"]["train"]) and meta[0].endswith(" (40,40,3)")
    # References travel in names.csv as keys of the same export.
    val = names[(names["split"] == "val") & (names["references"] != "")]
    for key, refs in zip(val["key"], val["references"], strict=True):
        assert [path_of[r] for r in refs.split()] == t["refs"]["val"][path_of[key]]


def test_cli_exports(root, tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["export", "hf", str(root), "--out", str(tmp_path / "hf"), "--shard-rows", "50"]
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "hf" / "data").glob("*.parquet"))) == 3
    assert "push-to-hub" in runner.invoke(app, ["export", "hf", "--help"]).output
    result = runner.invoke(app, ["export", "basicsr", str(root), "--out", str(tmp_path / "bsr"), "--copy"])
    assert result.exit_code == 0, result.output
    assert not any(p.is_symlink() for p in (tmp_path / "bsr").rglob("*.png"))
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error" in result.output
