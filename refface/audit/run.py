"""Leakage audit: exact, near-duplicate and same-identity pairs between image sets, and cross-split references."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface import __version__
from refface.audit.classify import audit_pair, resolve_thresholds, thresholds_dict
from refface.audit.config import (
    LEAKS_COLUMNS,
    SUMMARY_VERSION,
    AuditConfig,
    AuditResult,
    AuditSet,
    PairResult,
    Thresholds,
)
from refface.audit.references import reference_cross_splits, reference_cross_splits_empty
from refface.audit.report import write_report
from refface.audit.search import nearest_same_set
from refface.audit.sets import attach_hashes, check_models, resolve_set
from refface.console import track
from refface.manifests.atomic import write_json, write_text
from refface.manifests.errors import ErrorsTable

log = logging.getLogger(__name__)


def run_audit(sets: list[AuditSet], config: AuditConfig, cache_dir: Path | None = None) -> AuditResult:
    """Audit loaded sets: every pair of sets, plus reference lists of each dataset root involved.

    Returns:
        The :class:`AuditResult`.
    """

    model = check_models(sets)
    th = resolve_thresholds(model, config)
    if config.hash_images:
        for s in sets:
            attach_hashes(s, cache_dir, config.workers)
    same_nearest = {
        s.name: nearest_same_set(s.vectors, config.hist_sample, config.seed, config.index) for s in sets
    }
    pairs = [(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    results = [audit_pair(a, b, th, config) for a, b in track(pairs, "auditing pairs of sets")]
    roots = sorted({s.root for s in sets if s.root and s.kind != "folder"})
    ref_frames, ref_checked = [], {}
    for root in roots:
        frame, checked = reference_cross_splits(Path(root))
        ref_frames.append(frame)
        ref_checked[root] = checked
    references = pd.concat(ref_frames, ignore_index=True) if ref_frames else reference_cross_splits_empty()
    leaks = leaks_table(sets, results)
    summary = build_summary(sets, results, th, model, config, references, ref_checked)
    return AuditResult(summary, leaks, results, same_nearest, th, references)


def leaks_table(sets: list[AuditSet], results: list[PairResult]) -> pd.DataFrame:
    """All leaked pairs of all set pairs, in :data:`LEAKS_COLUMNS` order."""
    by_name = {s.name: s for s in sets}
    frames = []
    for r in results:
        a, b = by_name[r.a], by_name[r.b]
        df = r.leaks
        frames.append(
            pd.DataFrame(
                {
                    "set_a": r.a,
                    "set_b": r.b,
                    "kind": df["kind"],
                    "image_a": [a.keys[i] for i in df["ia"]],
                    "image_b": [b.keys[i] for i in df["ib"]],
                    "similarity": df["similarity"].round(6),
                    "distance": df["distance"].round(6),
                    "phash_distance": df["phash_distance"],
                    "mirrored": df["mirrored"],
                    "path_a": [a.paths[i] for i in df["ia"]],
                    "path_b": [b.paths[i] for i in df["ib"]],
                }
            )
        )
    if not frames:
        return pd.DataFrame(columns=LEAKS_COLUMNS)
    return pd.concat(frames, ignore_index=True)[LEAKS_COLUMNS]


def build_summary(
    sets: list[AuditSet],
    results: list[PairResult],
    th: Thresholds,
    model: dict,
    config: AuditConfig,
    references: pd.DataFrame,
    ref_checked: dict,
) -> dict:

    worst = max((r.stats["leak_rate"] for r in results), default=0.0)
    n_cross_refs = int(len(references))
    failed_pairs = [f"{r.a}~{r.b}" for r in results if r.stats["leak_rate"] > config.max_leak_rate]
    return {
        "version": SUMMARY_VERSION,
        "refface_version": __version__,
        "model": {
            "model": model.get("model"),
            "fingerprint": model.get("fingerprint"),
            "metric": th.metric,
            "identity_threshold": th.identity,
        },
        "exact_duplicates_by": "sha256 of decoded RGB pixels (file bytes for files that do not decode)",
        "near_duplicates_by": (
            "64-bit DCT perceptual hash of the image or of its mirror within phash_distance bits AND face "
            "embeddings closer than the near-duplicate bar (hash alone when an image has no face)"
        ),
        "thresholds": {**thresholds_dict(th), "max_leak_rate": config.max_leak_rate},
        "sets": {
            s.name: {
                "source": s.source,
                "kind": s.kind,
                "root": s.root,
                "images": s.n_images,
                "faces": int(len(s.vectors)),
                "images_with_face": int(len(np.unique(s.owner))),
                "errors": len(s.errors),
            }
            for s in sets
        },
        "pairs": {f"{r.a}~{r.b}": r.stats for r in results},
        "references": {"checked": ref_checked, "cross_split_references": n_cross_refs},
        "worst_leak_rate": worst,
        "passed": not failed_pairs and n_cross_refs == 0,
        "failed_pairs": failed_pairs,
        "config": asdict(config),
    }


def write_outputs(out_dir: Path, result: AuditResult, sets: list[AuditSet]) -> dict[str, str]:
    """Write summary.json, leaks.csv, errors.csv/parquet and report.html atomically into ``out_dir``."""

    out_dir.mkdir(parents=True, exist_ok=True)
    leaks = result.leaks
    refs = result.references
    if len(refs):
        extra = refs.drop(columns=["list"]).assign(similarity=np.nan, distance=np.nan, phash_distance=-1)
        extra = extra.assign(mirrored=False, path_a=None, path_b=None)[LEAKS_COLUMNS]
        leaks = pd.concat([leaks, extra], ignore_index=True)
    write_text(out_dir / "leaks.csv", leaks.to_csv(index=False, lineterminator="\n"))
    errors = ErrorsTable()
    for s in sets:
        for path, reason in s.errors:
            errors.add(f"{s.name}:{path}", "audit", reason)
    errors.write(out_dir)
    write_json(out_dir / "summary.json", result.summary)
    write_report(out_dir / "report.html", result, sets)
    return {
        "summary": str(out_dir / "summary.json"),
        "leaks": str(out_dir / "leaks.csv"),
        "report": str(out_dir / "report.html"),
    }


def audit_sets(sets: dict[str, Any], out_dir: str | os.PathLike, config: AuditConfig | None = None) -> dict:
    """Audit named sets for leakage and write summary.json, leaks.csv and report.html into ``out_dir``.

    Args:
        sets: ``{name: source}``; a source is a split list (``*_image.txt``), a reference CSV, a
            dataset root (its embeddings are reused), a plain folder (mined into
            ``<cache>/mined/<name>``) or an already loaded :class:`AuditSet`.
        out_dir: output folder.
        config: audit settings; defaults to :class:`AuditConfig`.

    Returns:
        The summary dict (also written as ``summary.json``); ``summary["passed"]`` is the gate.
    """
    config = config or AuditConfig()
    if len(sets) < 2:
        raise ValueError("an audit needs at least two sets")
    out = Path(out_dir)
    cache = Path(config.cache_dir) if config.cache_dir else out / "cache"
    loaded = []
    for name, source in sets.items():
        loaded.append(source if isinstance(source, AuditSet) else resolve_set(name, source, cache, config))
    start = time.perf_counter()
    result = run_audit(loaded, config, cache)
    result.summary["timings"] = {"audit_s": round(time.perf_counter() - start, 3)}
    write_outputs(out, result, loaded)
    return result.summary
