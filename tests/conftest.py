"""Shared fixtures: the labeled face photos, tiny images, and offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("REFFACE_PROGRESS", "0")


def _faces_dir() -> Path | None:
    env = os.environ.get("REFFACE_SAMPLE_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "faces"]:
        if (candidate / "labels.csv").exists():
            return candidate
    return None


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The shared labeled face photos (labels.csv: path, identity, source); skips when absent."""
    path = _faces_dir()
    if path is None:
        pytest.skip("shared face photos not found (set REFFACE_SAMPLE_DIR or place ../shared/data/faces)")
    return path


@pytest.fixture(scope="session")
def faces_labels(faces_dir: Path) -> pd.DataFrame:
    return pd.read_csv(faces_dir / "labels.csv", dtype=str, keep_default_na=False)
