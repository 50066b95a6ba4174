"""Tests for refface attributes: analyzer lookup, output schema, prompts, missing weights, CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from refface.mining import attributes as attr
from refface.mining.attributes import (
    ATTRIBUTE_COLUMNS,
    EMOTIONS,
    NEGATIVE_QUALITY_PROMPT,
    RACES,
    AttributesConfig,
    TorchAttributeAnalyzer,
    build_negative_attribute_prompt,
    build_prompt,
    run_attributes,
)


class TinyAttributeNet(torch.nn.Module):
    """A stand-in for the deepface models: same crops in, same four heads out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 5, stride=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.age = torch.nn.Linear(4, 1)
        self.gender = torch.nn.Linear(4, 2)
        self.race = torch.nn.Linear(4, len(RACES))
        self.emotion = torch.nn.Linear(4, len(EMOTIONS))

    def forward(self, x):
        f = self.features(x)
        age = 20 + 40 * torch.sigmoid(self.age(f)[:, 0])
        return age, self.gender(f), self.race(f), self.emotion(f)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    from common.tiny_root import make_tiny_root

    return make_tiny_root(tmp_path / "root")


@pytest.fixture()
def tiny_backend(monkeypatch):
    monkeypatch.setitem(attr.ANALYZERS, "tiny", lambda cfg: TorchAttributeAnalyzer(module=TinyAttributeNet()))
    return "tiny"


def test_prompt_template():
    attrs = {"age": 30.4, "gender": "Man", "race": "asian", "emotion": "neutral"}
    assert build_prompt(attrs) == "a photo of a 30-year-old man, neutral expression"
    assert build_prompt({**attrs, "gender": "Woman", "emotion": "happy"}, "{race} {gender}, {emotion}") == (
        "asian woman, happy"
    )
    negative = build_negative_attribute_prompt(attrs)
    assert "woman" in negative and "elderly" in negative
    assert "man" in build_negative_attribute_prompt({**attrs, "gender": "Woman", "age": 70})


def test_run_attributes_with_stand_in_model(root: Path, tiny_backend: str):
    manifest, ran = run_attributes(root, AttributesConfig(backend=tiny_backend, batch_size=5))
    assert ran and manifest["rows"] == 13
    df = pd.read_parquet(root / "attributes.parquet")
    assert list(df.columns) == ATTRIBUTE_COLUMNS and len(df) == 13
    assert sorted(df["path"]) == sorted(pd.read_parquet(root / "images.parquet")["path"])
    assert df["age"].between(20, 60).all()
    assert set(df["gender"]) <= {"Man", "Woman"} and set(df["race"]) <= set(RACES)
    assert set(df["emotion"]) <= set(EMOTIONS)
    assert df[["gender_score", "race_score", "emotion_score"]].gt(0).all().all()
    pattern = re.compile(r"^a photo of a \d+-year-old (man|woman), \w+ expression$")
    assert all(pattern.match(p) for p in df["prompt"])
    # Batch size does not change results (same crops, same model).
    other = root.parent / "other"
    import shutil

    shutil.copytree(root, other)
    run_attributes(other, AttributesConfig(backend=tiny_backend, batch_size=1), force=True)
    pd.testing.assert_frame_equal(df, pd.read_parquet(other / "attributes.parquet"), atol=1e-5)
    _, ran_again = run_attributes(root, AttributesConfig(backend=tiny_backend, batch_size=5))
    assert not ran_again


def test_unreadable_image_is_an_error_row(root: Path, tiny_backend: str):
    (root / "images" / "id2" / "img1.png").write_bytes(b"garbage")
    manifest, _ = run_attributes(root, AttributesConfig(backend=tiny_backend))
    assert manifest["rows"] == 12 and manifest["errors"] == 1
    errors = pd.read_parquet(root / "errors_attributes.parquet")
    assert list(errors["path"]) == ["id2/img1.png"] and errors["stage"].iloc[0] == "attributes"


def test_attributes_flow_into_shards(root: Path, tiny_backend: str, tmp_path: Path):
    from refface.builders.shards import ShardsConfig, write_shards
    from refface.manifests.webdataset import decode_member, iter_tar_samples

    run_attributes(root, AttributesConfig(backend=tiny_backend))
    write_shards(root, tmp_path / "s", ShardsConfig())
    df = pd.read_parquet(root / "attributes.parquet").set_index("path")
    targets = pd.read_csv(root / "train_references.csv")["gt_image"]
    seen = []
    for sample in iter_tar_samples(tmp_path / "s" / "train-000000.tar"):
        meta = decode_member("meta.json", sample["meta.json"])
        seen.append(meta["path"])
        attrs = decode_member("attrs.json", sample["attrs.json"])
        assert attrs["prompt"] == df.loc[meta["path"], "prompt"]
        assert attrs["negative_attribute_prompt"] == df.loc[meta["path"], "negative_attribute_prompt"]
        assert attrs["negative_quality_prompt"] == NEGATIVE_QUALITY_PROMPT
    assert sorted(seen) == sorted(targets)  # every train target was checked, none skipped


def test_deepface_weights_missing_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("DEEPFACE_HOME", raising=False)
    with pytest.raises(FileNotFoundError, match="DEEPFACE_HOME"):
        attr.ANALYZERS["deepface"](AttributesConfig())
    (tmp_path / ".deepface" / "weights").mkdir(parents=True)
    (tmp_path / ".deepface" / "weights" / "age_model_weights.h5").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="gender_model_weights.h5"):
        attr.ANALYZERS["deepface"](AttributesConfig(deepface_home=str(tmp_path)))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown attribute backend"):
        AttributesConfig(backend="nope").validate()
    with pytest.raises(ValueError, match="template"):
        AttributesConfig(template="a {hair} face").validate()


def test_cli_torch_backend_and_missing_weights(root: Path, tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from refface.cli import app

    model = tmp_path / "attr.pt2"
    torch.export.save(
        torch.export.export(
            TinyAttributeNet(),
            (torch.rand(2, 3, 224, 224),),
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        ),
        str(model),
    )
    runner = CliRunner()
    res = runner.invoke(app, ["attributes", str(root), "--backend", "torch", "--model", str(model)])
    assert res.exit_code == 0, res.output
    assert len(pd.read_parquet(root / "attributes.parquet")) == 13
    monkeypatch.delenv("DEEPFACE_HOME", raising=False)
    res = runner.invoke(app, ["attributes", str(root), "--force"])
    assert res.exit_code == 2 and "DEEPFACE_HOME" in res.output
