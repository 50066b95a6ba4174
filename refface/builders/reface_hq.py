"""Reface-HQ-style builder: identity folders of web photos -> verified, aligned ``<identity>/<n>.png`` crops."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from refface.builders.aligned import gt_folder_stage
from refface.builders.ffhq_ref import (
    FFHQRefConfig,
    card_stage,
    corrected_paths,
    identity_threshold_of,
    labels_on_crops,
    references_stage,
    run_mining,
    splits_stage,
)
from refface.builders.provenance import build_summary, remove_stale_temps, stage_timings, write_build_json
from refface.evaluation.metrics import load_niqe_params, niqe
from refface.manifests.atomic import file_digest, sha256_file, write_parquet, write_text
from refface.manifests.embeddings import Embeddings, embeddings_digest, save_embeddings
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import list_images, read_image, write_png
from refface.manifests.layout import FACES, IDENTITIES, IMAGES
from refface.manifests.root import DatasetRoot
from refface.mining.align import ffhq_crop
from refface.mining.quality import sharpness
from refface.mining.references import distance_matrix
from refface.stages import map_chunks, run_stage

MINED_DIR = "mined"
IMAGES_DIR = "images"
STAGING_DIR = ".staging"
STAGE = "reface_curate"
QUALITY_FILE = "quality.parquet"
# Below this sharpness the face region is visibly soft: on the shared photos, faces of >= 256 px boxes
# cropped at 512 measure 130-6900 (median ~2100), the same crops blurred with a 3 px Gaussian 20-130, and
# LFW's 100 px faces upscaled to 512 measure 57-232 (docs/builders.md).
DEFAULT_MIN_SHARPNESS = 150.0
# Errors-table stage of each rejection kind (card.md counts rows per stage).
REJECT_SIZE = "hq/face_size"
REJECT_SCORE = "hq/detector_score"
REJECT_SHARPNESS = "hq/sharpness"
REJECT_NIQE = "hq/niqe"
REJECT_CROP = "hq/crop"


@dataclass(frozen=True)
class RefaceHQConfig(FFHQRefConfig):
    """FFHQ-Ref's rules plus the curation and quality rules of identity folders.

    Attributes:
        detector: ``dlib`` by default (web photos need detection).
        min_face_size: faces whose box is smaller (sqrt(w*h), source pixels) are rejected as too small;
            None (default) = ``crop_size / 2``, so no crop is upscaled much more than 2x.
        min_det_score: faces with a lower detector score are dropped; None = no score bar.
        min_sharpness: aligned crops whose face region is less sharp (:func:`refface.mining.quality.sharpness`,
            variance of the Laplacian at 256 px) are rejected as blurred; None = no blur filter.
        niqe_params: NIQE pristine model (BasicSR ``niqe_pris_params.npz`` or pyiqa ``.mat``) for the
            no-reference quality filter; None = that filter is off.
        max_niqe: aligned crops with a higher NIQE (worse) are rejected; needs ``niqe_params``.
        outlier_ratio: in folders of 3+ faces, a photo whose median distance to the folder's other faces
            exceeds ``outlier_ratio * threshold`` is dropped (wrong person, or the wrong face of a group photo).
        merge_ratio: two folders whose mean cross distance is below ``merge_ratio * threshold`` are one
            person and become one identity.
    """

    detector: str = "dlib"
    min_face_size: float | None = None
    min_det_score: float | None = None
    min_sharpness: float | None = DEFAULT_MIN_SHARPNESS
    niqe_params: str | None = None
    max_niqe: float | None = None
    outlier_ratio: float = 1.0
    merge_ratio: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.min_face_size is not None and self.min_face_size < 0) or self.outlier_ratio <= 0:
            raise ValueError("min_face_size must be >= 0; outlier_ratio and merge_ratio must be > 0")
        if self.merge_ratio <= 0:
            raise ValueError("min_face_size must be >= 0; outlier_ratio and merge_ratio must be > 0")
        if self.max_niqe is not None and self.niqe_params is None:
            raise ValueError("max_niqe needs niqe_params: a NIQE pristine model file (niqe_pris_params.npz)")

    @property
    def face_size_bar(self) -> float:
        """The minimum face box side in source pixels (``min_face_size``, default ``crop_size / 2``)."""
        return float(self.min_face_size) if self.min_face_size is not None else self.crop_size / 2


def folder_of(path: str) -> str:
    """The identity folder of a photo: its parent directory relative to the input root."""
    parent = Path(path).parent.as_posix()
    return parent if parent != "." else "_root"


def identity_name(folder: str) -> str:
    """A folder path as one directory name (``lfw/Ann_B`` -> ``lfw-Ann_B``)."""
    return folder.replace("/", "-")


def _union_find(n: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def screen(faces: pd.DataFrame, config: RefaceHQConfig) -> dict[int, tuple[str, str]]:
    """Rows whose face box is too small or whose detector score is too low: ``{row: (stage, reason)}``."""
    out: dict[int, tuple[str, str]] = {}
    size = np.sqrt(
        np.maximum(faces["x1"] - faces["x0"], 0) * np.maximum(faces["y1"] - faces["y0"], 0)
    ).to_numpy()
    bar = config.face_size_bar
    for i in range(len(faces)):
        if size[i] < bar:
            out[i] = (
                REJECT_SIZE,
                f"face too small: box {size[i]:.0f} px < {bar:g} px (a {config.crop_size} crop would be "
                f"upscaled {config.crop_size / max(size[i], 1.0):.1f}x)",
            )
        elif config.min_det_score is not None and faces["det_score"].iloc[i] < config.min_det_score:
            score = faces["det_score"].iloc[i]
            out[i] = (REJECT_SCORE, f"low detector score ({score:.3f} < {config.min_det_score:g})")
    return out


def curate(
    faces: pd.DataFrame,
    vectors: np.ndarray,
    sha: Sequence[str],
    threshold: float,
    config: RefaceHQConfig,
    rejected: dict[int, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decide which photos are kept and under which identity.

    Args:
        faces: one row per embedded photo (``path``, box, ``det_score``), row-aligned with ``vectors``,
            sorted by path.
        vectors: (N, D) unit embeddings.
        sha: content hash per row.
        threshold: same-identity cosine distance.
        config: curation rules.
        rejected: rows already rejected (quality filters) with their reasons; they take no further part.

    Returns:
        (kept: ``path, folder, identity_name`` sorted by identity then path, dropped: ``path, reason``).
    """
    paths = faces["path"].tolist()
    dropped: dict[int, str] = {i: reason for i, (_, reason) in screen(faces, config).items()}
    dropped.update(rejected or {})
    first_of: dict[str, int] = {}
    for i in range(len(paths)):
        if i in dropped:
            continue
        if sha[i] in first_of:
            dropped[i] = f"exact duplicate of {paths[first_of[sha[i]]]}"
        else:
            first_of[sha[i]] = i
    folders = [folder_of(p) for p in paths]
    members: dict[str, list[int]] = {}
    for i, f in enumerate(folders):
        if i not in dropped:
            members.setdefault(f, []).append(i)
    bar = config.outlier_ratio * threshold
    for rows in members.values():
        if len(rows) < 3:
            continue
        dist = distance_matrix(vectors[rows], vectors[rows], "cosine")
        np.fill_diagonal(dist, np.nan)
        median = np.nanmedian(dist, axis=1)
        for r, m in zip(rows, median, strict=True):
            if m > bar:
                dropped[r] = (
                    f"far from its folder's other faces (median distance {m:.3f} > {bar:.3f}): "
                    "wrong person or the wrong face of a group photo"
                )
    names = sorted(members)
    kept_rows = {f: [r for r in members[f] if r not in dropped] for f in names}
    names = [f for f in names if kept_rows[f]]
    # Average linkage between folders: merge when the mean cross distance is under the bar.
    pairs = []
    centroids = []
    for f in names:
        c = vectors[kept_rows[f]].mean(0)
        centroids.append(c)
    merge_bar = config.merge_ratio * threshold
    if len(names) > 1:
        cent = np.asarray(centroids, dtype=np.float64)
        # Mean of pairwise dot products = dot of the mean vectors, so mean cross distance = 1 - <ca, cb>.
        mean_cross = 1.0 - cent @ cent.T
        ia, ib = np.nonzero(np.triu(mean_cross < merge_bar, k=1))
        pairs = list(zip(ia.tolist(), ib.tolist(), strict=True))
    root_of = _union_find(len(names), pairs)
    group_name = {i: identity_name(names[root_of[i]]) for i in range(len(names))}
    records = []
    for gi, f in enumerate(names):
        for r in kept_rows[f]:
            records.append({"row": r, "path": paths[r], "folder": f, "identity_name": group_name[gi]})
    kept = pd.DataFrame(records, columns=["row", "path", "folder", "identity_name"])
    kept = kept.sort_values(["identity_name", "path"], kind="stable").reset_index(drop=True)
    # Near-duplicates inside an identity: keep the first photo (path order), drop those too close to it.
    near = config.reference_config().near_duplicate(threshold)
    drop_near = set()
    for _, group in kept.groupby("identity_name", sort=True):
        rows = group["row"].tolist()
        dist = distance_matrix(vectors[rows], vectors[rows], "cosine")
        keep_idx: list[int] = []
        for j, r in enumerate(rows):
            close = [k for k in keep_idx if dist[j, k] < near]
            if close:
                drop_near.add(r)
                dropped[r] = f"near-duplicate of {paths[rows[close[0]]]} (distance {dist[j, close[0]]:.3f})"
            else:
                keep_idx.append(j)
    kept = kept[~kept["row"].isin(drop_near)].reset_index(drop=True)
    drop_df = pd.DataFrame(
        [{"path": paths[i], "reason": reason} for i, reason in sorted(dropped.items())],
        columns=["path", "reason"],
    )
    return kept, drop_df


