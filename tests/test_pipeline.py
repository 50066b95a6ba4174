"""mine_folder / `refface embed`: tables, errors for every bad input, resume, skip, worker independence."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common.outputs import MINED_OUTPUTS, digest_mined
from PIL import Image

from refface.mining import pipeline
from refface.mining.parts import FACES_COLUMNS, IMAGES_COLUMNS
from refface.mining.pipeline import MiningConfig, crop_relpath, mine_folder

GOOD = [
    "lfw/Alvaro_Uribe/Alvaro_Uribe_0001.jpg",
    "lfw/Alvaro_Uribe/Alvaro_Uribe_0002.jpg",
    "lfw/Amelie_Mauresmo/Amelie_Mauresmo_0001.jpg",
    "lfw/Amelie_Mauresmo/Amelie_Mauresmo_0002.jpg",
    "faceapi_js_bbt/amy/amy1.png",
]
# path -> (stage, reason prefix)
BAD = {
    "bad/not_an_image.jpg": ("decode", "not a decodable image"),
    "bad/empty.png": ("decode", "empty file"),
    "bad/truncated.jpg": ("decode", "truncated or corrupt image"),
    "bad/huge.png": ("decode", "too large"),
    "bad/no_face.png": ("detect", "no face found"),
}
ROTATED = "exif/sideways.jpg"
FOUND = GOOD + [ROTATED]
SMALL_LIMIT = 2_000_000  # pixels; bad/huge.png has 4 million


@pytest.fixture(scope="module")
def photos(faces_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for rel in GOOD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(faces_dir / rel, root / rel)
    bad = root / "bad"
    bad.mkdir()
    (bad / "not_an_image.jpg").write_text("this is text, not a JPEG")
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes((faces_dir / GOOD[0]).read_bytes()[:3000])
    Image.new("L", (2000, 2000), 90).save(bad / "huge.png")
    Image.new("RGB", (200, 200), (128, 120, 110)).save(bad / "no_face.png")
    # Stored sideways with EXIF orientation 6 ("rotate 90 clockwise to display"): only found upright.
    upright = Image.open(faces_dir / GOOD[0]).crop((0, 0, 250, 210))
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "exif").mkdir()
    upright.rotate(90, expand=True).save(root / ROTATED, exif=exif.tobytes(), quality=95)
    return root


def _config(**kw) -> MiningConfig:
    base = {"workers": 1, "chunk_size": 3, "max_pixels": SMALL_LIMIT}
    base.update(kw)
    return MiningConfig(**base)


@pytest.fixture(scope="module")
def mined(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("mined")
    result = mine_folder(photos, root, _config())
    return root, result


def test_tables_follow_the_dataset_root_contract(mined):
    root, result = mined
    assert result.ran and result.n_images == len(FOUND) + len(BAD)
    assert result.n_faces == len(FOUND) and result.n_errors == len(BAD)
    images = pd.read_parquet(root / "images.parquet")
    assert list(images.columns) == IMAGES_COLUMNS
    assert len(images) == len(FOUND) + 1  # the faceless image decodes fine
    rotated = images.set_index("path").loc[ROTATED]
    assert (rotated["width"], rotated["height"]) == (250, 210)  # EXIF orientation applied
    assert images["sha256"].str.len().eq(64).all() and (images["width"] > 0).all()
    faces = pd.read_parquet(root / "faces.parquet")
    assert list(faces.columns) == FACES_COLUMNS
    assert sorted(faces["path"]) == sorted(FOUND)
    assert faces["lm"].map(len).eq(10).all() and (faces["n_faces"] >= 1).all()
    assert (faces["x1"] > faces["x0"]).all() and (faces["y1"] > faces["y0"]).all()
    assert set(faces["image_id"]) <= set(images["image_id"])
    vectors = np.load(root / "embeddings.npy")
    table = pd.read_parquet(root / "embeddings.parquet")
    assert vectors.shape == (len(FOUND), 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert table["path"].tolist() == faces["path"].tolist()
    assert table["image_id"].tolist() == faces["image_id"].tolist()
    meta = json.loads((root / "embeddings.json").read_text())
    assert meta["model"] == "dlib_face_recognition_resnet_model_v1" and meta["dim"] == 128
    assert meta["metric"] == "cosine" and 0 < meta["identity_threshold"] < 0.2
    assert (root / ".stages" / "mine.json").exists()
    assert not (root / ".parts").exists()


def test_every_bad_input_becomes_an_error_row(mined):
    root, result = mined
    errors = pd.read_parquet(root / "errors.parquet")
    assert pd.read_csv(root / "errors.csv").shape == errors.shape
    by_path = {r.path: (r.stage, r.reason) for r in errors.itertuples()}
    assert set(by_path) == set(BAD)
    for path, (stage, reason) in BAD.items():
        assert by_path[path][0] == stage
        assert by_path[path][1].startswith(reason), by_path[path]
    assert " at 0x" not in "".join(errors["reason"])  # no memory addresses: reproducible bytes
    assert result.errors_by_reason == {
        "empty file": 1,
        "no face found": 1,
        "not a decodable image": 1,
        "too large": 1,
        "truncated or corrupt image": 1,
    }


def test_second_run_does_no_work(mined, photos):
    root, _ = mined
    before = {n: (root / n).stat().st_mtime_ns for n in MINED_OUTPUTS}
    again = mine_folder(photos, root, _config(workers=2))  # worker count is not part of the config
    assert not again.ran and again.n_faces == len(FOUND)
    assert {n: (root / n).stat().st_mtime_ns for n in MINED_OUTPUTS} == before
    changed = mine_folder(photos, root, _config(face_policy="largest"))
    assert changed.ran


class _Boom(RuntimeError):
    pass


def _dies_on_third_chunk(real):
    """The chunk function, killed at its third call (as a run is when its machine goes away)."""
    calls = {"n": 0}

    def chunk(items):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Boom("killed")
        return real(items)

    return chunk


def test_killed_run_resumes_to_identical_bytes_whatever_the_workers(mined, photos, tmp_path, monkeypatch):
    reference, _ = mined
    real = pipeline._mine_chunk
    root = tmp_path / "resumed"
    monkeypatch.setattr(pipeline, "_mine_chunk", _dies_on_third_chunk(real))
    with pytest.raises(_Boom):
        mine_folder(photos, root, _config())
    parts = sorted((root / ".parts" / "mine").rglob("chunk-*.pkl"))
    assert len(parts) == 2  # the finished chunks survived
    assert not (root / "faces.parquet").exists()
    monkeypatch.setattr(pipeline, "_mine_chunk", real)
    resumed = mine_folder(photos, root, _config())
    assert resumed.ran and resumed.n_faces == len(FOUND)
    assert digest_mined(root) == digest_mined(reference)
    parallel = tmp_path / "parallel"
    mine_folder(photos, parallel, _config(workers=2))
    assert digest_mined(parallel) == digest_mined(reference)


def test_aligned_crops(photos, tmp_path):
    root = tmp_path / "crops"
    mine_folder(photos, root, _config(save_crops=True, crop_size=128))
    for rel in GOOD:
        crop = Image.open(root / crop_relpath(rel))
        assert crop.size == (128, 128)
    assert crop_relpath("a/b.jpg") == "aligned/a/b.png"


def test_arcface_path_with_prealigned_inputs(tmp_path):
    from common.tiny_arcface import build_tiny_arcface

    model = build_tiny_arcface(tmp_path / "w600k_r50.onnx")
    images = tmp_path / "aligned"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(images / f"{i}.png")
    root = tmp_path / "root"
    result = mine_folder(
        images, root, _config(detector="prealigned", embedder="arcface", model_path=str(model))
    )
    assert result.n_faces == 4 and result.model == "arcface:w600k_r50"
    meta = json.loads((root / "embeddings.json").read_text())
    assert meta["dim"] == 512 and meta["identity_threshold"] == 0.4
    assert meta["fingerprint"] == hashlib.sha256(model.read_bytes()).hexdigest()


def test_invalid_settings_are_explained(photos, tmp_path):
    for bad, match in [
        ({"detector": "mtcnn"}, "detector"),
        ({"embedder": "facenet"}, "embedder"),
        ({"face_policy": "first"}, "face policy"),
        ({"crop_size": 4}, "crop size"),
        ({"workers": 0}, "at least 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            mine_folder(photos, tmp_path / "x", _config(**bad))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        mine_folder(tmp_path / "missing", tmp_path / "x", _config())


def test_embed_command(photos, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from refface.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["embed", str(photos), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "faces.parquet").exists() and len(
        pd.read_parquet(out / "errors.parquet")
    ) == 5  # huge.png decodes under the default limit, has no face
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "nowhere"))
    res = runner.invoke(app, ["embed", str(photos), "--out", str(out), "--embedder", "arcface"])
    assert res.exit_code == 2
    assert "w600k_r50.onnx" in res.output
    help_text = runner.invoke(app, ["embed", "--help"]).output
    assert "Detect, align and embed" in help_text and "--tta" in help_text
    for builder in ("ffhq-ref", "celeba-test-ref", "reface-hq"):
        assert "--tta" in runner.invoke(app, ["build", builder, "--help"]).output, builder


def test_embed_command_reads_an_images_table(photos, tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    table = tmp_path / "images.csv"
    pd.DataFrame({"path": [GOOD[0], GOOD[2], "bad/empty.png", "gone.jpg"]}).to_csv(table, index=False)
    out = tmp_path / "from_table"
    res = CliRunner().invoke(
        app, ["embed", str(table), "--image-root", str(photos), "--out", str(out), "--workers", "1"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(pd.read_parquet(out / "faces.parquet")["path"]) == sorted([GOOD[0], GOOD[2]])
    errors = pd.read_parquet(out / "errors.parquet").set_index("path")
    assert errors.loc["gone.jpg", "stage"] == "read" and errors.loc["gone.jpg", "reason"].startswith(
        "cannot read file"
    )
    assert errors.loc["bad/empty.png", "reason"] == "empty file"
    with pytest.raises(ValueError, match="inside it"):
        mine_folder(photos, tmp_path / "x", _config(), relpaths=["../escape.jpg"])


def test_a_failing_batch_is_retried_face_by_face():
    class Flaky:
        dim = 2

        def embed_crops(self, crops):
            if any(c == "bad" for c in crops):
                raise RuntimeError("cannot embed")
            return np.ones((len(crops), 2), np.float32), np.ones(len(crops), np.float32)

    faces = [{"path": "a"}, {"path": "b"}, {"path": "c"}]
    errors: list = []
    vectors, norms = pipeline._embed_or_isolate(Flaky(), ["ok", "bad", "ok"], faces, errors)
    assert [f["path"] for f in faces] == ["a", "c"] and vectors.shape == (2, 2) and len(norms) == 2
    assert errors == [{"path": "b", "stage": "embed", "reason": "RuntimeError: cannot embed"}]


def _digest_sharded(root) -> dict[str, str]:
    names = [n for n in MINED_OUTPUTS if n != "embeddings.npy"]
    names += sorted(p.relative_to(root).as_posix() for p in (root / "embeddings_shards").iterdir())
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def test_sharded_embeddings_hold_the_same_rows_one_shard_per_partition(mined, photos, tmp_path, monkeypatch):
    from refface.manifests.embedding_shards import ShardedEmbeddings
    from refface.manifests.embeddings import embeddings_digest, embeddings_files, load_embeddings

    reference, _ = mined
    root = tmp_path / "sharded"
    # chunk_size 3 and shard_rows 3: one shard per chunk; the first chunk (3 bad files) has no face.
    result = mine_folder(photos, root, _config(shard_rows=3))
    assert result.ran and result.n_faces == len(FOUND)
    assert not (root / "embeddings.npy").exists()
    reader = ShardedEmbeddings(root / "embeddings_shards")
    assert [s["rows"] for s in reader.shards] == [1, 3, 2]
    single = np.load(reference / "embeddings.npy")
    np.testing.assert_array_equal(reader.take(np.arange(len(reader))), single)
    table = pd.read_parquet(reference / "embeddings.parquet")
    assert reader.paths() == table["path"].tolist()
    # Every table but the vectors' file is byte for byte the single-file layout's.
    same = ["images.parquet", "faces.parquet", "embeddings.parquet", "errors.parquet", "errors.csv"]
    assert all((root / n).read_bytes() == (reference / n).read_bytes() for n in same)
    meta = json.loads((root / "embeddings.json").read_text())
    assert meta["layout"] == "sharded" and meta["shards"] == "embeddings_shards" and meta["count"] == 6
    # Readers of a dataset root see the same embeddings whichever the layout.
    loaded, expected = load_embeddings(root), load_embeddings(reference)
    np.testing.assert_array_equal(loaded.vectors, expected.vectors)
    assert loaded.paths == expected.paths and loaded.image_ids == expected.image_ids
    assert embeddings_files(root)[0] == "embeddings_shards/index.json"
    index = json.loads((root / "embeddings_shards" / "index.json").read_text())
    for info in index["shards"]:
        path = root / "embeddings_shards" / f"{info['name']}.npy"
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        embeddings_digest(root) == hashlib.sha256((root / embeddings_files(root)[0]).read_bytes()).hexdigest()
    )
    # A killed run resumes, and any worker count ends with the same shard bytes.
    real = pipeline._mine_chunk
    resumed = tmp_path / "resumed"
    monkeypatch.setattr(pipeline, "_mine_chunk", _dies_on_third_chunk(real))
    with pytest.raises(_Boom):
        mine_folder(photos, resumed, _config(shard_rows=3))
    monkeypatch.setattr(pipeline, "_mine_chunk", real)
    mine_folder(photos, resumed, _config(shard_rows=3))
    assert _digest_sharded(resumed) == _digest_sharded(root)
    parallel = tmp_path / "parallel"
    mine_folder(photos, parallel, _config(shard_rows=3, workers=2))
    assert _digest_sharded(parallel) == _digest_sharded(root)
    assert not mine_folder(photos, root, _config(shard_rows=3)).ran
    # Back to one file: the shards of the other layout go, embeddings.npy is the reference's.
    mine_folder(photos, root, _config())
    assert not (root / "embeddings_shards").exists()
    assert digest_mined(root) == digest_mined(reference)


def test_tta_change_re_embeds_once_and_is_recorded(mined, photos, tmp_path):
    root, _ = mined  # mined with the default, flip
    plain_root = tmp_path / "plain"
    shutil.copytree(root, plain_root)
    flipped = np.load(root / "embeddings.npy")
    first = mine_folder(photos, plain_root, _config(tta="none"))
    assert first.ran  # another test-time augmentation is another stage config
    assert json.loads((root / "embeddings.json").read_text())["tta"] == "flip"
    assert "tta" not in json.loads((plain_root / "embeddings.json").read_text())
    plain = np.load(plain_root / "embeddings.npy")
    assert flipped.shape == plain.shape
    own = np.sum(plain * flipped, axis=1)
    assert np.all(own > 0.95) and np.all(own < 1 - 1e-5)
    from refface.manifests.embeddings import load_embeddings

    assert load_embeddings(root).tta == "flip" and load_embeddings(plain_root).tta == "none"
    before = (plain_root / "embeddings.npy").stat().st_mtime_ns
    again = mine_folder(photos, plain_root, _config(tta="none", workers=2))
    assert not again.ran and (plain_root / "embeddings.npy").stat().st_mtime_ns == before


def test_single_file_layout_keeps_its_fingerprint():
    assert "shard_rows" not in MiningConfig().stage_config()
    # roots mined without augmentation keep the fingerprints they had before the option
    assert "tta" not in MiningConfig(tta="none").stage_config()
    assert MiningConfig().stage_config()["tta"] == "flip"
    with pytest.raises(ValueError, match="test-time augmentation"):
        MiningConfig(tta="jitter").validate()
    assert MiningConfig(shard_rows=1000).stage_config()["shard_rows"] == 1000
    with pytest.raises(ValueError, match="shard_rows must be 0"):
        MiningConfig(shard_rows=-1).validate()


def test_embed_command_writes_shards(photos, tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    out = tmp_path / "cli-sharded"
    args = [
        "embed",
        str(photos),
        "--out",
        str(out),
        "--workers",
        "1",
        "--chunk-size",
        "3",
        "--shard-rows",
        "3",
    ]
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "3 shard(s)" in res.output
    assert json.loads((out / "embeddings_shards" / "index.json").read_text())["count"] == len(FOUND)
    bad = CliRunner().invoke(app, [*args[:-1], "-2"])
    assert bad.exit_code == 2 and "shard_rows must be 0" in bad.output


def test_cached_faces_root_is_keyed_by_every_module_mining_runs(photos, tmp_path):
    # tests/common/faces_root.py keys its cache by the sources mining can import (read from the
    # code); every refface module a real mining run loads must be among them.
    import subprocess
    import sys

    from common.faces_root import REPO, mining_sources

    script = (
        "import sys\n"
        "from refface.mining.pipeline import MiningConfig, mine_folder\n"
        f"mine_folder({str(photos)!r}, {str(tmp_path / 'root')!r}, MiningConfig(workers=1, save_crops=True))\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    if name.split('.')[0] == 'refface':\n"
        "        print(module.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=REPO)
    loaded = {Path(line).resolve().relative_to(REPO).as_posix() for line in out.stdout.split()}
    assert "refface/mining/embed.py" in loaded and "refface/manifests/atomic.py" in loaded
    assert loaded <= set(mining_sources())
