"""Embedders: ArcFace ONNX preprocessing as insightface does it, dlib ResNet, embeddings files, model mixing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from common.tiny_arcface import build_tiny_arcface
from insightface.model_zoo.arcface_onnx import ArcFaceONNX

from refface.manifests.embeddings import Embeddings, concat_embeddings, load_embeddings, save_embeddings
from refface.manifests.io import read_image
from refface.mining.embed import (
    DLIB_THRESHOLD,
    EMBEDDERS,
    ArcFaceEmbedder,
    embed_with_tta,
    flip_average,
    make_embedder,
    weights_fingerprint,
)


@pytest.fixture(scope="module")
def tiny_arcface(tmp_path_factory):
    return build_tiny_arcface(tmp_path_factory.mktemp("arcface") / "w600k_r50.onnx")


def _crops(n=5, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8))


def test_embedders_are_chosen_by_name():
    assert set(EMBEDDERS) == {"dlib", "arcface"}
    with pytest.raises(ValueError, match="unknown embedder"):
        make_embedder("facenet")


@pytest.mark.parametrize("self_normalizing", [False, True])
def test_arcface_matches_insightface_preprocessing(tmp_path, self_normalizing):
    path = build_tiny_arcface(tmp_path / "m.onnx", self_normalizing=self_normalizing)
    emb = ArcFaceEmbedder(path)
    assert (emb.input_mean, emb.input_std) == ((0.0, 1.0) if self_normalizing else (127.5, 127.5))
    crops = _crops()
    vectors, norms = emb.embed_crops(crops)
    # insightface's own ArcFaceONNX on the same crops (it takes BGR and swaps to RGB itself).
    ref = ArcFaceONNX(str(path)).get_feat([np.ascontiguousarray(c[:, :, ::-1]) for c in crops])
    assert vectors.dtype == np.float32 and vectors.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(norms, np.linalg.norm(ref, axis=1), rtol=1e-5)


def test_arcface_batches_do_not_change_results(tiny_arcface, tmp_path):
    crops = _crops(7)
    one, _ = ArcFaceEmbedder(tiny_arcface, batch_size=1).embed_crops(crops)
    many, _ = ArcFaceEmbedder(tiny_arcface, batch_size=4).embed_crops(crops)
    np.testing.assert_allclose(one, many, atol=1e-6)
    fixed = ArcFaceEmbedder(build_tiny_arcface(tmp_path / "fixed.onnx", fixed_batch=True), batch_size=32)
    assert fixed.batch_size == 1
    assert fixed.embed_crops(crops)[0].shape == (7, 512)
    assert ArcFaceEmbedder(tiny_arcface).embed_crops([])[0].shape == (0, 512)


def test_arcface_found_in_a_folder_and_in_the_model_root(tiny_arcface, tmp_path, monkeypatch):
    assert ArcFaceEmbedder(tiny_arcface.parent).path == tiny_arcface
    home = tmp_path / "home"
    (home / "models" / "buffalo_l").mkdir(parents=True)
    (home / "models" / "buffalo_l" / "w600k_r50.onnx").write_bytes(tiny_arcface.read_bytes())
    monkeypatch.setenv("INSIGHTFACE_HOME", str(home))
    assert ArcFaceEmbedder().model == "arcface:w600k_r50"


def test_missing_arcface_names_the_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        make_embedder("arcface")
    msg = str(e.value)
    assert "w600k_r50.onnx" in msg and "glintr100.onnx" in msg and "--model" in msg
    assert str(tmp_path / "nowhere" / "models" / "buffalo_l") in msg  # insightface's model root
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        make_embedder("arcface", tmp_path / "missing.onnx")


def test_arcface_crop_is_112(tiny_arcface):
    from refface.mining.detect import Face

    emb = ArcFaceEmbedder(tiny_arcface)
    lm = np.array([[80, 90], [120, 90], [100, 115], [85, 135], [115, 135]], float)
    face = Face(bbox=np.array([60, 60, 140, 160.0]), score=1.0, landmarks=lm)
    assert emb.crop(np.zeros((200, 200, 3), np.uint8), face).shape == (112, 112, 3)


def test_dlib_separates_people(faces_dir):
    from refface.mining.detect import detect, make_detector

    det, emb = make_detector("dlib"), make_embedder("dlib")
    names = ["Alvaro_Uribe_0001", "Alvaro_Uribe_0002", "Amelie_Mauresmo_0001", "Amelie_Mauresmo_0002"]
    crops = []
    for n in names:
        img = read_image(faces_dir / "lfw" / n.rsplit("_", 1)[0] / f"{n}.jpg")
        crops.append(emb.crop(img, detect(det, img).face))
    assert crops[0].shape == (150, 150, 3)
    vectors, norms = emb.embed_crops(crops)
    assert vectors.shape == (4, 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert np.all((norms > 1.0) & (norms < 2.0))  # raw dlib descriptors are not unit vectors
    dist = 1.0 - vectors @ vectors.T
    assert dist[0, 1] < DLIB_THRESHOLD and dist[2, 3] < DLIB_THRESHOLD
    assert min(dist[0, 2], dist[0, 3], dist[1, 2], dist[1, 3]) > DLIB_THRESHOLD


def test_flip_average_is_the_normalized_mean_of_the_two_embeddings():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    mean = (a + b) / 2
    out = flip_average(a, b)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    # Through the embedder path: mirrored crops join the batch, the plain crops' raw norms are kept.
    crops = list(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    batches = []

    def raw(cs):
        batches.append(len(cs))
        return np.stack([c[:, :, 0].astype(float).reshape(-1) + np.arange(64) for c in cs])

    vectors, norms = embed_with_tta(raw, crops, "flip")
    assert batches == [8]
    plain, mirrored = raw(crops), raw([c[:, ::-1] for c in crops])
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(vectors, flip_average(unit(plain), unit(mirrored)), atol=1e-6)
    np.testing.assert_allclose(norms, np.linalg.norm(plain, axis=1), rtol=1e-6)
    none, _ = embed_with_tta(raw, crops, "none")
    np.testing.assert_allclose(none, unit(plain), atol=1e-6)
    with pytest.raises(ValueError, match="flip"):
        embed_with_tta(raw, crops, "jitter")


def test_arcface_flip_averages_the_crop_and_its_mirror(tiny_arcface):
    crops = _crops(3)
    plain, _ = ArcFaceEmbedder(tiny_arcface).embed_crops(crops)
    mirrored, _ = ArcFaceEmbedder(tiny_arcface).embed_crops([c[:, ::-1] for c in crops])
    flipped, _ = ArcFaceEmbedder(tiny_arcface, tta="flip").embed_crops(crops)
    np.testing.assert_allclose(flipped, flip_average(plain, mirrored), atol=1e-5)
    with pytest.raises(ValueError, match="test-time augmentation"):
        ArcFaceEmbedder(tiny_arcface, tta="mirror")


def test_dlib_flip_is_close_to_plain_and_still_separates_people(faces_dir):
    from refface.mining.detect import detect, make_detector

    det = make_detector("dlib")
    plain_emb, flip_emb = make_embedder("dlib"), make_embedder("dlib", tta="flip")
    names = ["Alvaro_Uribe_0001", "Alvaro_Uribe_0002", "Amelie_Mauresmo_0001"]
    crops = []
    for n in names:
        img = read_image(faces_dir / "lfw" / n.rsplit("_", 1)[0] / f"{n}.jpg")
        crops.append(plain_emb.crop(img, detect(det, img).face))
    plain, plain_norms = plain_emb.embed_crops(crops)
    flipped, flip_norms = flip_emb.embed_crops(crops)
    mirrored, _ = plain_emb.embed_crops([c[:, ::-1] for c in crops])
    np.testing.assert_allclose(flipped, flip_average(plain, mirrored), atol=1e-5)
    np.testing.assert_allclose(flip_norms, plain_norms, rtol=1e-6)
    own = np.sum(plain * flipped, axis=1)
    assert np.all(own > 0.97) and np.all(own < 1 - 1e-5)  # different vectors, the same face
    dist = 1.0 - flipped @ flipped.T
    assert dist[0, 1] < DLIB_THRESHOLD and min(dist[0, 2], dist[1, 2]) > DLIB_THRESHOLD


def test_dlib_template_alignment_is_close_to_dlibs_own(faces_dir):
    from refface.mining.detect import detect, make_detector

    det, emb = make_detector("dlib"), make_embedder("dlib")
    img = read_image(faces_dir / "lfw/Alvaro_Uribe/Alvaro_Uribe_0001.jpg")
    face = detect(det, img).face
    native = emb.embed_crops([emb.crop(img, face)])[0]
    face.dlib_points = None  # as if another detector had found it
    templ = emb.embed_crops([emb.crop(img, face)])[0]
    assert 1.0 - float(native[0] @ templ[0]) < DLIB_THRESHOLD


def _emb(fp="a" * 64, n=3, dim=4, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return Embeddings(
        v, [f"p{i}.jpg" for i in range(n)], "m", fp, "cosine", 0.4, list(range(n)), np.ones(n, np.float32)
    )


def test_save_and_load_round_trip(tmp_path):
    emb = _emb()
    written = save_embeddings(tmp_path, emb)
    assert sorted(written) == ["embeddings.json", "embeddings.npy", "embeddings.parquet"]
    meta = json.loads((tmp_path / "embeddings.json").read_text())
    assert meta["dim"] == 4 and meta["metric"] == "cosine" and meta["identity_threshold"] == 0.4
    back = load_embeddings(tmp_path)
    np.testing.assert_array_equal(back.vectors, emb.vectors)
    assert back.paths == emb.paths and back.image_ids == emb.image_ids and back.fingerprint == emb.fingerprint
    first = (tmp_path / "embeddings.parquet").read_bytes()
    save_embeddings(tmp_path, emb)
    assert (tmp_path / "embeddings.parquet").read_bytes() == first  # reproducible bytes


def test_mixing_models_is_refused(tmp_path):
    a, b = _emb("a" * 64), _emb("b" * 64, seed=1)
    assert len(concat_embeddings([a, _emb("a" * 64, seed=2)])) == 6
    with pytest.raises(ValueError, match="different models"):
        concat_embeddings([a, b])
    save_embeddings(tmp_path, a)
    with pytest.raises(ValueError, match="refusing to mix"):
        load_embeddings(tmp_path, expect_fingerprint="b" * 64)


def test_inconsistent_files_are_reported(tmp_path):
    save_embeddings(tmp_path, _emb())
    np.save(tmp_path / "embeddings.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        load_embeddings(tmp_path)
    with pytest.raises(FileNotFoundError, match="refface embed"):
        load_embeddings(tmp_path / "empty")


def test_fingerprint_is_the_weights_sha256(tiny_arcface):
    import hashlib

    assert weights_fingerprint(str(tiny_arcface)) == hashlib.sha256(tiny_arcface.read_bytes()).hexdigest()