def _crop_chunk(items: list[tuple[int, str, list[float], str, int, str | None]]) -> list[tuple]:
    """Align, measure and stage crops: (row, source file, 10 landmark floats, staged file, size, NIQE
    model or None) -> (row, error or None, sharpness, NIQE)."""
    out: list[tuple[int, str | None, float, float]] = []
    for row, src, lm, dst, size, niqe_params in items:
        try:
            crop = ffhq_crop(read_image(src), np.asarray(lm, dtype=np.float64).reshape(5, 2), size)
            niqe = _niqe(crop, niqe_params) if niqe_params else float("nan")
            write_png(dst, crop)
            out.append((row, None, sharpness(crop), niqe))
        except (ImageError, ValueError) as e:
            out.append((row, str(e), float("nan"), float("nan")))
    return out


def _niqe(crop: np.ndarray, params_path: str) -> float:
    return niqe(crop, _niqe_model(params_path))


@functools.lru_cache(maxsize=2)
def _niqe_model(path: str) -> dict:
    return load_niqe_params(path)


def quality_rejections(quality: pd.DataFrame, config: RefaceHQConfig) -> dict[int, tuple[str, str]]:
    """``{row: (stage, reason)}`` of staged crops that failed, are blurred, or score a bad NIQE."""
    out: dict[int, tuple[str, str]] = {}
    for r in quality.itertuples(index=False):
        if r.error:
            out[r.row] = (REJECT_CROP, f"crop failed: {r.error}")
        elif config.min_sharpness is not None and r.sharpness < config.min_sharpness:
            out[r.row] = (
                REJECT_SHARPNESS,
                f"blurred: face sharpness {r.sharpness:.0f} < {config.min_sharpness:g} (Laplacian variance)",
            )
        elif config.max_niqe is not None and not r.niqe <= config.max_niqe:
            out[r.row] = (REJECT_NIQE, f"low quality: NIQE {r.niqe:.2f} > {config.max_niqe:g}")
    return out


