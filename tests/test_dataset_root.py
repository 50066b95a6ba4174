"""DatasetRoot: file layout, shared readers, and paths in tables that try to leave the image root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refface.manifests.atomic import write_json
from refface.manifests.embeddings import Embeddings, save_embeddings
from refface.manifests.io import encode_png
from refface.manifests.layout import IDENTITIES, IMAGES, references_filename
from refface.manifests.references import write_references
from refface.manifests.root import DatasetRoot, PathEscapesRoot, safe_relative


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.full((16, 16, 3), value, np.uint8)))


@pytest.mark.parametrize(
    "bad",
    ["../../../../etc/passwd", "a/../../b.png", "/etc/passwd", "C:\\x.png", "\\\\srv\\x.png", "", "~/x.png"],
)
def test_safe_relative_refuses_paths_that_leave(bad):
    with pytest.raises(PathEscapesRoot):
        safe_relative(bad)


@pytest.mark.parametrize("good", ["a.png", "id1/img0.png", "a/./b.png", "x..y.png"])
def test_safe_relative_keeps_relative_paths(good):
    assert safe_relative(good) == good


def _root(tmp_path: Path, refs: list[dict]) -> tuple[DatasetRoot, Path]:
    images = tmp_path / "images"
    for i in range(4):
        _png(images / f"id{i % 2}" / f"img{i}.png", 40 * i)
    root = tmp_path / "root"
    root.mkdir()
    write_json(root / "build.json", {"image_root": str(images)})
    write_references(root / references_filename("train"), refs, with_lq=False)
    return DatasetRoot(root), images


def test_readers_and_image_root(tmp_path):
    refs = [{"gt_image": "id0/img0.png", "ref_image": ["id0/img2.png"]}]
    root, images = _root(tmp_path, refs)
    assert root.is_root() and root.has_references("train") and not root.has_embeddings()
    assert root.image_root() == images
    assert root.image_paths() == ["id0/img0.png", "id0/img2.png"]
    assert root.references("train")["ref_image"].tolist() == [["id0/img2.png"]]
    assert root.identities() is None and root.identity_of() == {} and root.attributes() is None
    assert root.embedding_dim() is None
    assert root.resolve("id0/img0.png") == images / "id0/img0.png"
    with pytest.raises(PathEscapesRoot):
        root.resolve("../root/build.json")


def test_embeddings_first_per_image(tmp_path):
    root = DatasetRoot(tmp_path)
    vectors = np.eye(3, 4, dtype=np.float32)
    emb = Embeddings(vectors=vectors, paths=["a.png", "a.png", "b.png"], model="m", fingerprint="f" * 64)
    save_embeddings(tmp_path, emb)
    pd.DataFrame({"path": ["a.png", "b.png"]}).to_parquet(tmp_path / IMAGES)
    pd.DataFrame({"path": ["a.png", "b.png"], "identity": [0, -1]}).to_parquet(tmp_path / IDENTITIES)
    assert root.has_embeddings() and root.has_vector_files() and root.embedding_dim() == 4
    assert len(root.embeddings()) == 3
    first = root.embeddings(first_per_image=True)
    assert first.paths == ["a.png", "b.png"]
    np.testing.assert_array_equal(first.vectors, vectors[[0, 2]])
    assert root.identity_of() == {"a.png": 0, "b.png": -1}


def test_embed_only_root_image_root_is_the_mined_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    root = tmp_path / "root"
    write_json(root / ".stages" / "mine.json", {"inputs": {"image_root": str(folder)}})
    assert DatasetRoot(root).image_root() == folder.resolve()


def test_validate_reports_escaping_paths_without_opening_them(tmp_path):
    from refface.builders.validate import validate_root

    secret = tmp_path / "secret.png"
    _png(secret, 7)
    refs = [{"gt_image": "id0/img0.png", "ref_image": ["id0/img2.png", "../secret.png", "/etc/passwd"]}]
    root, images = _root(tmp_path, refs)
    report = validate_root(root.path, decode=True)
    text = "\n".join(report.problems)
    assert "path leaves the image root" in text and "../secret.png" in text and "/etc/passwd" in text
    assert "missing file" not in text


def test_shards_turn_escaping_paths_into_error_rows(tmp_path):
    from refface.builders.shards import ShardsConfig, write_shards
    from refface.manifests.webdataset import iter_tar_samples

    secret = tmp_path / "secret.png"
    _png(secret, 7)
    refs = [
        {"gt_image": "id0/img0.png", "ref_image": ["../secret.png", "id0/img2.png"]},
        {"gt_image": "../secret.png", "ref_image": ["id0/img0.png"]},
    ]
    root, _ = _root(tmp_path, refs)
    out = tmp_path / "shards"
    result = write_shards(root.path, out, ShardsConfig())
    assert result["samples"] == 1 and result["errors"] == 2
    samples = [s for p in sorted(out.glob("train-*.tar")) for s in iter_tar_samples(p)]
    meta = json.loads(samples[0]["meta.json"])
    assert meta["path"] == "id0/img0.png" and meta["refs"] == ["id0/img2.png"]
    errors = pd.read_csv(out / "errors-train.csv")
    assert set(errors["path"]) == {"../secret.png"} and errors["reason"].str.contains("leaves").all()
