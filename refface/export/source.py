"""What the exports read from a built dataset root, per split, in one place.

A split's rows are the images of ``{split}_image.txt`` plus every image its reference CSV names (a
CelebA-Test-Ref root lists pool images as references only), sorted by path. References never cross
splits, so a reference is addressed by its row number inside the same split.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from refface.manifests.layout import references_filename
from refface.manifests.references import read_references
from refface.manifests.root import DatasetRoot
from refface.manifests.splits import read_split_lists

SPLITS = ("train", "val", "test")
PARAMS_SKIP = ("gt_image", "lq_image", "status", "reason")


@dataclass
class LQSet:
    """One degraded set of the root (``ROOT/lq/<name>/``): LQ file and sampled parameters per target."""

    name: str
    folder: Path
    params: dict[str, dict[str, Any]]  # gt_image -> parameters (non-null values only)
    files: dict[str, str]  # gt_image -> lq file relative to the set folder


@dataclass
class SplitRows:
    split: str
    paths: list[str]
    identity: list[int]
    is_target: list[bool]
    refs: list[list[str]]
    lq_image: list[str]  # the CSV's lq_image value ('' when none)
    listed: list[bool]  # in {split}_image.txt (False: a reference-only row)

    def ref_indices(self) -> list[list[int]]:
        row = {p: i for i, p in enumerate(self.paths)}
        return [[row[r] for r in refs] for refs in self.refs]


@dataclass
class ExportSource:
    root: Path
    image_root: Path
    ref_root: Path | None
    kind: str
    splits: dict[str, SplitRows]
    lq_sets: list[LQSet] = field(default_factory=list)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def file_of(self, path: str) -> Path:
        """Where an image of the root lives (the image root, else the reference pool's root)."""
        first = self.image_root / path
        if first.exists() or self.ref_root is None:
            return first
        return self.ref_root / path


def clean_value(value: Any) -> Any:
    """A JSON-ready Python value (numpy scalars and arrays unwrapped); None for NaN."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def params_record(row: Mapping[Hashable, Any]) -> dict[str, Any]:
    """A degradation parameters row without bookkeeping columns or empty values."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in PARAMS_SKIP:
            continue
        value = clean_value(value)
        if value is None or value == "":
            continue
        out[str(key)] = value
    return out


def read_lq_sets(root: Path) -> list[LQSet]:
    sets: list[LQSet] = []
    lq = root / "lq"
    if not lq.is_dir():
        return sets
    for folder in sorted(
        p for p in lq.iterdir() if (p / "params.parquet").exists() and (p / "manifest.json").exists()
    ):
        table = pd.read_parquet(folder / "params.parquet")
        if not len(table):
            continue
        rows = table.to_dict("records")
        sets.append(
            LQSet(
                folder.name,
                folder,
                {r["gt_image"]: params_record(r) for r in rows},
                {r["gt_image"]: r["lq_image"] for r in rows},
            )
        )
    return sets


def read_source(root: str | Path, splits: tuple[str, ...] = SPLITS) -> ExportSource:
    """Read a built root's split lists, identities, reference CSVs, LQ sets and attributes."""
    dataset = DatasetRoot(root)
    root = dataset.path
    build = dataset.build_record()
    ref_root = Path(build["ref_root"]) if build.get("ref_root") else None
    lists = read_split_lists(root)
    identity = dataset.identity_of()
    out: dict[str, SplitRows] = {}
    for split in splits:
        csv = root / references_filename(split)
        if split not in lists and not csv.exists():
            continue
        refs_of: dict[str, list[str]] = {}
        lq_of: dict[str, str] = {}
        if csv.exists():
            df = read_references(csv)
            refs_of = {g: list(r) for g, r in zip(df["gt_image"], df["ref_image"], strict=True)}
            if "lq_image" in df.columns:
                lq_of = {g: str(v) for g, v in zip(df["gt_image"], df["lq_image"], strict=True)}
        listed = set(lists.get(split, []))
        paths = sorted(listed | set(refs_of) | {r for refs in refs_of.values() for r in refs})
        out[split] = SplitRows(
            split,
            paths,
            [int(identity.get(p, -1)) for p in paths],
            [p in refs_of for p in paths],
            [refs_of.get(p, []) for p in paths],
            [lq_of.get(p, "") for p in paths],
            [p in listed for p in paths],
        )
    if not out:
        raise FileNotFoundError(f"{root} has no split lists or reference CSVs: build it first")
    return ExportSource(
        root,
        dataset.image_root() or root,
        ref_root,
        str(build.get("kind", "")),
        out,
        read_lq_sets(root),
        dataset.attributes_of(),
    )
