"""``refface validate`` on published-style FFHQ-Ref folders: passes when valid, names each defect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from refface.builders.validate import validate_root
from refface.manifests.references import write_references
from refface.manifests.splits import write_split_lists


def make_published(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny FFHQ-Ref-like download: reference_mapping/, id_based_ffhq_split/ and flat images."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    root = tmp_path / "FFHQ-Ref"
    maps = root / "reference_mapping"
    maps.mkdir(parents=True)
    write_references(
        maps / "train_references.csv", [{"gt_image": "00000.png", "ref_image": ["00001.png"]}], False
    )
    write_references(
        maps / "val_references.csv",
        [{"gt_image": "00004.png", "lq_image": "00004.png", "ref_image": ["00005.png", "00006.png"]}],
        True,
    )
    write_references(
        maps / "test_references.csv",
        [{"gt_image": "00008.png", "lq_image": "00008.png", "ref_image": ["00009.png", "00010.png"]}],
        True,
    )
    names = [f"{i:05d}.png" for i in range(12)]
    write_split_lists(
        root / "id_based_ffhq_split", {"train": names[:4], "val": names[4:8], "test": names[8:]}
    )
    return root, images


def test_valid_published_layout_passes(tmp_path):
    root, images = make_published(tmp_path)
    report = validate_root(root, image_root=images)
    assert report.ok, report.problems
    assert report.counts["files_checked"] == 8
    assert report.counts["test_targets"] == 1


@pytest.mark.parametrize(
    "defect, expected",
    [
        ("self", "target lists itself"),
        ("cross", "reference crosses splits"),
        ("missing", "missing file"),
        ("corrupt", "does not decode"),
        ("cell", "ref_image"),
        ("nolq", "missing column lq_image"),
        ("twice", "image in two split lists"),
    ],
)
def test_each_defect_is_reported(tmp_path, defect, expected):
    root, images = make_published(tmp_path)
    maps = root / "reference_mapping"
    if defect == "self":
        write_references(
            maps / "train_references.csv", [{"gt_image": "00000.png", "ref_image": ["00000.png"]}], False
        )
    elif defect == "cross":
        write_references(
            maps / "train_references.csv", [{"gt_image": "00000.png", "ref_image": ["00009.png"]}], False
        )
    elif defect == "missing":
        (images / "00001.png").unlink()
    elif defect == "corrupt":
        (images / "00005.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    elif defect == "cell":
        (maps / "train_references.csv").write_text("gt_image,ref_image\n00000.png,00001.png\n")
    elif defect == "nolq":
        (maps / "test_references.csv").write_text(
            "gt_image,ref_image\n00008.png,\"['00009.png', '00010.png']\"\n"
        )
    elif defect == "twice":
        split = root / "id_based_ffhq_split" / "test_image.txt"
        split.write_text(split.read_text() + "00000.png\n")
    report = validate_root(root, image_root=images)
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems


def test_every_problem_of_a_csv_is_reported_not_only_the_first(tmp_path):
    root, images = make_published(tmp_path)
    (root / "reference_mapping" / "train_references.csv").write_text(
        "gt_image,ref_image\n"
        "00000.png,00001.png\n"  # row 2: not a list
        "00001.png,\"['00000.png']\",extra\n"  # row 3: one field too many
        "00002.png,\"['00002.png']\"\n"  # row 4: lists itself
        "00003.png,\"['00000.png'\"\n"  # row 5: not a list
        "00002.png,\"['00011.png']\"\n"  # row 6: a target twice; 00011.png is a test image
    )
    (images / "00011.png").unlink()
    report = validate_root(root, image_root=images)
    text = "\n".join(report.problems)
    assert "train_references.csv: unreadable row: 3 - row 2: " in text, text
    assert "row 3: 3 fields, the header has 2" in text and "row 5: ref_image" in text
    assert "train_references.csv: target lists itself: 1 - 00002.png" in text
    assert "train_references.csv: target listed twice: 1 - 00002.png" in text
    assert "reference crosses splits: 1 - 00002.png (train) -> 00011.png (test)" in text
    assert "missing file: 1 - " in text and "00011.png (train reference)" in text
    assert report.counts["train_targets"] == 2  # the readable rows


def test_identity_mismatch_is_reported(tmp_path):
    import pandas as pd

    from refface.manifests.atomic import write_parquet

    root, images = make_published(tmp_path)
    ids = pd.DataFrame({"path": [f"{i:05d}.png" for i in range(12)], "identity": [i // 2 for i in range(12)]})
    ids["cluster_size"] = 2
    write_parquet(root / "identities.parquet", ids)
    report = validate_root(root, image_root=images)
    # 00004 (identity 2) lists 00006 (identity 3); 00008 (identity 4) lists 00010 (identity 5).
    assert any("another identity: 2" in p for p in report.problems), report.problems


def test_cli_exit_codes(tmp_path):
    from refface.cli import app

    root, images = make_published(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(root), "--images", str(images)])
    assert ok.exit_code == 0, ok.output
    (images / "00001.png").unlink()
    bad = runner.invoke(app, ["validate", str(root), "--images", str(images)])
    assert bad.exit_code == 1
    assert "missing file" in bad.output
