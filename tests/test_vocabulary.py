"""The attribute vocabulary: prompt composition from fixed scores, typed attributes, thresholds,
calibration, and the zero-shot CLIP backend on a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common.tiny_root import make_tiny_root

from refface.mining import vocabulary as voc
from refface.mining.vocabulary import (
    VOCABULARY,
    calibrate_thresholds,
    compose_prompt,
    load_thresholds,
    prompts_from_text,
    summarize_scores,
    vocabulary_columns,
)

DEFAULTS = load_thresholds(None)


def scores_with(top: dict[str, tuple[str, float]]) -> dict[str, dict[str, float]]:
    """Per-group probabilities: the named label gets its probability, the rest share what is left."""
    out = {}
    for g in VOCABULARY:
        name, p = top.get(g.name, (g.labels[0].name, 1.0 / len(g.labels)))
        rest = [lab.name for lab in g.labels if lab.name != name]
        probs = {r: (1.0 - p) / len(rest) for r in rest}
        if rest:
            # A clear runner-up: the last other label takes a little more than the others.
            probs[rest[-1]] += 0.01
            probs[rest[0]] -= 0.01
        out[g.name] = {name: p, **probs}
    return out


def test_vocabulary_covers_what_mgfr_names():
    names = {g.name for g in VOCABULARY}
    assert {"eye_colour", "hair_colour", "hair_length", "facial_hair", "glasses", "makeup"} <= names
    assert {"age_group", "expression", "skin_tone"} <= names
    for g in VOCABULARY:
        assert 1.0 / len(g.labels) < g.threshold < 1.0, g.name  # above chance, below certainty
        assert len({lab.name for lab in g.labels}) == len(g.labels)
    cols = vocabulary_columns()
    assert cols[0] == "path" and cols[-2:] == ["prompt", "negative_attribute_prompt"]
    assert "eye_colour_score" in cols and "scores" in cols


def test_prompt_from_fixed_scores_states_only_confident_groups():
    scores = scores_with(
        {
            "gender": ("woman", 0.9),
            "age_group": ("young adult", 0.7),
            "eye_colour": ("blue eyes", 0.8),
            "hair_colour": ("blond hair", 0.6),
            "hair_length": ("long hair", 0.8),
            "facial_hair": ("clean-shaven", 0.9),
            "glasses": ("no glasses", 0.95),
            "makeup": ("makeup", 0.8),
            "expression": ("smiling", 0.3),  # below its threshold: not stated
            "skin_tone": ("light skin", 0.7),
        }
    )
    row = summarize_scores("a.png", scores, DEFAULTS)
    assert row["prompt"] == (
        "a high-quality photo of a young adult woman, long blond hair, blue eyes, clean-shaven, "
        "wearing makeup, light skin"
    )
    assert row["expression"] == "" and row["expression_score"] == pytest.approx(0.3)
    assert row["eye_colour"] == "blue eyes" and row["eye_colour_score"] == pytest.approx(0.8)
    # Negative: each stated group's runner-up with words (the last other label, by construction).
    negative = row["negative_attribute_prompt"].split(", ")
    assert "man" in negative and "grey eyes" in negative and "sunglasses" in negative
    assert "no glasses" not in row["negative_attribute_prompt"]
    assert not any("smiling" in n or "frowning" in n for n in negative)  # expression was not stated
    assert json.loads(row["scores"])["eye_colour"]["blue eyes"] == pytest.approx(0.8)
    # A stricter threshold drops a group from both prompts.
    strict = summarize_scores("a.png", scores, {**DEFAULTS, "eye_colour": 0.85})
    assert "blue eyes" not in strict["prompt"] and "grey eyes" not in strict["negative_attribute_prompt"]


def test_typed_attributes_compose_and_negate():
    prompt, negative = prompts_from_text("blue eyes, Beard ,  freckles")
    assert prompt == "a high-quality photo of a person, blue eyes, beard, freckles"
    assert set(negative.split(", ")) == {
        "brown eyes",
        "green eyes",
        "hazel eyes",
        "grey eyes",
        "moustache",
        "stubble",
        "clean-shaven",
    }
    prompt, _ = prompts_from_text("elderly, man, bald, grey hair")
    assert prompt == "a high-quality photo of an elderly man, bald, grey hair"
    with pytest.raises(ValueError, match="contradicts"):
        prompts_from_text("blue eyes, brown eyes")
    assert compose_prompt({}) == "a high-quality photo of a person"
    assert compose_prompt({"age_group": "child"}) == "a high-quality photo of a child"
    assert compose_prompt({"age_group": "elderly"}) == "a high-quality photo of an elderly person"


def test_thresholds_file(tmp_path: Path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"eye_colour": 0.9}))
    assert load_thresholds(path)["eye_colour"] == 0.9
    assert load_thresholds(path)["glasses"] == DEFAULTS["glasses"]
    path.write_text(json.dumps({"eye_color": 0.9}))
    with pytest.raises(ValueError, match="unknown attribute groups"):
        load_thresholds(path)
    with pytest.raises(FileNotFoundError, match="thresholds file"):
        load_thresholds(tmp_path / "nope.json")


def test_calibration_finds_the_precision_bar():
    # 20 faces: eye colour right when the top probability is >= 0.6, wrong below.
    rng = np.random.default_rng(0)
    rows, truth = [], []
    for i in range(20):
        p = 0.3 + 0.6 * i / 19
        right = p >= 0.6
        scores = scores_with({"eye_colour": ("blue eyes", p)})
        rows.append({"path": f"{i}.png", "scores": json.dumps(scores)})
        truth.append({"path": f"{i}.png", "eye_colour": "blue eyes" if right else "brown eyes"})
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=int(rng.integers(100)))
    result = calibrate_thresholds(table, pd.DataFrame(truth), precision=1.0)
    p_first_right = min(0.3 + 0.6 * i / 19 for i in range(20) if 0.3 + 0.6 * i / 19 >= 0.6)
    assert result["eye_colour"]["threshold"] == pytest.approx(p_first_right)
    assert result["eye_colour"]["precision"] == 1.0 and result["eye_colour"]["labeled"] == 20
    # A looser bar admits some wrong ones, so its threshold is lower.
    loose = calibrate_thresholds(table, pd.DataFrame(truth), precision=0.8)
    assert loose["eye_colour"]["threshold"] < p_first_right
    # A group that is never right is never stated.
    wrong = pd.DataFrame([{**t, "eye_colour": "green eyes"} for t in truth])
    assert calibrate_thresholds(table, wrong)["eye_colour"]["stated"] == 0


# --------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from refface.mining.tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_backend_scores_every_group(clip_dir: Path):
    from refface.mining.clip_attributes import ClipAttributeAnalyzer

    analyzer = ClipAttributeAnalyzer(clip_dir)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    out = analyzer(crops)
    assert len(out) == 3
    for res in out:
        assert set(res["groups"]) == {g.name for g in VOCABULARY}
        for g in VOCABULARY:
            probs = res["groups"][g.name]
            assert list(probs) == [lab.name for lab in g.labels]
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    # Deterministic, and batch composition does not change a crop's scores.
    again = analyzer(crops[:1])[0]["groups"]
    for g in VOCABULARY:
        for k, v in again[g.name].items():
            assert v == pytest.approx(out[0]["groups"][g.name][k], abs=1e-5)
    # Different faces, different scores.
    assert out[0]["groups"]["eye_colour"] != out[1]["groups"]["eye_colour"]


def test_clip_missing_folder_is_named(tmp_path: Path):
    from refface.mining.clip_attributes import check_clip_folder

    with pytest.raises(FileNotFoundError, match="--clip-model"):
        check_clip_folder(None)
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        check_clip_folder(tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks vocab\.json, merges\.txt, model\.safetensors"):
        check_clip_folder(tmp_path / "partial")


def test_clip_stage_writes_vocabulary_table_and_shards(clip_dir: Path, tmp_path: Path):
    from refface.builders.shards import ShardsConfig, write_shards
    from refface.manifests.webdataset import decode_member, iter_tar_samples
    from refface.mining.attributes import AttributesConfig, run_attributes

    root = make_tiny_root(tmp_path / "root")
    manifest, ran = run_attributes(
        root, AttributesConfig(backend="clip", clip_model=str(clip_dir), batch_size=4)
    )
    assert ran and manifest["rows"] == 13
    df = pd.read_parquet(root / "attributes.parquet")
    assert list(df.columns) == vocabulary_columns()
    for g in VOCABULARY:
        stated = df[g.name] != ""
        assert (df.loc[stated, f"{g.name}_score"] >= g.threshold).all()
        assert (df.loc[~stated, f"{g.name}_score"] < g.threshold).all()
        assert set(df.loc[stated, g.name]) <= {lab.name for lab in g.labels}
    assert df["prompt"].str.startswith("a high-quality photo of").all()
    write_shards(root, tmp_path / "s", ShardsConfig())
    table = df.set_index("path")
    for sample in iter_tar_samples(tmp_path / "s" / "train-000000.tar"):
        meta = decode_member("meta.json", sample["meta.json"])
        attrs = decode_member("attrs.json", sample["attrs.json"])
        assert attrs["prompt"] == table.loc[meta["path"], "prompt"]
        assert attrs["negative_attribute_prompt"] == table.loc[meta["path"], "negative_attribute_prompt"]
        assert attrs["eye_colour_score"] == pytest.approx(table.loc[meta["path"], "eye_colour_score"])


def test_clip_cli_and_calibration(clip_dir: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from refface.cli import app

    root = make_tiny_root(tmp_path / "root")
    runner = CliRunner()
    res = runner.invoke(app, ["attributes", str(root), "--backend", "clip", "--clip-model", str(clip_dir)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(root / "attributes.parquet")
    # Known labels: say the top label is right for every face but the median-confident one.
    top = [max(json.loads(s)["glasses"].items(), key=lambda kv: kv[1]) for s in df["scores"]]
    conf = np.array([p for _, p in top])
    wrong = int(np.argsort(conf)[len(conf) // 2])
    labels = [name for name, _ in top]
    labels[wrong] = next(lab.name for lab in voc.GROUPS["glasses"].labels if lab.name != labels[wrong])
    pd.DataFrame({"path": df["path"], "glasses": labels}).to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "thresholds.json"
    args = ["attributes", str(root), "--calibrate", str(tmp_path / "labels.csv"), "--thresholds", str(out)]
    res = runner.invoke(app, [*args, "--precision", "1.0"])
    assert res.exit_code == 0, res.output
    thresholds = json.loads(out.read_text())
    # Precision 1.0: only faces more confident than the one wrong face can be stated.
    assert thresholds["glasses"] == pytest.approx(conf[conf > conf[wrong]].min())
    res = runner.invoke(
        app,
        [
            "attributes",
            str(root),
            "--backend",
            "clip",
            "--clip-model",
            str(clip_dir),
            "--thresholds",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    df2 = pd.read_parquet(root / "attributes.parquet")
    assert (df2.loc[df2["glasses"] != "", "glasses_score"] >= thresholds["glasses"]).all()
    res = runner.invoke(app, ["attributes", str(root), "--backend", "clip", "--force"])
    assert res.exit_code == 2 and "--clip-model" in res.output


def test_clip_scores_match_the_models_own_logits(clip_dir: Path):
    import torch

    from refface.mining.clip_attributes import ClipAttributeAnalyzer

    analyzer = ClipAttributeAnalyzer(clip_dir)
    crops = [np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)]
    ours = analyzer(crops)[0]["groups"]
    queries = [lab.query for g in VOCABULARY for lab in g.labels]
    tokens = analyzer.tokenizer(queries, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = analyzer.model(**tokens, pixel_values=analyzer.pixels(crops)).logits_per_image[0].numpy()
    start = 0
    for g in VOCABULARY:
        part = logits[start : start + len(g.labels)]
        start += len(g.labels)
        expected = np.exp(part - part.max()) / np.exp(part - part.max()).sum()
        got = [ours[g.name][lab.name] for lab in g.labels]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
