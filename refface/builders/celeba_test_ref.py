"""CelebA-Test-Ref builder: targets from one set, references searched in a separate pool."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.builders.aligned import gt_folder_stage
from refface.builders.ffhq_ref import identity_threshold_of, run_mining
from refface.builders.provenance import remove_stale_temps, stage_timings, write_build_json
from refface.builders.validate import label_agreement
from refface.manifests.atomic import sha256_file, write_parquet, write_text
from refface.manifests.errors import ErrorsTable
from refface.manifests.io import list_images
from refface.manifests.layout import EMBEDDINGS_NPY, IMAGES, references_filename, split_filename
from refface.manifests.references import read_references, write_references
from refface.manifests.root import DatasetRoot
from refface.manifests.splits import write_split_list
from refface.mining.references import ReferenceConfig, distance_matrix, reference_order
from refface.mining.tta import DEFAULT_TTA
from refface.review.corrections import pool_exclusions, read_corrections
from refface.review.stage import card_lines
from refface.stages import run_stage

TARGETS_DIR = "mined/targets"
POOL_DIR = "mined/pool"
# Distances are computed for this many targets at a time (limits memory to block x pool floats).
BLOCK = 256


@dataclass(frozen=True)
class CelebATestRefConfig:
    """Rules of a CelebA-Test-Ref build (CLI flags map onto the fields).

    Attributes:
        detector / embedder / model_path / tta / model_root / dlib_detector / face_policy / crop_size /
            max_pixels / workers / chunk_size: mining settings, as for ``ffhq-ref``.
        identity_threshold: a pool image is the target's person when closer than this (cosine distance);
            None = the embedder's own.
        min_refs / max_refs / near_duplicate_distance: reference rules (ReF-LDM: 2-9, 0.1 at ArcFace 0.4).
        ref_order: ``farthest`` (paper), ``nearest`` or ``random``; see ReferenceConfig.
        lq: folder of existing LQ images; ``lq_image`` points at the file with the target's stem.
        labels: optional ``path, identity`` CSV (paths relative to the pool) for reporting precision.
        corrections: optional reviewed ``corrections.csv``: ``drop`` removes a target (and the image from
            the pool), ``singleton`` keeps a pool image from ever being a reference.
        plots: kept for card compatibility (CelebA-Test-Ref has no splits to plot).
    """

    detector: str = "dlib"
    embedder: str = "dlib"
    model_path: str | None = None
    tta: str = DEFAULT_TTA
    model_root: str | None = None
    dlib_detector: str = "hog"
    face_policy: str = "largest_central"
    crop_size: int = 512
    max_pixels: int = 64_000_000
    workers: int = 2
    chunk_size: int = 32
    identity_threshold: float | None = None
    min_refs: int = 2
    max_refs: int = 9
    near_duplicate_distance: float | None = None
    ref_order: str = "farthest"
    lq: str | None = None
    labels: str | None = None
    corrections: str | None = None
    plots: bool = False

    def __post_init__(self) -> None:
        self.reference_config()

    def reference_config(self) -> ReferenceConfig:
        return ReferenceConfig(
            min_refs=self.min_refs,
            max_refs=self.max_refs,
            near_duplicate_distance=self.near_duplicate_distance,
            ref_order=self.ref_order,
        )


def _sha_by_path(root: Path) -> dict[str, str]:
    table = pd.read_parquet(root / IMAGES)
    return dict(zip(table["path"].astype(str), table["sha256"].astype(str), strict=True))


def lq_lookup(lq_root: Path | None) -> dict[str, str]:
    """LQ files by stem (relative paths), so ``00001.png`` finds ``00001.jpg`` or ``sub/00001.png``."""
    if lq_root is None:
        return {}

    out: dict[str, str] = {}
    for rel in list_images(lq_root):
        out.setdefault(Path(rel).stem, rel)
    return out


def consistent_candidates(target: np.ndarray, cand: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of candidates that agree with the group, not only with the target.

    Without clusters a single false match within the threshold would be picked first by farthest-point
    sampling, so candidates are pruned like average linkage: while the candidate with the largest mean
    distance to the rest of {target} + candidates is above the threshold, it is dropped.
    """
    group = np.vstack([target[None, :], cand])
    dist = distance_matrix(group, group, "cosine")
    alive = np.ones(len(group), dtype=bool)
    while alive.sum() > 2:
        idx = np.flatnonzero(alive)
        sub = dist[np.ix_(idx, idx)]
        mean = sub.sum(1) / (len(idx) - 1)
        mean[0] = -np.inf  # the target always stays
        worst = int(np.argmax(mean))
        if mean[worst] <= threshold:
            break
        alive[idx[worst]] = False
    return np.flatnonzero(alive[1:])


