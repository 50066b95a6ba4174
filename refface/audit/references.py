"""Reference lists that cross splits: a target whose reference sits in another split leaks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from refface.audit.config import REFERENCE_KIND
from refface.manifests.references import read_references
from refface.manifests.splits import read_split_lists

log = logging.getLogger(__name__)


def reference_cross_splits(root: Path) -> tuple[pd.DataFrame, dict]:
    """Reference rows of a dataset root whose target and reference sit in different splits.

    Looks for ``{split}_image.txt`` and ``{split}_references.csv`` in the root and its direct
    sub-folders (each folder checked on its own).
    """

    rows = []
    checked: dict[str, dict[str, Any]] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        splits = read_split_lists(folder)
        if not splits:
            continue
        split_of: dict[str, str] = {}
        for split, paths in splits.items():
            for p in paths:
                split_of[p] = split
        for csv in sorted(folder.glob("*_references.csv")):
            try:
                refs = read_references(csv)
            except ValueError as e:
                log.warning("%s", e)
                checked[str(csv)] = {"error": str(e)}
                continue
            n_bad = 0
            for gt, ref_list in zip(refs["gt_image"], refs["ref_image"], strict=True):
                for ref in ref_list:
                    sg, sr = split_of.get(str(gt)), split_of.get(str(ref))
                    if sg is not None and sr is not None and sg != sr:
                        n_bad += 1
                        rows.append(
                            {
                                "set_a": sg,
                                "set_b": sr,
                                "kind": REFERENCE_KIND,
                                "image_a": gt,
                                "image_b": ref,
                                "list": str(csv),
                            }
                        )
            checked[str(csv)] = {"rows": int(len(refs)), "cross_split_references": n_bad}
    return pd.DataFrame(rows, columns=["set_a", "set_b", "kind", "image_a", "image_b", "list"]), checked


def reference_cross_splits_empty() -> pd.DataFrame:
    return pd.DataFrame(columns=["set_a", "set_b", "kind", "image_a", "image_b", "list"])
