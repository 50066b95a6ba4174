"""What a build records about itself and reports: ``build.json`` (config, package versions, model and
input fingerprints, per-stage timings, devices, error counts), the summary counts, and the cleanup of
temp files a killed run left."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from refface.manifests.atomic import write_json
from refface.manifests.errors import ErrorsTable
from refface.manifests.layout import (
    BUILD,
    EMBEDDINGS_META,
    SPLITS,
    SPLITS_TABLE,
    references_filename,
)
from refface.manifests.references import read_references
from refface.stages import folder_fingerprint

VERSION_PACKAGES = ("refface", "numpy", "pandas", "pyarrow", "scipy", "faiss-cpu", "dlib-bin", "onnxruntime")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def stage_timings(root: Path) -> dict[str, float]:
    out = {}
    stages = root / ".stages"
    if stages.is_dir():
        for path in sorted(stages.glob("*.json")):
            manifest = json.loads(path.read_text())
            out[manifest.get("stage", path.stem)] = manifest.get("timings", {}).get("seconds")
    return out


def stage_devices(root: Path) -> dict[str, dict]:
    """``{stage: devices}`` from the stage manifests of a root (stages that recorded them)."""
    out = {}
    stages = root / ".stages"
    if stages.is_dir():
        for path in sorted(stages.glob("*.json")):
            manifest = json.loads(path.read_text())
            if "devices" in manifest:
                out[manifest.get("stage", path.stem)] = manifest["devices"]
    return out


def error_counts(root: Path) -> dict[str, int]:
    return ErrorsTable.read(root).counts_by_stage()


def write_build_json(
    root: Path,
    kind: str,
    config: Any,
    image_root: Path,
    all_paths: list[str],
    timings: dict,
    extra: dict,
    embeddings_root: Path | None = None,
    source: tuple[Path, list[str]] | None = None,
) -> dict:
    """build.json: config, versions, model and input fingerprints, per-stage timings, error counts.

    ``source``: the input folder and files when the build runs on derived images (aligned crops); the
    input fingerprint is then theirs.
    """
    model = {}
    emb_json = (embeddings_root or root) / EMBEDDINGS_META
    if emb_json.exists():
        model = json.loads(emb_json.read_text())
    info = {
        "kind": kind,
        "image_root": str(Path(image_root).resolve()),
        "config": asdict(config),
        "versions": package_versions(),
        "model": {k: model.get(k) for k in ("model", "fingerprint", "metric", "identity_threshold", "dim")},
        "inputs": {
            "images": len(source[1] if source else all_paths),
            "fingerprint": folder_fingerprint(*(source or (image_root, all_paths))),
        },
        # Seconds each stage took when it last ran (from its manifest); skipped stages keep their old figure.
        "timings": {**stage_timings(embeddings_root or root), **stage_timings(root)},
        # Wall seconds of this invocation's calls (near zero for stages that were up to date).
        "this_run_seconds": timings,
        "errors": error_counts(root),
        # What each stage ran on (GPUs, onnxruntime providers, FAISS, torch), from its manifest.
        "devices": {**stage_devices(embeddings_root or root), **stage_devices(root)},
        **extra,
    }
    write_json(root / BUILD, info)
    return info


def remove_stale_temps(root: Path) -> int:
    """Delete temp files a killed run left behind (``.<name>.<random>.tmp`` from atomic writes)."""
    removed = 0
    for path in root.rglob(".*.tmp"):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def build_summary(root: Path) -> dict:
    """Counts a user (or ``refface demo``) wants after a build."""
    table = pd.read_parquet(root / SPLITS_TABLE)
    assigned = table
    out: dict[str, Any] = {
        "root": str(root),
        "images": int(len(table)),
        "embedded": int(table["embedded"].sum()),
        "identities": int(table.loc[table["identity"] >= 0, "identity"].nunique()),
        "singletons": int((table["identity"] < 0).sum()),
    }

    for split in SPLITS:
        out[f"{split}_images"] = int((assigned["split"] == split).sum())
        out[f"{split}_targets"] = int(len(read_references(root / references_filename(split))))
    out["errors"] = int(sum(error_counts(root).values()))
    refs_manifest = root / ".stages" / "references.json"
    if refs_manifest.exists():
        estimate = json.loads(refs_manifest.read_text()).get("reference_precision_estimate")
        if estimate:
            out["reference_precision_estimated"] = estimate["estimate"]
    return out
