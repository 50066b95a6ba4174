"""Shared fixtures: the labeled face photos, tiny images, and offline settings.

Every test that reaches the shared photos through a fixture (directly or through another fixture)
is marked ``faces`` here, so ``-m "not faces"`` (``make test-fast``) leaves them all out. With
``REFFACE_TEST_NO_FACES=1`` (set by ``make test-fast``) a test that still reaches them fails.
"""

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


# Fixtures that hand out the shared photos or something made from them (tests/common/faces_root.py).
FACES_FIXTURES = frozenset({"faces_dir", "faces_labels", "faces_root"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if FACES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.faces)


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The shared labeled face photos (labels.csv: path, identity, source); skips when absent."""
    if os.environ.get("REFFACE_TEST_NO_FACES") == "1":
        pytest.fail(
            "this test reaches the shared photos without being marked faces: request faces_dir, "
            "faces_labels or faces_root as a fixture argument (or mark it pytest.mark.faces)"
        )
    path = _faces_dir()
    if path is None:
        pytest.skip("shared face photos not found (set REFFACE_SAMPLE_DIR or place ../shared/data/faces)")
    return path


@pytest.fixture(scope="session")
def faces_labels(faces_dir: Path) -> pd.DataFrame:
    return pd.read_csv(faces_dir / "labels.csv", dtype=str, keep_default_na=False)
