"""Face attributes on aligned crops, and the MGFR-style text prompts.

Backends (:data:`ANALYZERS`): ``clip`` scores the attribute vocabulary MGFR is about (eye and hair
colour, hair length, facial hair, glasses, makeup, age group, expression, skin tone; see
:mod:`refface.mining.vocabulary`) zero-shot; ``deepface`` and ``torch`` give age, gender, race and
emotion.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.console import track
from refface.manifests.atomic import write_parquet
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import read_image
from refface.manifests.layout import ATTRIBUTES
from refface.manifests.root import DatasetRoot
from refface.mining.clip_attributes import ClipAttributeAnalyzer
from refface.mining.vocabulary import load_thresholds, summarize_scores, vocabulary_columns
from refface.stages import folder_fingerprint, run_stage

log = logging.getLogger(__name__)

STAGE = "attributes"
ATTRIBUTE_COLUMNS = [
    "path",
    "age",
    "gender",
    "gender_score",
    "race",
    "race_score",
    "emotion",
    "emotion_score",
    "prompt",
    "negative_attribute_prompt",
]
# The label sets deepface uses; every analyzer reports these names so the schema is one.
GENDERS = ("Woman", "Man")
RACES = ("asian", "indian", "black", "white", "middle eastern", "latino hispanic")
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# Prompt template (MGFR describes the face in words). Fields: {age} (integer years), {gender}
# ("man"/"woman"), {race}, {emotion} (an adjective, e.g. "happy"). Race is kept in the table but
# left out of the default prompt: the identity comes from the reference, not from the text.
DEFAULT_PROMPT_TEMPLATE = "a photo of a {age}-year-old {gender}, {emotion} expression"
# What the model should move away from under classifier-free guidance.
NEGATIVE_QUALITY_PROMPT = (
    "a blurry, noisy, low-resolution, jpeg-compressed, low-quality photo of a face, oversmoothed, distorted"
)
FALLBACK_PROMPT = "a high-quality photo of a face"
EMOTION_WORDS = {
    "angry": "angry",
    "disgust": "disgusted",
    "fear": "fearful",
    "happy": "happy",
    "sad": "sad",
    "surprise": "surprised",
    "neutral": "neutral",
}
GENDER_WORDS = {"Man": "man", "Woman": "woman"}
OPPOSITE_GENDER = {"Man": "woman", "Woman": "man"}
DEEPFACE_WEIGHT_FILES = {
    "age": "age_model_weights.h5",
    "gender": "gender_model_weights.h5",
    "race": "race_model_single_batch.h5",
    "emotion": "facial_expression_model_weights.h5",
}


def build_prompt(attrs: dict[str, Any], template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The positive prompt for one face, e.g. "a photo of a 30-year-old man, neutral expression"."""
    return template.format(
        age=int(round(float(attrs["age"]))),
        gender=GENDER_WORDS.get(attrs["gender"], str(attrs["gender"]).lower()),
        race=attrs.get("race", ""),
        emotion=EMOTION_WORDS.get(attrs["emotion"], str(attrs["emotion"])),
    )


def build_negative_attribute_prompt(attrs: dict[str, Any]) -> str:
    """A prompt describing attributes this face does NOT have (opposite gender, far age, other emotion).

    Used as the negative text under classifier-free guidance so the restoration keeps the face's
    own gender, age and expression.
    """
    age = float(attrs["age"])
    other_age = "an elderly" if age < 45 else "a young"
    other_emotion = "crying" if attrs["emotion"] in ("happy", "neutral", "surprise") else "laughing"
    gender = OPPOSITE_GENDER.get(attrs["gender"], "person")
    return f"a photo of {other_age} {gender}, {other_emotion} expression"


