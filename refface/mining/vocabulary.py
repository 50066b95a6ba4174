"""The attribute vocabulary MGFR prompts speak: groups of labels a person can name, prompt composition
from scored or typed attributes, negative-attribute prompts and threshold calibration.

Each group holds mutually exclusive labels; a scorer (the CLIP backend) gives one probability per label
of a group. A group's top label is stated only when its probability reaches the group's threshold.
Labels whose ``phrase`` is empty ("no glasses", "no makeup") are absences: they are never written in a
positive prompt, but they decide the negative one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Label:
    """One label: ``name`` as stored and typed, ``query`` the sentence a zero-shot scorer compares the
    face with, ``phrase`` the words it adds to a prompt (None: the name; "": nothing, an absence)."""

    name: str
    query: str
    phrase: str | None = None

    @property
    def words(self) -> str:
        return self.name if self.phrase is None else self.phrase


@dataclass(frozen=True)
class AttributeGroup:
    """Mutually exclusive labels; ``threshold`` is the probability the top label needs to be stated."""

    name: str
    labels: tuple[Label, ...]
    threshold: float

    def label(self, name: str) -> Label:
        for lab in self.labels:
            if lab.name == name:
                return lab
        raise KeyError(f"{name!r} is not a label of {self.name}")


def _group(name: str, threshold: float, *labels: tuple[str, str] | tuple[str, str, str]) -> AttributeGroup:
    return AttributeGroup(name, tuple(Label(*lab) for lab in labels), threshold)


# Default thresholds: chance for a group of k labels is 1/k; a label is stated when CLIP puts clearly
# more than chance on it. Calibrate them on labeled faces with `refface attributes --calibrate`.
VOCABULARY: tuple[AttributeGroup, ...] = (
    _group(
        "gender",
        0.7,
        ("woman", "a photo of a woman's face"),
        ("man", "a photo of a man's face"),
    ),
    _group(
        "age_group",
        0.4,
        ("child", "a photo of a child's face"),
        ("teenager", "a photo of a teenager's face"),
        ("young adult", "a photo of a young adult's face"),
        ("middle-aged", "a photo of a middle-aged person's face"),
        ("elderly", "a photo of an elderly person's face"),
    ),
    _group(
        "eye_colour",
        0.4,
        ("blue eyes", "a close-up photo of a face with blue eyes"),
        ("brown eyes", "a close-up photo of a face with brown eyes"),
        ("green eyes", "a close-up photo of a face with green eyes"),
        ("hazel eyes", "a close-up photo of a face with hazel eyes"),
        ("grey eyes", "a close-up photo of a face with grey eyes"),
    ),
    _group(
        "hair_colour",
        0.4,
        ("black hair", "a photo of a person with black hair"),
        ("brown hair", "a photo of a person with brown hair"),
        ("blond hair", "a photo of a person with blond hair"),
        ("red hair", "a photo of a person with red hair"),
        ("grey hair", "a photo of a person with grey hair"),
        ("white hair", "a photo of a person with white hair"),
    ),
    _group(
        "hair_length",
        0.5,
        ("short hair", "a photo of a person with short hair"),
        ("long hair", "a photo of a person with long hair"),
        ("bald", "a photo of a bald person"),
    ),
    _group(
        "facial_hair",
        0.45,
        ("beard", "a photo of a person with a beard"),
        ("moustache", "a photo of a person with a moustache"),
        ("stubble", "a photo of a person with stubble"),
        ("clean-shaven", "a photo of a clean-shaven face"),
    ),
    _group(
        "glasses",
        0.6,
        ("eyeglasses", "a photo of a person wearing eyeglasses"),
        ("sunglasses", "a photo of a person wearing sunglasses"),
        ("no glasses", "a photo of a person without glasses", ""),
    ),
    _group(
        "makeup",
        0.65,
        ("makeup", "a photo of a person wearing makeup", "wearing makeup"),
        ("no makeup", "a photo of a person without makeup", ""),
    ),
    _group(
        "expression",
        0.4,
        ("smiling", "a photo of a smiling face"),
        ("neutral expression", "a photo of a face with a neutral expression"),
        ("laughing", "a photo of a laughing face"),
        ("surprised", "a photo of a surprised face"),
        ("frowning", "a photo of a frowning face"),
    ),
    _group(
        "skin_tone",
        0.45,
        ("light skin", "a photo of a person with light skin"),
        ("medium skin", "a photo of a person with medium skin tone"),
        ("dark skin", "a photo of a person with dark skin"),
    ),
)
GROUPS = {g.name: g for g in VOCABULARY}
# Prompt order of the detail groups (the subject, "<age group> <gender>", comes first).
DETAIL_ORDER = ("hair", "eye_colour", "facial_hair", "glasses", "makeup", "skin_tone", "expression")
PROMPT_PREFIX = "a high-quality photo of"
UNKNOWN = ""


def vocabulary_columns() -> list[str]:
    """Table columns of a vocabulary row: per group its label ("" when not stated) and top probability."""
    cols = ["path"]
    for g in VOCABULARY:
        cols += [g.name, f"{g.name}_score"]
    return [*cols, "scores", "prompt", "negative_attribute_prompt"]


def find_label(text: str) -> tuple[AttributeGroup, Label] | None:
    """The vocabulary label a typed phrase names (case and spacing ignored), or None."""
    key = " ".join(text.lower().split())
    for g in VOCABULARY:
        for lab in g.labels:
            if key in (lab.name, lab.words):
                return g, lab
    return None


def compose_prompt(labels: Mapping[str, str], extra: Sequence[str] = ()) -> str:
    """The positive prompt from stated labels ``{group: label name}`` plus free-text ``extra`` phrases.

    "a high-quality photo of a young adult woman, long blond hair, blue eyes, eyeglasses, smiling".
    Hair length and colour merge ("long" + "blond hair" -> "long blond hair"); absences are left out.
    """

    def words(group: str) -> str:
        name = labels.get(group) or UNKNOWN
        return GROUPS[group].label(name).words if name else ""

    age, gender = words("age_group"), words("gender")
    # "a child", "a teenager" stand alone; other ages need a noun ("an elderly person").
    noun = gender or ("" if age in ("child", "teenager") else "person")
    subject = " ".join(w for w in (age, noun) if w)
    article = "an" if subject[:1] in "aeiou" else "a"
    length, colour = words("hair_length"), words("hair_colour")
    if colour and length in ("short hair", "long hair"):
        hair = f"{length.split()[0]} {colour}"
    else:
        hair = ", ".join(w for w in (length, colour) if w)
    details = [hair if d == "hair" else words(d) for d in DETAIL_ORDER]
    details = [d for d in details if d] + [e for e in extra if e]
    return ", ".join([f"{PROMPT_PREFIX} {article} {subject}", *details])


def negative_from_scores(scores: Mapping[str, Mapping[str, float]], stated: Mapping[str, str]) -> str:
    """The negative-attribute prompt: for each stated group, its most likely other label that has words.

    The runner-up is the mistake a restoration is most likely to make (the confusable colour, the
    other gender, glasses the face does not wear).
    """
    out = []
    for g in VOCABULARY:
        if not stated.get(g.name):
            continue
        probs = scores.get(g.name) or {}
        others = [lab for lab in g.labels if lab.name != stated[g.name] and lab.words]
        if others:
            out.append(max(others, key=lambda lab: probs.get(lab.name, 0.0)).words)
    return ", ".join(out)


def negative_from_labels(stated: Mapping[str, str]) -> str:
    """Negative-attribute prompt without scores: every other label (with words) of each stated group."""
    out = []
    for g in VOCABULARY:
        if stated.get(g.name):
            out += [lab.words for lab in g.labels if lab.name != stated[g.name] and lab.words]
    return ", ".join(out)


def prompts_from_text(text: str) -> tuple[str, str]:
    """``(prompt, negative-attribute prompt)`` from typed attributes such as ``"blue eyes, beard"``.

    Phrases naming a vocabulary label are placed as the scored ones are, and the other labels of their
    group become the negative prompt; any other phrase is kept as typed in the positive prompt.
    """
    stated: dict[str, str] = {}
    extra: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        found = find_label(part)
        if found is None:
            extra.append(part)
            continue
        group, label = found
        if group.name in stated and stated[group.name] != label.name:
            raise ValueError(f"{part!r} contradicts {stated[group.name]!r} (both are {group.name})")
        stated[group.name] = label.name
    return compose_prompt(stated, extra), negative_from_labels(stated)


def load_thresholds(path: str | os.PathLike | None) -> dict[str, float]:
    """Group thresholds: the vocabulary's defaults, overridden by a JSON ``{group: threshold}`` file."""
    out = {g.name: g.threshold for g in VOCABULARY}
    if path is None:
        return out
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file {path} not found (a JSON object group -> threshold)")
    given = json.loads(path.read_text())
    unknown = set(given) - set(out)
    if unknown:
        raise ValueError(f"{path}: unknown attribute groups {sorted(unknown)}; known: {sorted(out)}")
    out.update({k: float(v) for k, v in given.items()})
    return out


