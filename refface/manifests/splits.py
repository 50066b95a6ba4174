"""Split lists ``{train,val,test}_image.txt``: one image path per line, relative to the image root."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from refface.manifests.atomic import write_text
from refface.manifests.layout import SPLITS, split_filename


def write_split_list(path: str | os.PathLike, paths: Iterable[str]) -> None:
    """Write one split list atomically, sorted, one path per line (the published files' layout)."""
    lines = sorted(str(p) for p in paths)
    write_text(path, "".join(f"{line}\n" for line in lines))


def read_split_list(path: str | os.PathLike) -> list[str]:
    """Paths listed in one split file (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def write_split_lists(root: str | os.PathLike, splits: Mapping[str, Iterable[str]]) -> list[str]:
    """Write ``{split}_image.txt`` for every split into ``root``; returns the written file names."""
    names = []
    for split in SPLITS:
        name = split_filename(split)
        write_split_list(Path(root) / name, splits.get(split, []))
        names.append(name)
    return names


def read_split_lists(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{split: paths}`` for the split files present in ``root``."""
    out = {}
    for split in SPLITS:
        path = Path(root) / split_filename(split)
        if path.exists():
            out[split] = read_split_list(path)
    return out
