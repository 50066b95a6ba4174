"""Output files of mining runs and dataset builds, read back so two runs can be compared byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

# The files one mining run writes.
MINED_OUTPUTS = [
    "images.parquet",
    "faces.parquet",
    "embeddings.npy",
    "embeddings.parquet",
    "embeddings.json",
    "errors.parquet",
    "errors.csv",
]


def digest_mined(root: Path) -> dict[str, str]:
    """SHA-256 of each mined output file under ``root``, keyed by file name."""
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in MINED_OUTPUTS}


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every output file's bytes, except the stage manifests and build.json (they hold timings).

    Stage manifests of nested roots (``mined/.stages/``) are left out too.
    """
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and ".stages" not in Path(rel).parts and rel != "build.json":
            out[rel] = path.read_bytes()
    return out
