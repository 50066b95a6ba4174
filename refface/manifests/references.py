"""Reference CSVs in the exact format ReF-LDM reads: ``gt_image``, ``lq_image``, ``ref_image`` (list string)."""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from refface.manifests.atomic import write_text

TRAIN_COLUMNS = ["gt_image", "ref_image"]
EVAL_COLUMNS = ["gt_image", "lq_image", "ref_image"]
SPLITS = ("train", "val", "test")


def references_filename(split: str) -> str:
    """``train_references.csv`` etc., the names the published FFHQ-Ref files use."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return f"{split}_references.csv"


def format_ref_list(refs: Sequence[str]) -> str:
    """The Python-list string ReF-LDM parses with ``ast.literal_eval``: ``"['a.png', 'b.png']"``."""
    return repr([str(r) for r in refs])


def parse_ref_list(text: str) -> list[str]:
    """Parse a ``ref_image`` cell; raises ValueError when it is not a list of strings."""
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"ref_image is not a Python list literal: {text!r}") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"ref_image must be a list of file names, got {text!r}")
    return value


def references_frame(rows: Sequence[dict], with_lq: bool) -> pd.DataFrame:
    """Rows ``{"gt_image", "ref_image": list[str], ["lq_image"]}`` as a frame ready to write, sorted by target."""
    columns = EVAL_COLUMNS if with_lq else TRAIN_COLUMNS
    records = []
    for row in rows:
        rec = {"gt_image": str(row["gt_image"]), "ref_image": format_ref_list(row["ref_image"])}
        if with_lq:
            rec["lq_image"] = str(row.get("lq_image") or row["gt_image"])
        records.append(rec)
    df = pd.DataFrame(records, columns=columns)
    return df.sort_values("gt_image", kind="stable").reset_index(drop=True)


def write_references(path: str | os.PathLike, rows: Sequence[dict], with_lq: bool) -> pd.DataFrame:
    """Write a reference CSV atomically (pandas CSV with header, no index), as ReF-LDM reads it.

    Args:
        path: target CSV file.
        rows: dicts with ``gt_image`` (str), ``ref_image`` (list of str) and, for val/test, ``lq_image``.
        with_lq: include the ``lq_image`` column (val/test files).

    Returns:
        The written frame (``ref_image`` as strings).
    """
    df = references_frame(rows, with_lq)
    write_text(path, df.to_csv(index=False, lineterminator="\n"))
    return df


def read_references(path: str | os.PathLike) -> pd.DataFrame:
    """Read a reference CSV (built here or published) with ``ref_image`` parsed into lists.

    Raises:
        ValueError: missing columns or a ``ref_image`` cell that is not a list of strings; the
            message names the file and the row.
    """
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    # Published files sometimes carry a saved pandas index as an unnamed first column.
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed:")])
    missing = [c for c in TRAIN_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    parsed = []
    for i, cell in enumerate(df["ref_image"]):
        try:
            parsed.append(parse_ref_list(cell))
        except ValueError as e:
            raise ValueError(f"{path}: row {i + 2}: {e}") from e
    df["ref_image"] = parsed
    return df
