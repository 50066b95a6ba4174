"""A dataset root mined from the shared labeled photos (dlib), built once and cached on disk.

Use in a test module::

    from common.faces_root import faces_root  # noqa: F401  (session fixture)

or call :func:`build_faces_root` directly. The cache folder is keyed by a fingerprint of the
mining code and config, so editing detection/alignment/embedding code rebuilds it, and an
unchanged tree reuses it across test sessions (the mining stage itself also skips when done).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Source files whose changes alter what mining writes.
MINING_SOURCES = [
    "refface/mining/detect.py",
    "refface/mining/align.py",
    "refface/mining/embed.py",
    "refface/mining/pipeline.py",
    "refface/manifests/io.py",
    "refface/manifests/errors.py",
    "refface/stages.py",
]


def cache_base() -> Path:
    """Where cached roots live: $REFFACE_TEST_CACHE, else <tmp>/refface-test-cache."""
    env = os.environ.get("REFFACE_TEST_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "refface-test-cache"


def code_fingerprint(faces_dir: Path, **config) -> str:
    """sha256 over the mining sources, the photo folder's labels file and the mining config."""
    h = hashlib.sha256()
    for rel in MINING_SOURCES:
        path = REPO / rel
        h.update(rel.encode() + b"\0" + (path.read_bytes() if path.exists() else b"missing") + b"\0")
    labels = Path(faces_dir) / "labels.csv"
    h.update(str(Path(faces_dir).resolve()).encode() + b"\0")
    h.update(labels.read_bytes() if labels.exists() else b"no labels")
    h.update(repr(sorted(config.items())).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    # Two test sessions may build the same root at once; one builds, the other waits and reuses.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_faces_root(
    faces_dir: Path, tmp_root: Path | None = None, save_crops: bool = False, workers: int = 2
) -> Path:
    """Mine ``faces_dir`` with dlib detection + dlib embeddings into a cached dataset root.

    Args:
        faces_dir: the labeled photos (``labels.csv`` + image folders).
        tmp_root: base folder of the cache (default :func:`cache_base`).
        save_crops: also write the FFHQ-style aligned crops (``aligned/``).
        workers: mining processes.

    Returns:
        The dataset root (images/faces/embeddings/errors tables).
    """
    from refface.mining.pipeline import MiningConfig, mine_folder

    base = Path(tmp_root) if tmp_root is not None else cache_base()
    key = code_fingerprint(faces_dir, save_crops=save_crops)[:16]
    root = base / f"faces-root-{key}"
    with _locked(base / f"faces-root-{key}.lock"):
        mine_folder(faces_dir, root, MiningConfig(save_crops=save_crops, workers=workers))
    return root


@pytest.fixture(scope="session")
def faces_root(faces_dir: Path) -> Path:
    """Session fixture: the dlib-mined dataset root of the shared labeled photos."""
    return build_faces_root(faces_dir)
