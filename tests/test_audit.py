"""Leakage audit on synthetic embeddings and tiny images: pair search, hashes, classification, gate, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from refface.audit.config import AuditConfig, AuditSet, distance_to_dot, dot_to_distance
from refface.audit.references import reference_cross_splits
from refface.audit.run import audit_sets
from refface.audit.search import brute_force_pairs, embedding_pairs
from refface.audit.sets import parse_set_specs
from refface.mining.phash import hamming_pairs, hash_images, hash_one, pixel_sha256

MODEL = {"model": "synthetic", "fingerprint": "f" * 64, "metric": "cosine", "identity_threshold": 0.4}


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def identity_sets(seed: int = 0, dim: int = 64):
    """Set a: identities 0..59, set b: identities 40..89, 3 images each; 20 identities shared."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((90, dim))

    def draw(ids):
        ids = np.repeat(np.asarray(ids), 3)
        return unit(centres[ids] + 0.3 * rng.standard_normal((len(ids), dim))), ids

    va, ia = draw(range(60))
    vb, ib = draw(range(40, 90))
    return va, ia, vb, ib


def memory_set(name: str, vectors: np.ndarray, paths=None, model=MODEL) -> AuditSet:
    n = len(vectors)
    return AuditSet(
        name,
        "memory",
        "memory",
        [f"{name}/{i:04d}.png" for i in range(n)],
        paths or [None] * n,
        vectors,
        np.arange(n),
        model,
    )


def test_parse_set_specs():
    assert parse_set_specs(["train=a.txt", "test = b/"]) == {"train": "a.txt", "test": "b/"}
    with pytest.raises(ValueError, match="NAME=SOURCE"):
        parse_set_specs(["train", "test=b"])
    with pytest.raises(ValueError, match="twice"):
        parse_set_specs(["a=x", "a=y"])
    with pytest.raises(ValueError, match="at least two"):
        parse_set_specs(["a=x"])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_threshold_conversion_matches_the_distance_rule(metric):
    rng = np.random.default_rng(1)
    v = unit(rng.standard_normal((200, 16)))
    dots = v @ v.T
    dist = dot_to_distance(dots, metric)
    bar = 0.9 if metric == "euclidean" else 0.5
    # "distance < bar" and "dot > converted bar" select the same pairs.
    assert np.array_equal(dist < bar - 1e-9, dots > distance_to_dot(bar, metric) + 1e-9)


def test_faiss_pairs_equal_brute_force_even_when_rows_saturate():
    rng = np.random.default_rng(2)
    # 40 copies of one face make every query row saturate the first k, forcing k to grow.
    crowd = unit(np.repeat(rng.standard_normal((1, 32)), 40, axis=0) + 0.01 * rng.standard_normal((40, 32)))
    base = np.concatenate([crowd, unit(rng.standard_normal((500, 32)))])
    query = np.concatenate([crowd[:5], unit(rng.standard_normal((50, 32)))])
    r1, c1, s1, nearest = embedding_pairs(query, base, 0.6, k0=4)
    r2, c2, s2 = brute_force_pairs(query, base, 0.6)
    assert set(zip(r1.tolist(), c1.tolist(), strict=True)) == set(zip(r2.tolist(), c2.tolist(), strict=True))
    assert (r1 < 5).sum() == 5 * 40
    np.testing.assert_allclose(nearest, (query @ base.T).max(axis=1), atol=1e-5)


def test_hamming_pairs_match_a_naive_count():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**63, 50, dtype=np.uint64)
    b = np.concatenate([a[:10] ^ np.uint64(0b1011), rng.integers(0, 2**63, 300, dtype=np.uint64)])
    i, j, d = hamming_pairs(a, b, 6, block=97)
    naive = {(x, y, bin(int(a[x]) ^ int(b[y])).count("1")) for x in range(50) for y in range(len(b))}
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == {t for t in naive if t[2] <= 6}
    assert {(x, x) for x in range(10)} <= set(zip(i.tolist(), j.tolist(), strict=True))