def curate_stage(folders: Path, root: Path, config: RefaceHQConfig) -> tuple[dict, bool]:
    """Curate the mined photos into ``images/<identity>/<n>.png`` plus the tables the later stages read."""
    mined = root / MINED_DIR

    def work() -> dict:
        emb, paths, vectors = DatasetRoot(mined).embeddings_by_path()
        faces = pd.read_parquet(mined / FACES).drop_duplicates("path").set_index("path")
        faces = faces.loc[paths].reset_index()
        images = pd.read_parquet(mined / IMAGES).set_index("path")
        sha = [str(images.loc[p, "sha256"]) for p in paths]
        threshold = identity_threshold_of(emb, config)
        out_dir = root / IMAGES_DIR
        # Stale crops from an earlier configuration must not linger beside the new ones.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging = out_dir / STAGING_DIR
        # Quality: every face that passes the cheap box rules is aligned once, measured and staged.
        screened = screen(faces, config)
        items = [
            (i, str(folders / p), [float(v) for v in faces["lm"].iloc[i]], str(staging / f"{i}.png"))
            for i, p in enumerate(paths)
            if i not in screened
        ]
        jobs = [(*it, config.crop_size, config.niqe_params) for it in items]
        measured = [r for part in map_chunks(_crop_chunk, jobs, 16, config.workers, "aligning") for r in part]
        quality = pd.DataFrame(measured, columns=["row", "error", "sharpness", "niqe"])
        rejections = {**screened, **quality_rejections(quality, config)}
        kept, dropped = curate(
            faces, vectors, sha, threshold, config, {i: reason for i, (_, reason) in rejections.items()}
        )
        mining_errors = ErrorsTable.read(mined)
        errors = ErrorsTable(mining_errors.rows)
        for i, (stage, reason) in sorted(rejections.items()):
            errors.add(paths[i], stage, reason)
        mined_frame = mining_errors.to_frame()[["path", "reason"]]
        dropped = pd.concat([dropped, mined_frame], ignore_index=True).sort_values("path", kind="stable")
        kept["n"] = kept.groupby("identity_name").cumcount()
        kept["out"] = [f"{name}/{n}.png" for name, n in zip(kept["identity_name"], kept["n"], strict=True)]
        for r, o in zip(kept["row"], kept["out"], strict=True):
            (out_dir / o).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f"{r}.png", out_dir / o)
        shutil.rmtree(staging, ignore_errors=True)
        quality.insert(1, "path", [paths[i] for i in quality["row"]])
        quality["error"] = quality["error"].fillna("")
        write_parquet(root / QUALITY_FILE, quality.drop(columns="row"))
        row_of = {p: i for i, p in enumerate(paths)}
        ident_codes = {name: i for i, name in enumerate(sorted(kept["identity_name"].unique()))}
        kept = kept.sort_values("out", kind="stable").reset_index(drop=True)
        counts = kept["identity_name"].value_counts()
        identity = kept["identity_name"].map(ident_codes).astype("int64")
        size = kept["identity_name"].map(counts).astype("int64")
        # A folder left with one photo is a singleton: it can have no references.
        identity = identity.where(size >= 2, -1)
        write_parquet(
            root / IDENTITIES,
            pd.DataFrame({"path": kept["out"], "identity": identity, "cluster_size": size}),
        )
        write_parquet(
            root / "sources.parquet",
            kept[["out", "path", "folder", "identity_name"]].rename(
                columns={"out": "path", "path": "source"}
            ),
        )
        write_parquet(
            root / IMAGES,
            pd.DataFrame(
                {
                    "path": kept["out"],
                    "sha256": [sha256_file(out_dir / o) for o in kept["out"]],
                    "width": config.crop_size,
                    "height": config.crop_size,
                }
            ),
        )
        save_embeddings(
            root,
            Embeddings(
                vectors=vectors[[row_of[p] for p in kept["path"]]],
                paths=kept["out"].tolist(),
                model=emb.model,
                fingerprint=emb.fingerprint,
                metric=emb.metric,
                identity_threshold=emb.identity_threshold,
                tta=emb.tta,
            ),
        )
        dropped = dropped.sort_values("path", kind="stable").reset_index(drop=True)
        write_parquet(root / "dropped.parquet", dropped)
        write_text(root / "dropped.csv", dropped.to_csv(index=False, lineterminator="\n"))
        errors.write(root)
        merged = kept.groupby("identity_name")["folder"].nunique()
        return {
            "outputs": [
                "identities.parquet",
                "sources.parquet",
                "images.parquet",
                "embeddings.npy",
                "embeddings.parquet",
                "embeddings.json",
                "dropped.csv",
                "dropped.parquet",
                "errors.parquet",
                QUALITY_FILE,
            ],
            "kept": int(len(kept)),
            "dropped": int(len(dropped)),
            "rejected_quality": {k: v for k, v in errors.counts_by_stage().items() if k.startswith("hq/")},
            "merged_identities": int((merged > 1).sum()),
        }

    inputs = {
        "embeddings": embeddings_digest(mined),
        "faces": file_digest(mined, "faces.parquet"),
    }
    cfg = {
        k: getattr(config, k)
        for k in (
            "crop_size",
            "face_size_bar",
            "min_det_score",
            "min_sharpness",
            "max_niqe",
            "outlier_ratio",
            "merge_ratio",
            "identity_threshold",
        )
    }
    cfg["near_duplicate_distance"] = config.near_duplicate_distance
    cfg["niqe_params"] = file_digest_or_none(Path(config.niqe_params)) if config.niqe_params else None
    return run_stage(root, STAGE, cfg, inputs, work)


