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


def read_references(path: str | os.PathLike, bad_rows: list[str] | None = None) -> pd.DataFrame:
    """Read a reference CSV (built here or published) with ``ref_image`` parsed into lists.

    Args:
        path: the CSV file.
        bad_rows: when given, a row that does not parse (more fields than the header, or a
            ``ref_image`` cell that is not a list of strings) is left out of the frame and described here (``"row N: ..."``, N as in a spreadsheet: the header is row 1) instead
            of raising, so a checker can go on and report the rest of the file.

    Returns:
        The frame; its index keeps each row's position in the file (row N has index N - 2).

    Raises:
        ValueError: missing columns, or (without ``bad_rows``) a ``ref_image`` cell that is not a list
            of strings; the message names the file and the row.
    """
    path = Path(path)
    problems: list[tuple[int, str]] = []
    df = _read_csv(path, problems if bad_rows is not None else None)
    # Published files sometimes carry a saved pandas index as an unnamed first column.
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed:")])
    missing = [c for c in TRAIN_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    parsed: list[list[str]] = []
    unparsed = []
    for i, cell in zip(df.index, df["ref_image"], strict=True):
        try:
            parsed.append(parse_ref_list(cell))
        except ValueError as e:
            if bad_rows is None:
                raise ValueError(f"{path}: row {i + 2}: {e}") from e
            problems.append((i, str(e)))
            unparsed.append(i)
            parsed.append([])
    df["ref_image"] = parsed
    if bad_rows is not None:
        bad_rows.extend(f"row {i + 2}: {text}" for i, text in sorted(problems))
    return df.drop(index=unparsed)


# Stands in the gt_image cell of a row with more fields than the header (see _read_csv).
_TOO_MANY_FIELDS = "\0too many fields\0"


def _read_csv(path: Path, problems: list[tuple[int, str]] | None) -> pd.DataFrame:
    """The CSV as strings; with ``problems``, rows with too many fields become ``(index, text)`` there."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.ParserError:
        if problems is None:
            raise
    # Read again, keeping each malformed row's place (so later row numbers stay true), then report
    # and drop those rows.
    seen: list[int] = []

    def mark(fields: list[str]) -> list[str]:
        seen.append(len(fields))
        return [_TOO_MANY_FIELDS]

    df = pd.read_csv(path, dtype=str, keep_default_na=False, engine="python", on_bad_lines=mark)
    marked = df.index[df.iloc[:, 0] == _TOO_MANY_FIELDS]
    for i, n in zip(marked, seen, strict=True):
        problems.append((int(i), f"{n} fields, the header has {len(df.columns)}"))
    return df.drop(index=marked)