def _face_like(seed: int, size: int = 96) -> np.ndarray:
    """A smooth, asymmetric test picture (perceptual hashes need low-frequency structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def test_hashes_catch_reencoded_resized_and_mirrored_copies(tmp_path):
    rgb = _face_like(0)
    Image.fromarray(rgb).save(tmp_path / "orig.png")
    Image.fromarray(rgb).save(tmp_path / "copy.bmp")  # other bytes, same pixels
    Image.fromarray(rgb).save(tmp_path / "q60.jpg", quality=60)
    Image.fromarray(rgb).resize((61, 61), Image.BILINEAR).save(tmp_path / "small.png")
    Image.fromarray(rgb[:, ::-1]).save(tmp_path / "mirror.png")
    Image.fromarray(_face_like(1)).save(tmp_path / "other.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    names = ["orig.png", "copy.bmp", "q60.jpg", "small.png", "mirror.png", "other.png", "broken.jpg"]
    df = hash_images([str(tmp_path / n) for n in names], cache=tmp_path / "cache.parquet", workers=1)
    h = {n: r for n, r in zip(names, df.to_dict("records"), strict=True)}
    assert h["orig.png"]["pixel_sha256"] == h["copy.bmp"]["pixel_sha256"] == pixel_sha256(rgb)
    assert h["orig.png"]["file_sha256"] != h["copy.bmp"]["file_sha256"]
    assert "truncated or corrupt" in h["broken.jpg"]["error"] or "not a decodable" in h["broken.jpg"]["error"]

    def dist(x, y):
        return bin(int(x) ^ int(y)).count("1")

    orig = h["orig.png"]
    assert dist(orig["phash"], h["q60.jpg"]["phash"]) <= 4
    assert dist(orig["phash"], h["small.png"]["phash"]) <= 4
    assert dist(orig["phash_mirror"], h["mirror.png"]["phash"]) <= 2
    assert dist(orig["phash"], h["mirror.png"]["phash"]) > 10
    assert dist(orig["phash"], h["other.png"]["phash"]) > 10
    # The cache answers a second call without decoding (same rows back).
    again = hash_images([str(tmp_path / n) for n in names], cache=tmp_path / "cache.parquet", workers=1)
    pd.testing.assert_frame_equal(df, again)
    assert hash_one(tmp_path / "orig.png")["phash"] == orig["phash"]


def test_audit_counts_the_planted_identity_leaks_and_gates(tmp_path):
    va, ia, vb, ib = identity_sets()
    summary = audit_sets(
        {"train": memory_set("train", va), "test": memory_set("test", vb)},
        tmp_path / "out",
        AuditConfig(hash_images=False),
    )
    pair = summary["pairs"]["train~test"]
    # Identities 40..59 are on both sides: 20 people, 60 images each side.
    assert pair["leaked_images"] == {"train": 60, "test": 60}
    assert pair["leaked_identities"] == 20
    assert pair["leak_rate"] == pytest.approx(60 / 150)
    assert summary["passed"] is False and summary["failed_pairs"] == ["train~test"]
    leaks = pd.read_csv(tmp_path / "out" / "leaks.csv")
    a_ids = ia[[int(k.split("/")[1][:4]) for k in leaks["image_a"]]]
    b_ids = ib[[int(k.split("/")[1][:4]) for k in leaks["image_b"]]]
    assert (a_ids == b_ids).all() and len(leaks) == 20 * 3 * 3
    assert (leaks["similarity"] > 0.6).all() and set(leaks["kind"]) <= {"near_duplicate", "same_identity"}
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["pairs"]["train~test"]["leaked_identities"] == 20
    assert written["model"]["fingerprint"] == MODEL["fingerprint"]
    assert (tmp_path / "out" / "report.html").read_text().count("summary-table") == 1

    # A generous gate passes the same sets.
    relaxed = audit_sets(
        {"train": memory_set("train", va), "test": memory_set("test", vb)},
        tmp_path / "out2",
        AuditConfig(hash_images=False, max_leak_rate=0.5),
    )
    assert relaxed["passed"] is True


def test_disjoint_sets_report_nothing(tmp_path):
    va, _, vb, ib = identity_sets(seed=4)
    keep = ib >= 60
    summary = audit_sets(
        {"a": memory_set("a", va), "b": memory_set("b", vb[keep])}, tmp_path, AuditConfig(hash_images=False)
    )
    assert summary["pairs"]["a~b"]["leaked_pairs"] == 0 and summary["passed"] is True


def test_mixed_models_are_refused(tmp_path):
    va, _, vb, _ = identity_sets()
    other = {**MODEL, "fingerprint": "0" * 64}
    with pytest.raises(ValueError, match="different models"):
        audit_sets({"a": memory_set("a", va), "b": memory_set("b", vb, model=other)}, tmp_path)
    # One set embedded with the mirrored-crop average, the other without: not comparable either.
    flipped = {**MODEL, "tta": "flip"}
    with pytest.raises(ValueError, match=r"b: synthetic f{12} tta flip.*one --tta"):
        audit_sets({"a": memory_set("a", va), "b": memory_set("b", vb, model=flipped)}, tmp_path)
    # A model record without tta is one mined without augmentation.
    same = audit_sets(
        {"a": memory_set("a", va), "b": memory_set("b", vb, model={**MODEL, "tta": "none"})},
        tmp_path / "ok",
        AuditConfig(hash_images=False),
    )
    assert same["pairs"]["a~b"]["leaked_pairs"] > 0  # compared: the two sets share identities


def test_hash_only_duplicates_between_sets_of_images(tmp_path):
    """Images without faces still leak as exact / near-duplicates through their hashes."""
    folder = tmp_path / "img"
    folder.mkdir()
    paths_a, paths_b = [], []
    for i in range(6):
        Image.fromarray(_face_like(10 + i)).save(folder / f"a{i}.png")
        paths_a.append(str(folder / f"a{i}.png"))
    Image.fromarray(_face_like(10)).save(folder / "b_exact.bmp")
    Image.fromarray(_face_like(11)[:, ::-1]).save(folder / "b_mirror.png")
    Image.fromarray(_face_like(12)).save(folder / "b_q50.jpg", quality=50)
    Image.fromarray(_face_like(99)).save(folder / "b_other.png")
    paths_b = [str(folder / n) for n in ("b_exact.bmp", "b_mirror.png", "b_q50.jpg", "b_other.png")]
    empty = np.zeros((0, 8), np.float32)
    a = AuditSet(
        "a", "mem", "memory", [p.split("/")[-1] for p in paths_a], paths_a, empty, np.zeros(0), MODEL
    )
    b = AuditSet(
        "b", "mem", "memory", [p.split("/")[-1] for p in paths_b], paths_b, empty, np.zeros(0), MODEL
    )
    summary = audit_sets({"a": a, "b": b}, tmp_path / "out", AuditConfig(workers=1))
    leaks = pd.read_csv(tmp_path / "out" / "leaks.csv")
    found = {(r.image_a, r.image_b): r for r in leaks.itertuples()}
    assert found[("a0.png", "b_exact.bmp")].kind == "exact"
    assert (
        found[("a1.png", "b_mirror.png")].kind == "near_duplicate"
        and found[("a1.png", "b_mirror.png")].mirrored
    )
    assert found[("a2.png", "b_q50.jpg")].kind == "near_duplicate"
    assert not any(k[1] == "b_other.png" for k in found)
    assert summary["pairs"]["a~b"]["leaked_images"]["b"] == 3


def test_reference_lists_crossing_splits_are_found(tmp_path):
    from refface.manifests.references import write_references
    from refface.manifests.splits import write_split_lists

    write_split_lists(tmp_path, {"train": ["a.png", "b.png", "c.png"], "test": ["x.png", "y.png"]})
    write_references(
        tmp_path / "train_references.csv", [{"gt_image": "a.png", "ref_image": ["b.png", "x.png"]}], False
    )
    write_references(
        tmp_path / "test_references.csv",
        [{"gt_image": "x.png", "ref_image": ["y.png"], "lq_image": "x.png"}],
        True,
    )
    rows, checked = reference_cross_splits(tmp_path)
    assert rows[["set_a", "set_b", "image_a", "image_b"]].values.tolist() == [
        ["train", "test", "a.png", "x.png"]
    ]
    assert checked[str(tmp_path / "test_references.csv")]["cross_split_references"] == 0


def test_cli_rejects_bad_input_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    result = CliRunner().invoke(app, ["audit", "--set", "train", "--set", "test=x", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "NAME=SOURCE" in result.output
    result = CliRunner().invoke(
        app,
        ["audit", "--set", f"a={tmp_path / 'nope'}", "--set", f"b={tmp_path}", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2 and "not found" in result.output