def select_pool_references(
    t_vectors: np.ndarray,
    t_sha: list[str],
    p_vectors: np.ndarray,
    p_sha: list[str],
    threshold: float,
    config: ReferenceConfig,
) -> list[list[int]]:
    """Pool rows referencing each target: same person (< threshold, and consistent with the other candidates),
    not the target's own bytes, not a near-duplicate; at least ``min_refs`` or none; at most ``max_refs`` in
    farthest-point order."""
    near = config.near_duplicate(threshold)
    p_sha_arr = np.asarray(p_sha)
    out: list[list[int]] = []
    for start in range(0, len(t_vectors), BLOCK):
        block = t_vectors[start : start + BLOCK].astype(np.float64)
        dist = 1.0 - block @ p_vectors.astype(np.float64).T
        for j in range(len(block)):
            d = dist[j]
            keep = (d < threshold) & (d >= near) & (p_sha_arr != t_sha[start + j])
            cand = np.flatnonzero(keep)
            cand = cand[consistent_candidates(block[j], p_vectors[cand], threshold)] if len(cand) else cand
            if len(cand) < config.min_refs:
                out.append([])
                continue
            order = reference_order(block[j], p_vectors[cand], "cosine", config, key=start + j)
            out.append([int(cand[i]) for i in order[: config.max_refs]])
    return out


