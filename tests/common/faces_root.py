"""A dataset root mined from the shared labeled photos (dlib), built once and cached on disk.

Use in a test module::

    from common.faces_root import faces_root  # noqa: F401  (session fixture)

or call :func:`build_faces_root` directly. The cache folder is keyed by a fingerprint of the
mining code (every refface module the mining pipeline imports, found by reading the sources) and
config, so editing any code mining runs rebuilds it, and an
unchanged tree reuses it across test sessions (the mining stage itself also skips when done).
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Mining starts here; every refface module it can import (at module top or inside a function) can
# change what it writes, so all of them key the cache.
MINING_ENTRY = "refface.mining.pipeline"


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_refface_modules(path: Path, module: str) -> set[str]:
    """Names of the refface modules (and their packages) that ``path`` imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # ``from refface.mining import align`` imports a module, not only a name.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    names = set()
    for name in found:
        parts = name.split(".")
        if parts[0] == "refface":
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def mining_sources(entry: str = MINING_ENTRY) -> list[str]:
    """Repository paths of every refface source file ``entry`` can reach through its imports."""
    seen: dict[str, Path] = {}
    todo = [".".join(entry.split(".")[: i + 1]) for i in range(entry.count(".") + 1)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:  # a name imported from a module, not a module
            continue
        seen[name] = path
        todo.extend(_imported_refface_modules(path, name) - seen.keys())
    return sorted(p.relative_to(REPO).as_posix() for p in seen.values())


def cache_base() -> Path:
    """Where cached roots live: $REFFACE_TEST_CACHE, else <tmp>/refface-test-cache."""
    env = os.environ.get("REFFACE_TEST_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "refface-test-cache"


def code_fingerprint(faces_dir: Path, **config) -> str:
    """sha256 over the mining sources, the photo folder's labels file and the mining config."""
    h = hashlib.sha256()
    for rel in mining_sources():
        h.update(rel.encode() + b"\0" + (REPO / rel).read_bytes() + b"\0")
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