def build_reface_hq(
    folders_dir: str | os.PathLike, out_root: str | os.PathLike, config: RefaceHQConfig | None = None
) -> dict:
    """Build a Reface-HQ-style dataset from identity folders (``<identity>/*.jpg``).

    Returns:
        Summary counts (kept images, identities, merged folders, dropped photos, per-split targets).
    """
    config = config or RefaceHQConfig()
    folders, root = Path(folders_dir), Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    if not list_images(folders):
        raise ValueError(f"no images found under {folders}")
    # The output crop size is this builder's own; mining embeds from its default alignment.
    timings = {"mine": run_mining(folders, root / MINED_DIR, config, exclude=("crop_size",))["seconds"]}
    manifest, _ = curate_stage(folders, root, config)
    kept = pd.read_parquet(root / IDENTITIES)["path"].tolist()
    kept, corrections = corrected_paths(root, config, STAGE, kept)
    splits_stage(root, config, kept)
    references_stage(root, config)
    gt_folder_stage(root, root / IMAGES_DIR)
    card_config = labels_on_crops(root, config)
    card_stage(
        root, card_config, "Reface-HQ-style dataset", {"dropped": file_digest_or_none(root / "dropped.csv")}
    )
    write_build_json(
        root,
        "reface-hq",
        config,
        root / IMAGES_DIR,
        kept,
        timings,
        {
            "source_root": str(folders.resolve()),
            "mining_timings": stage_timings(root / MINED_DIR),
            "curation": {k: manifest.get(k) for k in ("kept", "dropped", "merged_identities")},
            **corrections,
        },
    )
    summary = build_summary(root)
    summary.update(
        kept=manifest.get("kept"),
        dropped=manifest.get("dropped"),
        merged_identities=manifest.get("merged_identities"),
    )
    return summary


def file_digest_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.exists() else None