def build_celeba_test_ref(
    targets_dir: str | os.PathLike,
    pool_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    config: CelebATestRefConfig | None = None,
) -> dict:
    """Build ``test_references.csv`` for targets in ``targets_dir`` with references from ``pool_dir``.

    Returns:
        Summary counts (targets, targets with references, mean references, errors, root).
    """
    config = config or CelebATestRefConfig()
    targets_dir, pool_dir, root = Path(targets_dir), Path(pool_dir), Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    lq_root = Path(config.lq) if config.lq else None
    t_paths = list_images(targets_dir)
    if not t_paths:
        raise ValueError(f"no images found under {targets_dir}")
    timings = {
        "mine_targets": run_mining(targets_dir, root / TARGETS_DIR, config)["seconds"],
        "mine_pool": run_mining(pool_dir, root / POOL_DIR, config)["seconds"],
    }

    def work() -> dict:
        emb_t, tp, tv = DatasetRoot(root / TARGETS_DIR).embeddings_by_path()
        emb_p, pp, pv = DatasetRoot(root / POOL_DIR).embeddings_by_path()
        if emb_t.fingerprint != emb_p.fingerprint:
            raise ValueError("targets and pool were embedded by different models; rebuild one of them")
        threshold = identity_threshold_of(emb_t, config)
        t_sha, p_sha = _sha_by_path(root / TARGETS_DIR), _sha_by_path(root / POOL_DIR)
        correction_report = None
        if config.corrections:
            drop_t, drop_p, correction_report = pool_exclusions(read_corrections(config.corrections), tp, pp)
            keep_t = [i for i, p in enumerate(tp) if p not in drop_t]
            keep_p = [i for i, p in enumerate(pp) if p not in drop_p]
            tp, tv = [tp[i] for i in keep_t], tv[keep_t]
            pp, pv = [pp[i] for i in keep_p], pv[keep_p]
        refs = select_pool_references(
            tv,
            [t_sha.get(p, "") for p in tp],
            pv,
            [p_sha.get(p, "") for p in pp],
            threshold,
            config.reference_config(),
        )
        lqs = lq_lookup(lq_root)
        rows: list[dict[str, Any]] = []
        errors = ErrorsTable()
        for path, ref_rows in zip(tp, refs, strict=True):
            if not ref_rows:
                continue
            lq = lqs.get(Path(path).stem) if lq_root else path
            if lq is None:
                errors.add(path, "celeba_test_ref", f"no LQ file with stem {Path(path).stem!r} in {lq_root}")
                continue
            rows.append({"gt_image": path, "lq_image": lq, "ref_image": [pp[r] for r in ref_rows]})
        dropped = set(correction_report.dropped) if correction_report else set()
        for path in sorted(set(t_paths) - set(tp) - dropped):
            errors.add(path, "celeba_test_ref", "target has no embedding (see mined/targets/errors.csv)")
        write_references(root / references_filename("test"), rows, with_lq=True)
        write_split_list(root / split_filename("test"), [r["gt_image"] for r in rows])
        # Which pool image each reference came from, with its distance, for auditing.
        audit = [
            {"gt_image": r["gt_image"], "ref_image": ref, "rank": k}
            for r in rows
            for k, ref in enumerate(r["ref_image"])
        ]
        write_parquet(
            root / "reference_pairs.parquet", pd.DataFrame(audit, columns=["gt_image", "ref_image", "rank"])
        )
        errors.write(root)
        return {
            "outputs": [
                references_filename("test"),
                split_filename("test"),
                "reference_pairs.parquet",
                "errors.parquet",
            ],
            "targets": len(tp),
            "targets_with_refs": len(rows),
            "corrections": correction_report.to_dict() if correction_report else None,
        }

    inputs = {
        "targets": sha256_file(root / TARGETS_DIR / EMBEDDINGS_NPY),
        "pool": sha256_file(root / POOL_DIR / EMBEDDINGS_NPY),
        "lq_files": sorted(lq_lookup(lq_root).items()) if lq_root else None,
        "corrections": sha256_file(config.corrections) if config.corrections else None,
    }
    cfg = {
        **asdict(config.reference_config()),
        "identity_threshold": config.identity_threshold,
        "lq": config.lq,
    }
    start = time.perf_counter()
    manifest, _ = run_stage(root, "celeba_test_ref", cfg, inputs, work)
    timings["references"] = round(time.perf_counter() - start, 3)

    df = read_references(root / references_filename("test"))
    summary: dict[str, Any] = {
        "root": str(root),
        "targets": len(t_paths),
        "targets_with_refs": len(df),
        "mean_refs": round(float(df["ref_image"].map(len).mean()), 3) if len(df) else 0.0,
        "errors": len(ErrorsTable.read(root)),
    }
    corrections = manifest.get("corrections")
    corrections_file = config.corrections
    if corrections and corrections_file:
        corrections = {"file": str(Path(corrections_file).resolve()), **corrections}
        corrections["sha256"] = sha256_file(corrections_file)
    write_card_celeba(root, config, summary, corrections)

    gt_folder_stage(root, targets_dir)
    extra = {
        "ref_root": str(pool_dir.resolve()),
        "lq_root": str(lq_root.resolve()) if lq_root else None,
        "pool_timings": stage_timings(root / POOL_DIR),
    }
    if corrections:
        extra["corrections"] = corrections
    write_build_json(
        root,
        "celeba-test-ref",
        config,
        targets_dir,
        t_paths,
        timings,
        extra,
        embeddings_root=root / TARGETS_DIR,
    )
    return summary


def write_card_celeba(
    root: Path, config: CelebATestRefConfig, summary: dict, corrections: dict | None = None
) -> None:
    """A short card: counts, reference-count distribution and the rules used."""
    df = read_references(root / references_filename("test"))
    hist = df["ref_image"].map(len).value_counts().sort_index()
    lines = ["# CelebA-Test-Ref-style test set", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if k != "root"]
    lines += ["", "## References per target", "", "| references | targets |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hist.items()]
    if config.labels:
        agree = label_agreement({"test": df}, pd.read_csv(config.labels, dtype=str, keep_default_na=False))
        lines += ["", "## Agreement with known labels", "", "| what | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in agree.items()
        ]
    if corrections:
        lines += ["", *card_lines(corrections)]
    rules = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("workers", "chunk_size", "labels", "plots", "corrections")
    }
    lines += ["", "## Rules", "", "| field | value |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in rules.items()
    ]
    write_text(root / "card.md", "\n".join(lines) + "\n")