class DeepFaceAnalyzer:
    """deepface ``analyze`` (age, gender, race, emotion) on already aligned crops.

    Weights must already sit in ``$DEEPFACE_HOME/.deepface/weights/`` (deepface would download them
    on first use; refface never downloads at run time).
    """

    def __init__(self, deepface_home: str | os.PathLike | None = None):
        home = deepface_home or os.environ.get("DEEPFACE_HOME")
        if not home:
            raise FileNotFoundError(
                "deepface weights: set DEEPFACE_HOME (or --deepface-home) to a folder holding "
                f".deepface/weights/ with {', '.join(DEEPFACE_WEIGHT_FILES.values())}"
            )
        weights = Path(home) / ".deepface" / "weights"
        missing = [name for name in DEEPFACE_WEIGHT_FILES.values() if not (weights / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"deepface weights missing in {weights}: {', '.join(missing)}. Download them once "
                "(github.com/serengil/deepface_models releases) and place them there."
            )
        os.environ["DEEPFACE_HOME"] = str(home)
        try:
            from deepface import DeepFace
        except ImportError as e:
            raise ImportError(
                "the deepface backend needs `pip install deepface` (which brings tensorflow); "
                "or choose another --backend"
            ) from e
        self._deepface = DeepFace

    def __call__(self, crops: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        out = []
        for rgb in crops:
            # deepface wants BGR; 'skip' because the crops are already aligned faces.
            result = self._deepface.analyze(
                img_path=np.ascontiguousarray(rgb[:, :, ::-1]),
                actions=("age", "gender", "race", "emotion"),
                detector_backend="skip",
                enforce_detection=False,
                silent=True,
            )
            r = result[0] if isinstance(result, list) else result
            out.append(
                {
                    "age": float(r["age"]),
                    "gender": {k: float(v) / 100.0 for k, v in r["gender"].items()},
                    "race": {k: float(v) / 100.0 for k, v in r["race"].items()},
                    "emotion": {k: float(v) / 100.0 for k, v in r["emotion"].items()},
                }
            )
        return out


class TorchAttributeAnalyzer:
    """Any torch module mapping (B, 3, 224, 224) in [0, 1] to (age, gender, race, emotion) logits.

    The module returns a tuple ``(age (B,), gender (B, 2), race (B, 6), emotion (B, 7))`` with the
    class order of :data:`GENDERS`, :data:`RACES`, :data:`EMOTIONS`. Loaded from a TorchScript file
    (``--model PATH``): a ``torch.export`` program (``.pt2``) or TorchScript, or given as ``module``.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, module: Any = None, size: int = 224):
        import torch

        if module is None:
            if model_path is None or not Path(model_path).exists():
                raise FileNotFoundError(
                    f"attribute model not found: {model_path}; pass --model PATH of a torch.export .pt2 (or TorchScript) file"
                )
            if str(model_path).endswith(".pt2"):
                # An exported program is already in inference form (it refuses .eval()).
                module = torch.export.load(str(model_path)).module()
            else:
                module = torch.jit.load(str(model_path), map_location="cpu").eval()
        else:
            module = module.eval()
        self.module = module
        self.size = size

    def __call__(self, crops: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        import cv2
        import torch

        batch = np.stack([cv2.resize(c, (self.size, self.size), interpolation=cv2.INTER_AREA) for c in crops])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            age, gender, race, emotion = self.module(x)
        gender, race, emotion = (t.softmax(-1).numpy() for t in (gender, race, emotion))
        return [
            {
                "age": float(age[i]),
                "gender": dict(zip(GENDERS, map(float, gender[i]), strict=True)),
                "race": dict(zip(RACES, map(float, race[i]), strict=True)),
                "emotion": dict(zip(EMOTIONS, map(float, emotion[i]), strict=True)),
            }
            for i in range(len(crops))
        ]


def _clip_analyzer(cfg: AttributesConfig):
    return ClipAttributeAnalyzer(cfg.clip_model, device=cfg.device)


# Backends by name; each is built from an AttributesConfig.
ANALYZERS: dict[str, Callable[[AttributesConfig], Callable]] = {
    "deepface": lambda cfg: DeepFaceAnalyzer(cfg.deepface_home),
    "torch": lambda cfg: TorchAttributeAnalyzer(cfg.model_path),
    "clip": _clip_analyzer,
}


@dataclass(frozen=True)
class AttributesConfig:
    """Settings of the attributes stage; CLI flags map onto these one to one."""

    backend: str = "deepface"
    deepface_home: str | None = None
    model_path: str | None = None
    clip_model: str | None = None
    thresholds: str | None = None
    device: str = "cpu"
    template: str = DEFAULT_PROMPT_TEMPLATE
    batch_size: int = 16

    def validate(self) -> None:
        if self.backend not in ANALYZERS:
            raise ValueError(f"unknown attribute backend {self.backend!r}; choose one of {sorted(ANALYZERS)}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        try:
            build_prompt({"age": 30, "gender": "Man", "race": "white", "emotion": "neutral"}, self.template)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"bad prompt template {self.template!r}: {e}; fields are {{age}} {{gender}} {{race}} {{emotion}}"
            ) from e


def summarize(
    path: str, raw: dict[str, Any], template: str, thresholds: dict[str, float] | None = None
) -> dict[str, Any]:
    """One attributes row from an analyzer's raw scores: dominant labels, their scores, the prompts.

    ``raw`` is either vocabulary probabilities ``{"groups": {group: {label: p}}}`` (stated when they
    reach ``thresholds``) or age plus gender/race/emotion scores.
    """
    if "groups" in raw:
        return summarize_scores(path, raw["groups"], thresholds or load_thresholds(None))
    row: dict[str, Any] = {"path": path, "age": float(raw["age"])}
    for name in ("gender", "race", "emotion"):
        label, score = max(raw[name].items(), key=lambda kv: kv[1])
        row[name] = label
        row[f"{name}_score"] = float(score)
    row["prompt"] = build_prompt(row, template)
    row["negative_attribute_prompt"] = build_negative_attribute_prompt(row)
    return row


def analyze_images(
    image_root: str | os.PathLike,
    paths: Sequence[str],
    analyzer: Callable[[Sequence[np.ndarray]], list[dict[str, Any]]],
    config: AttributesConfig,
    errors=None,
) -> pd.DataFrame:
    """Run ``analyzer`` over aligned crops in batches; unreadable images become error rows.

    Returns:
        DataFrame with :data:`ATTRIBUTE_COLUMNS`, one row per readable image, in ``paths`` order.
    """
    thresholds = load_thresholds(config.thresholds)
    rows: list[dict[str, Any]] = []
    batch_paths: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if not batch:
            return
        results = analyzer(batch)
        rows.extend(
            summarize(p, r, config.template, thresholds) for p, r in zip(batch_paths, results, strict=True)
        )
        batch.clear()
        batch_paths.clear()

    for rel in track(paths, "attributes"):
        try:
            batch.append(read_image(Path(image_root) / rel))
            batch_paths.append(rel)
        except ImageError as e:
            if errors is not None:
                errors.add(rel, STAGE, str(e))
            log.warning("attributes: %s: %s", rel, e)
        if len(batch) >= config.batch_size:
            flush()
    flush()
    return pd.DataFrame(rows, columns=columns_of(config.backend))


def columns_of(backend: str) -> list[str]:
    """The attributes table's columns for a backend (the vocabulary's for ``clip``)."""
    if backend == "clip":
        return vocabulary_columns()
    return ATTRIBUTE_COLUMNS


def attrs_record(attrs: dict[str, Any] | None) -> dict[str, Any]:
    """The ``attrs.json`` content: attributes (when known) and the three prompts."""
    record: dict[str, Any] = {"negative_quality_prompt": NEGATIVE_QUALITY_PROMPT}
    if attrs:
        # Every attribute column of the table (deepface's or the vocabulary's), JSON-ready.
        for name, value in attrs.items():
            if name in ("path", "scores", "prompt", "negative_attribute_prompt"):
                continue
            if isinstance(value, (float, np.floating)):
                value = None if np.isnan(value) else float(value)
            elif isinstance(value, np.integer):
                value = int(value)
            record[name] = value
        record["prompt"] = str(attrs.get("prompt") or FALLBACK_PROMPT)
        negative = attrs.get("negative_attribute_prompt")
        if not negative and {"age", "gender", "emotion"} <= set(attrs):
            negative = build_negative_attribute_prompt(attrs)
        record["negative_attribute_prompt"] = str(negative or "")
    else:
        record["prompt"] = FALLBACK_PROMPT
        record["negative_attribute_prompt"] = ""
    return record


def run_attributes(
    root: str | os.PathLike,
    config: AttributesConfig | None = None,
    force: bool = False,
) -> tuple[dict, bool]:
    """The attributes stage: analyze every image of a dataset root into ``attributes.parquet``.

    The analyzer is ``ANALYZERS[config.backend](config)``. Images are those of ``images.parquet``
    (else every image named in the reference CSVs). Skipped when already done for this config.

    Returns:
        (stage manifest, ran) as :func:`refface.stages.run_stage` returns them.
    """
    config = config or AttributesConfig()
    config.validate()
    dataset = DatasetRoot(root)
    root = dataset.path
    image_root = dataset.image_root() or root
    paths = dataset.image_paths()
    inputs: dict[str, Any] = {"images": folder_fingerprint(image_root, paths)}
    if config.thresholds:
        inputs["thresholds"] = load_thresholds(config.thresholds)

    def work() -> dict:
        analyzer = ANALYZERS[config.backend](config)
        errors = ErrorsTable()
        df = analyze_images(image_root, paths, analyzer, config, errors)
        write_parquet(root / ATTRIBUTES, df)
        if len(errors):
            errors.write(root, name="errors_attributes")
        return {"outputs": [ATTRIBUTES], "rows": len(df), "errors": len(errors)}

    return run_stage(root, STAGE, config, inputs, work, force=force)