def summarize_scores(path: str, scores: Mapping[str, Mapping[str, float]], thresholds: Mapping[str, float]):
    """One table row from per-group label probabilities: stated labels, top probabilities, prompts."""
    row: dict = {"path": path}
    stated: dict[str, str] = {}
    for g in VOCABULARY:
        probs = scores.get(g.name) or {}
        if not probs:
            row[g.name], row[f"{g.name}_score"] = UNKNOWN, float("nan")
            continue
        name, p = max(probs.items(), key=lambda kv: kv[1])
        row[f"{g.name}_score"] = float(p)
        row[g.name] = name if p >= thresholds[g.name] else UNKNOWN
        if row[g.name]:
            stated[g.name] = name
    row["scores"] = json.dumps(
        {g: {k: round(float(v), 6) for k, v in p.items()} for g, p in scores.items()}, sort_keys=True
    )
    row["prompt"] = compose_prompt(stated)
    row["negative_attribute_prompt"] = negative_from_scores(scores, stated)
    return row


def calibrate_thresholds(
    table: pd.DataFrame, truth: pd.DataFrame, precision: float = 0.9, min_count: int = 5
) -> dict[str, dict]:
    """Per-group thresholds from labeled faces: the lowest top-probability at which the stated labels
    are still right at least ``precision`` of the time.

    Args:
        table: attributes rows with a ``scores`` column (what the scorer gave, before any threshold).
        truth: ``path`` plus a column per labeled group holding the true label name ("" = unknown).
        precision: required share of right labels among those stated.
        min_count: groups with fewer labeled faces keep their default threshold.

    Returns:
        ``{group: {"threshold", "labeled", "stated", "precision"}}``; a group whose precision never
        reaches the bar gets threshold 1.0 with ``stated`` 0 (never stated).
    """
    merged = table[["path", "scores"]].merge(truth, on="path", how="inner")
    out: dict[str, dict] = {}
    for g in VOCABULARY:
        if g.name not in truth.columns:
            continue
        rows = merged[merged[g.name].fillna("").astype(str) != ""]
        if len(rows) < min_count:
            continue
        top, right = [], []
        for scores_json, true in zip(rows["scores"], rows[g.name], strict=True):
            probs = json.loads(scores_json).get(g.name) or {}
            if not probs:
                continue
            name, p = max(probs.items(), key=lambda kv: kv[1])
            top.append(p)
            right.append(name == true)
        order = np.argsort(-np.asarray(top), kind="stable")
        top_sorted = np.asarray(top)[order]
        hits = np.cumsum(np.asarray(right)[order])
        prec = hits / np.arange(1, len(order) + 1)
        ok = np.nonzero(prec >= precision)[0]
        # Stating the k most confident is right often enough for every k up to the deepest ok one.
        if len(ok):
            k = int(ok.max())
            out[g.name] = {
                "threshold": float(top_sorted[k]),
                "labeled": len(order),
                "stated": k + 1,
                "precision": float(prec[k]),
            }
        else:
            out[g.name] = {"threshold": 1.0, "labeled": len(order), "stated": 0, "precision": 0.0}
    return out
