"""Stages: fingerprinted, atomic, skippable units of work, and the chunked local executor.

A stage writes its outputs into a dataset root, then (last) a manifest in ``.stages/<name>.json``
holding {version, stage, fingerprint, config, inputs, outputs, timings}. A rerun whose
fingerprint matches and whose outputs exist is skipped. Long per-item stages run through
:func:`map_chunks`, which writes one part file per chunk so a killed run resumes chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from refface import __version__
from refface.console import make_progress
from refface.devices import runtime_devices
from refface.executors import make_executor
from refface.manifests.atomic import write_json

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (configs, input fingerprints, versions)."""
    text = json.dumps(_jsonable(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def folder_fingerprint(root: str | os.PathLike, relpaths: Sequence[str]) -> str:
    """Cheap fingerprint of input files: relative path, size and mtime of each."""
    h = hashlib.sha256()
    root = Path(root)
    for rel in relpaths:
        try:
            st = (root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def manifest_path(root: str | os.PathLike, stage: str) -> Path:
    return Path(root) / ".stages" / f"{stage}.json"


def read_manifest(root: str | os.PathLike, stage: str) -> dict | None:
    path = manifest_path(root, stage)
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} has manifest version {manifest.get('version')}, this refface reads {MANIFEST_VERSION}; "
            "rebuild the dataset root or use a matching refface version"
        )
    return manifest


def stage_is_done(root: str | os.PathLike, stage: str, fp: str) -> bool:
    """True when the stage's manifest matches ``fp`` and every output it lists still exists."""
    manifest = read_manifest(root, stage)
    if manifest is None or manifest.get("fingerprint") != fp:
        return False
    return all((Path(root) / out).exists() for out in manifest.get("outputs", []))


def write_manifest(
    root: str | os.PathLike,
    stage: str,
    fp: str,
    config: Any,
    outputs: Sequence[str],
    inputs: dict | None = None,
    timings: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the stage's manifest last: it is the done-marker."""
    manifest = {
        "version": MANIFEST_VERSION,
        "stage": stage,
        "fingerprint": fp,
        "refface_version": __version__,
        "config": _jsonable(config),
        "inputs": _jsonable(inputs or {}),
        "outputs": sorted(outputs),
        "timings": timings or {},
        **(_jsonable(extra) if extra else {}),
    }
    # What ran where: GPUs, onnxruntime providers, FAISS GPUs, torch devices of this process, with
    # the stage's own account (``extra["devices"]``, e.g. what its worker processes used) on top.
    manifest["devices"] = {**runtime_devices(), **_jsonable((extra or {}).get("devices", {}))}
    write_json(manifest_path(root, stage), manifest)
    return manifest


def run_stage(
    root: str | os.PathLike,
    stage: str,
    config: Any,
    inputs: dict,
    work: Callable[[], dict],
    force: bool = False,
) -> tuple[dict, bool]:
    """Run ``work`` unless the stage is done for this config + inputs.

    ``work`` writes its outputs (atomically) and returns ``{"outputs": [relpaths], ...extra}``.
    Returns (manifest, ran) where ``ran`` is False when the stage was skipped.
    """
    fp = fingerprint(stage, config, inputs)
    if not force and stage_is_done(root, stage, fp):
        log.info("stage %s: up to date, skipped", stage)
        return read_manifest(root, stage), False  # type: ignore[return-value]
    start = time.perf_counter()
    result = dict(work())
    outputs = result.pop("outputs")
    timings = {"seconds": round(time.perf_counter() - start, 3)}
    return write_manifest(root, stage, fp, config, outputs, inputs, timings, result), True


def chunked(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def map_chunks(
    fn: Callable[[Any], Any],
    items: Sequence,
    chunk_size: int,
    workers: int = 1,
    description: str = "working",
    part_path: Callable[[int], Path] | None = None,
    write_part: Callable[[Path, Any], None] | None = None,
    read_part: Callable[[Path], Any] | None = None,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    executor: str | Any = "local",
    collect: bool = True,
) -> list[Any]:
    """Map a pure, picklable ``fn`` over chunks of ``items`` on a local process pool (or Ray).

    With ``part_path``/``write_part``/``read_part`` each chunk's result is written atomically to
    its own part file as soon as it is done, and chunks whose part file exists are read back
    instead of recomputed, so a killed run resumes where it stopped and ends with the same bytes.
    Results come back in chunk order whatever the worker count.

    With ``collect=False`` (part files required) nothing is kept in memory: the results list holds
    None and the caller streams the part files back one at a time, so outputs larger than memory work.

    ``executor`` names where chunks run (a key of :data:`refface.executors.EXECUTORS`: ``local``
    process pool, ``ray`` for Ray Data) or is an executor instance; the outputs do not depend on it.
    """
    runner = make_executor(executor)

    if not collect and (part_path is None or write_part is None):
        raise ValueError("map_chunks(collect=False) needs part_path and write_part to keep the results")
    chunks = chunked(items, chunk_size)
    results: list[Any] = [None] * len(chunks)
    todo = []
    for i in range(len(chunks)):
        if part_path is not None and part_path(i).exists():
            results[i] = read_part(part_path(i)) if read_part and collect else None
        else:
            todo.append(i)

    def finish(i: int, value: Any) -> None:
        if part_path is not None and write_part is not None:
            write_part(part_path(i), value)
        if collect:
            results[i] = value

    with make_progress() as progress:
        task = progress.add_task(description, total=len(items))
        pending = set(todo)
        progress.advance(task, sum(len(chunks[i]) for i in range(len(chunks)) if i not in pending))
        jobs = [(i, chunks[i]) for i in todo]
        for i, value in runner.run(fn, jobs, workers=workers, initializer=initializer, initargs=initargs):
            finish(i, value)
            progress.advance(task, len(chunks[i]))
    return results
