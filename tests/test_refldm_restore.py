"""``refface restore --model refldm``: folders with references, ReF-LDM CSVs, reruns and bad inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from common.tiny_refldm import TINY, _one_thread  # noqa: F401  (autouse fixtures)

from refface.manifests.atomic import write_json
from refface.manifests.io import read_image, write_png
from refface.train.refldm.config import load_config
from refface.train.refldm.model import RefLDMUNet
from refface.train.refldm.restore import collect_items, restore_folder
from refface.train.refldm.vqgan import build_vqgan


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An exported tiny model folder, laid out as training writes it."""
    cfg, _ = load_config(TINY)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, stage="refldm"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run") / "refldm"
    RefLDMUNet.from_unet_config(cfg.unet).save_pretrained(out / "model" / "unet")
    build_vqgan(cfg.vqgan).save_pretrained(out / "model" / "vqgan")
    write_json(out / "model" / "refldm.json", {"config": cfg.to_dict()})
    return out


def image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_folder_with_reference_subfolders(tmp_path, model_dir):
    lq, refs, out = tmp_path / "lq", tmp_path / "refs", tmp_path / "out"
    for i in range(3):
        write_png(lq / f"face{i}.png", image(i))
        for j in range(i):  # 0, 1 and 2 references
            write_png(refs / f"face{i}" / f"r{j}.png", image(10 * i + j))
    items = collect_items(lq, refs)
    assert [len(it.refs) for it in items] == [0, 1, 2]
    counts = restore_folder(lq, out, checkpoint=model_dir, references=refs, steps=3, batch_size=2)
    assert counts == {"restored": 3, "skipped": 0, "errors": 0}
    first = [read_image(out / f"face{i}.png") for i in range(3)]
    assert all(img.shape == (32, 32, 3) for img in first)
    # A rerun does no work; a fresh run with the same seed writes the same pixels.
    assert restore_folder(lq, out, checkpoint=model_dir, references=refs, steps=3)["skipped"] == 3
    again = tmp_path / "again"
    restore_folder(lq, again, checkpoint=model_dir, references=refs, steps=3, batch_size=2)
    assert all(np.array_equal(a, read_image(again / f"face{i}.png")) for i, a in enumerate(first))


def test_reference_csv_and_bad_inputs(tmp_path, model_dir):
    root = tmp_path / "set"
    for i in range(3):
        write_png(root / "lq" / f"{i:05d}.png", image(i))
        write_png(root / "hq" / f"{i:05d}.png", image(100 + i))
    (root / "lq" / "00002.png").write_bytes(b"broken")
    csv = root / "test_references.csv"
    csv.write_text(
        "gt_image,lq_image,ref_image\n"
        "00000.png,00000.png,\"['00001.png', '00002.png']\"\n"
        "00001.png,00001.png,\"['00000.png']\"\n"
        "00002.png,00002.png,\"['00000.png']\"\n"
    )
    out = tmp_path / "out"
    counts = restore_folder(csv, out, checkpoint=model_dir, steps=2)
    assert counts == {"restored": 2, "skipped": 0, "errors": 1}
    assert (out / "00000.png").is_file() and not (out / "00002.png").exists()
    assert "00002.png" in (out / "errors.csv").read_text()


def test_restore_command(tmp_path, model_dir):
    from typer.testing import CliRunner

    from refface.cli import app

    write_png(tmp_path / "lq" / "a.png", image(1))
    write_png(tmp_path / "refs" / "a.png", image(2))

    def restore(output: str, checkpoint, *extra: str):
        args = [
            "restore",
            "--model",
            "refldm",
            "--input",
            str(tmp_path / "lq"),
            "--output",
            str(tmp_path / output),
        ]
        return CliRunner().invoke(app, [*args, "--checkpoint", str(checkpoint), *extra])

    res = restore("o", model_dir, "--references", str(tmp_path / "refs"), "--steps", "2")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "a.png").is_file()
    res = restore("o2", tmp_path / "nothing")
    assert res.exit_code != 0 and "no ReF-LDM model" in res.output
