"""FFHQ-Ref builder: mine a folder of faces, cluster identities, pick references, split by identity."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.builders.aligned import ALIGNED_DIR, MINED_DIR, align_stage, eval_names, gt_folder_stage
from refface.builders.card import write_card
from refface.builders.provenance import build_summary, remove_stale_temps, stage_timings, write_build_json
from refface.manifests.atomic import file_digest, sha256_file, write_parquet, write_text
from refface.manifests.embeddings import embeddings_digest
from refface.manifests.io import list_images
from refface.manifests.layout import (
    ATTRIBUTES,
    IDENTITIES,
    IMAGES,
    SPLITS,
    SPLITS_TABLE,
    references_filename,
)
from refface.manifests.references import write_references
from refface.manifests.root import DatasetRoot
from refface.manifests.splits import write_split_lists
from refface.mining.cluster import ClusterConfig, cluster_root, default_threshold
from refface.mining.pipeline import MiningConfig, mine_folder
from refface.mining.references import ReferenceConfig, estimated_reference_precision, select_references
from refface.mining.splits import SplitConfig, assign_splits, split_summary
from refface.mining.tta import DEFAULT_TTA
from refface.review.stage import corrections_stage
from refface.stages import fingerprint, run_stage

log = logging.getLogger(__name__)

# Settings that change how fast a build runs, never what it writes: kept out of every fingerprint.
RUNTIME_FIELDS = ("workers", "chunk_size")


@dataclass(frozen=True)
class FFHQRefConfig:
    """Every rule of an FFHQ-Ref build; CLI flags map onto these fields one to one.

    Attributes:
        detector: ``prealigned`` for FFHQ-aligned inputs (FFHQ itself), ``dlib`` or ``scrfd`` for photos.
        embedder: ``dlib`` (offline default) or ``arcface`` (ReF-LDM's choice; needs ``model_path``).
        model_path: embedder weights (ArcFace ONNX, or a dlib .dat); None = default location.
        tta: the embedder's test-time augmentation, ``none`` or ``flip`` (see MiningConfig).
        model_root: folder with SCRFD's ``det_10g.onnx``.
        dlib_detector: ``hog`` or ``mmod`` when ``detector`` is ``dlib``.
        face_policy: which face the mining core keeps when a photo holds several.
        crop_size: aligned crop side used by the mining core.
        max_pixels: larger images become error rows (decompression-bomb limit).
        workers / chunk_size: mining parallelism (change speed only, never outputs).
        cluster_method: identity clustering from the mining core; None = the embedder's default
            (``impostor``: average linkage with each face's radius from the set's own impostor model),
            or any key of :data:`refface.mining.cluster.CLUSTERERS` (``average``, ``components``,
            ``refldm`` = ReF-LDM's rule, ...).
        identity_threshold: same-identity cosine distance; None = the clustering's default (for
            ``impostor``: per-face radii, no cap; fixed cuts: ArcFace 0.4, dlib 0.075 with
            ``average``, 0.088 with ``components``).
        max_false_merge: ``impostor``: the share of same-identity pairs the set's impostor model may
            expect to be strangers (None = the embedder's default).
        min_refs / max_refs / near_duplicate_distance / within_threshold / train_exclude_near_duplicates /
            ref_order:
            reference rules, see :class:`refface.mining.references.ReferenceConfig`.
        seed / val_fraction / test_fraction / val_identities / test_identities / min_eval_size /
            balance_column / singleton_split: split rules, see :class:`refface.mining.splits.SplitConfig`.
        attributes: table (parquet/CSV with ``path`` and ``balance_column``) used for balancing; default:
            ``attributes.parquet`` in the dataset root when present.
        labels: optional ``path, identity`` CSV of known labels: the card reports reference precision.
        corrections: optional reviewed ``corrections.csv`` (``refface review``) applied to the identities
            after clustering, before splits and references (see :mod:`refface.review.corrections`).
        plots: draw the card's PNG plots.
    """

    detector: str = "prealigned"
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
    cluster_method: str | None = None
    identity_threshold: float | None = None
    max_false_merge: float | None = None
    min_refs: int = 2
    max_refs: int = 9
    near_duplicate_distance: float | None = None
    within_threshold: bool = True
    train_exclude_near_duplicates: bool = False
    ref_order: str = "farthest"
    seed: int = 0
    val_fraction: float = SplitConfig.val_fraction
    test_fraction: float = SplitConfig.test_fraction
    val_identities: int | None = None
    test_identities: int | None = None
    min_eval_size: int = 3
    balance_column: str | None = None
    attributes: str | None = None
    singleton_split: str = "train"
    labels: str | None = None
    corrections: str | None = None
    plots: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.identity_threshold is not None and self.identity_threshold <= 0:
            raise ValueError("identity_threshold must be > 0 (or None for the embedder's own)")
        # Build the sub-configs now so bad values fail before any work starts.
        self.reference_config()
        self.split_config()

    def reference_config(self) -> ReferenceConfig:
        return ReferenceConfig(
            min_refs=self.min_refs,
            max_refs=self.max_refs,
            near_duplicate_distance=self.near_duplicate_distance,
            within_threshold=self.within_threshold,
            train_exclude_near_duplicates=self.train_exclude_near_duplicates,
            ref_order=self.ref_order,
        )

    def split_config(self) -> SplitConfig:
        return SplitConfig(
            seed=self.seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            val_identities=self.val_identities,
            test_identities=self.test_identities,
            min_eval_size=self.min_eval_size,
            balance_column=self.balance_column,
            singleton_split=self.singleton_split,
        )

    def fingerprint_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}


def mining_config(config: Any, exclude: tuple[str, ...] = ()):
    """The mining core's config from a builder config: every field the two share is passed on."""
    names = {f.name for f in fields(MiningConfig)} - set(exclude)
    values = {k: v for k, v in asdict(config).items() if k in names}
    return MiningConfig(**values)


# --------------------------------------------------------------------------------------------- stages


def run_mining(image_root: Path, root: Path, config: Any, exclude: tuple[str, ...] = ()) -> dict:
    """Mine ``image_root`` into ``root`` (the mining core skips its own unchanged stages)."""
    start = time.perf_counter()
    mine_folder(image_root, root, mining_config(config, exclude))
    return {"seconds": round(time.perf_counter() - start, 3)}


def clustering_table(root: Path) -> pd.DataFrame | None:
    """The clustering's own per-face table (before hand corrections, which keep only identities)."""
    for name in ("identities_clustered.parquet", IDENTITIES):
        if (root / name).exists():
            return pd.read_parquet(root / name)
    return None


def reference_radii(root: Path, emb, paths: list[str], config: Any):
    """The same-identity bar of each row for the reference rule: the configured threshold, else
    the per-face radii the clustering wrote into identities.parquet, else the scalar default."""
    table = clustering_table(root) if config.identity_threshold is None else None
    if table is not None:
        if "radius" in table.columns:
            fallback = identity_threshold_of(emb, config)
            radius_of = dict(zip(table["path"].astype(str), table["radius"].astype(float), strict=True))
            return np.array([radius_of.get(p, fallback) for p in paths], dtype=np.float64)
    return identity_threshold_of(emb, config)


def identity_threshold_of(emb, config: Any) -> float:
    """The same-identity bar as a cosine distance: the configured one, else the clustering's default.

    One number serves both the clusters and the reference rule, so a reference is never farther from
    its target than the bar that put them in one identity.
    """
    if config.identity_threshold is not None:
        return float(config.identity_threshold)
    return default_threshold(emb, config.cluster_method or "components")


def identities_stage(root: Path, config: Any) -> tuple[dict, bool]:
    """identities.parquet (path, identity, cluster_size) via the mining core's clustering stage."""
    return cluster_root(
        root,
        ClusterConfig(
            method=config.cluster_method,
            threshold=config.identity_threshold,
            max_false_merge=getattr(config, "max_false_merge", None),
        ),
    )


def corrected_paths(root: Path, config: Any, producer: str, all_paths: list[str]) -> tuple[list[str], dict]:
    """Apply ``config.corrections`` to identities.parquet (stage ``corrections``); the paths left after
    dropped images are removed, and what build.json records about the corrections."""
    report = corrections_stage(root, getattr(config, "corrections", None), producer)
    if report is None:
        return all_paths, {}
    dropped = set(report["dropped_paths"])
    return [p for p in all_paths if p not in dropped], {"corrections": report}


def covering_table(root: Path, all_paths: list[str]) -> pd.DataFrame:
    """Every input image with its identity: images without an embedding (no face, unreadable) are -1."""
    table = pd.read_parquet(root / IDENTITIES)[["path", "identity", "cluster_size"]]
    table = table.drop_duplicates("path")
    # Images dropped by hand corrections stay in identities.parquet but not among the paths.
    table = table[table["path"].isin(set(all_paths))]
    rest = sorted(set(all_paths) - set(table["path"]))
    if rest:
        table = pd.concat(
            [table, pd.DataFrame({"path": rest, "identity": -1, "cluster_size": 0})], ignore_index=True
        )
    table["embedded"] = table["cluster_size"] > 0
    table = table.astype({"identity": "int64", "cluster_size": "int64", "embedded": "bool"})
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def balance_labels(root: Path, config: Any) -> pd.Series | None:
    if not config.balance_column:
        return None
    source = Path(config.attributes) if config.attributes else root / ATTRIBUTES
    if not source.exists():
        raise ValueError(
            f"balance_column={config.balance_column!r} needs an attributes table; {source} not found "
            "(run the attributes stage or pass --attributes FILE)"
        )
    table = pd.read_parquet(source) if source.suffix == ".parquet" else pd.read_csv(source)
    if "path" not in table.columns or config.balance_column not in table.columns:
        raise ValueError(f"{source} needs columns path and {config.balance_column}")
    return table.drop_duplicates("path").set_index("path")[config.balance_column]


def _hashes(root: Path, paths: list[str]) -> list[str] | None:
    images = root / IMAGES
    if not images.exists():
        return None
    table = pd.read_parquet(images)
    if "sha256" not in table.columns:
        return None
    by_path = dict(zip(table["path"].astype(str), table["sha256"].astype(str), strict=True))
    return [by_path.get(p, f"missing:{p}") for p in paths]


def eval_eligible(root: Path, config: Any, table: pd.DataFrame) -> set[int]:
    """Identities in which at least one target would get ``min_refs`` val/test references."""
    emb, paths, vectors = DatasetRoot(root).embeddings_by_path()
    label_of = dict(zip(table["path"], table["identity"], strict=True))
    labels = np.array([label_of.get(p, -1) for p in paths])
    refs = select_references(
        paths,
        vectors,
        labels,
        "cosine",
        reference_radii(root, emb, paths, config),
        config.reference_config(),
        evaluation=True,
        sha256=_hashes(root, paths),
        impostor=impostor_of(root, paths),
    )
    return {int(labels[t]) for t in refs}


def splits_stage(root: Path, config: Any, all_paths: list[str]) -> tuple[dict, bool]:
    """{train,val,test}_image.txt + splits.parquet: identity-disjoint, covering every input image."""

    def work() -> dict:
        table = covering_table(root, all_paths)
        eligible = eval_eligible(root, config, table)
        assigned = assign_splits(table, config.split_config(), balance_labels(root, config), eligible)
        assigned = assigned.merge(table[["path", "cluster_size", "embedded"]], on="path", how="left")
        write_parquet(root / SPLITS_TABLE, assigned)
        names = write_split_lists(root, {s: assigned.loc[assigned["split"] == s, "path"] for s in SPLITS})
        return {"outputs": [SPLITS_TABLE, *names], "summary": split_summary(assigned)}

    cfg = {**asdict(config.split_config()), **asdict(config.reference_config())}
    cfg.update(attributes=config.attributes, identity_threshold=config.identity_threshold)
    inputs = {
        "identities": file_digest(root, IDENTITIES),
        "embeddings": embeddings_digest(root),
        "images": fingerprint(sorted(all_paths)),
        "attributes": sha256_file(config.attributes) if config.attributes else None,
    }
    if config.balance_column and not config.attributes:
        inputs["attributes"] = file_digest(root, "attributes.parquet")
    return run_stage(root, "splits", cfg, inputs, work)


def references_stage(root: Path, config: Any) -> tuple[dict, bool]:
    """train/val/test_references.csv in ReF-LDM's format (paths relative to the image root)."""

    def work() -> dict:
        emb, paths, vectors = DatasetRoot(root).embeddings_by_path()
        assigned = pd.read_parquet(root / SPLITS_TABLE)
        split_of = dict(zip(assigned["path"], assigned["split"], strict=True))
        label_of = dict(zip(assigned["path"], assigned["identity"], strict=True))
        labels = np.array([label_of.get(p, -1) for p in paths])
        is_eval = [split_of.get(p, "train") != "train" for p in paths]
        radii = reference_radii(root, emb, paths, config)
        refs = select_references(
            paths,
            vectors,
            labels,
            "cosine",
            radii,
            config.reference_config(),
            evaluation=is_eval,
            sha256=_hashes(root, paths),
            impostor=impostor_of(root, paths),
        )

        estimate = estimate_reference_precision(root, paths, vectors, labels, refs)
        rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        # The degrader writes a val/test target's LQ under its flat unique name (ReF-LDM's inference
        # names its result after the LQ file, and its eval looks the GT up by that name).
        lq = eval_names([paths[t] for t in refs if split_of.get(paths[t], "train") != "train"])
        for t, ref_rows in refs.items():
            split = split_of.get(paths[t], "train")
            rows[split].append(
                {
                    "gt_image": paths[t],
                    "lq_image": lq.get(paths[t], ""),
                    "ref_image": [paths[r] for r in ref_rows],
                }
            )
        outputs, counts = [], {}
        for split in SPLITS:
            name = references_filename(split)
            write_references(root / name, rows[split], with_lq=split != "train")
            outputs.append(name)
            counts[split] = len(rows[split])
        return {"outputs": outputs, "targets": counts, "reference_precision_estimate": estimate}

    cfg = asdict(config.reference_config())
    cfg["identity_threshold"] = config.identity_threshold
    inputs = {
        "splits": file_digest(root, SPLITS_TABLE),
        "embeddings": embeddings_digest(root),
        "identities": file_digest(root, IDENTITIES),
    }
    return run_stage(root, "references", cfg, inputs, work)


def impostor_of(root: Path, paths: list[str]) -> tuple[np.ndarray, float] | None:
    """The clustering's impostor model for these rows: (scale per row, exponent), or None when
    the clustering fitted none (fixed-cut methods)."""
    manifest = root / ".stages" / "identities.json"
    table = clustering_table(root)
    if not manifest.exists() or table is None:
        return None
    model = json.loads(manifest.read_text()).get("impostor_model")
    if not model or "impostor_scale" not in table.columns:
        return None
    scale_of = dict(zip(table["path"].astype(str), table["impostor_scale"].astype(float), strict=True))
    return np.array([scale_of.get(p, np.nan) for p in paths]), float(model["exponent"])


def estimate_reference_precision(root: Path, paths, vectors, labels, refs) -> dict | None:
    """Label-free estimate of the share of references that show the target's person, from the
    impostor model the clustering fitted (None when the clustering fitted none)."""
    model = impostor_of(root, paths)
    if model is None:
        return None
    return estimated_reference_precision(refs, vectors, labels, model[0], model[1])


def card_stage(root: Path, config: Any, title: str, extra_inputs: dict | None = None) -> tuple[dict, bool]:
    """card.md + plots/*.png from the finished tables (no timings, so the card is reproducible)."""

    def work() -> dict:
        outputs = write_card(root, config, title)
        return {"outputs": outputs}

    names = [IDENTITIES, SPLITS_TABLE, "errors.parquet", "corrections.json"]
    names += [references_filename(s) for s in SPLITS]
    inputs = {n: file_digest(root, n) for n in names}
    inputs["embeddings.npy"] = embeddings_digest(root)  # the key it always had, also for shards
    inputs["labels"] = sha256_file(config.labels) if config.labels else None
    inputs.update(extra_inputs or {})
    cfg = {"plots": config.plots, "title": title, "labels": config.labels}
    return run_stage(root, "card", cfg, inputs, work)


def build_ffhq_ref(
    images_dir: str | os.PathLike, out_root: str | os.PathLike, config: FFHQRefConfig | None = None
) -> dict:
    """Build an FFHQ-Ref-style dataset root from a folder of face images (resumable, deterministic).

    Args:
        images_dir: the images (FFHQ ``images1024x1024`` nested or flat, or any face photos).
        out_root: dataset root that receives every table, CSV, split list, card and build.json.
        config: build rules; defaults follow ReF-LDM.

    Returns:
        Summary counts (images, identities, per-split images and targets, errors, root).
    """
    config = config or FFHQRefConfig()
    source_root = Path(images_dir)
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    all_paths = list_images(source_root)
    if not all_paths:
        raise ValueError(f"no images found under {source_root}")
    timings = {}
    extra: dict[str, Any] = {}
    card_config = config
    source = None
    if config.detector == "prealigned":
        # FFHQ-aligned inputs are used as they are.
        image_root = source_root
        timings["mine"] = run_mining(image_root, root, config)["seconds"]
    else:
        # Photos: mine them, then build on FFHQ-aligned crops so every CSV path is an aligned PNG.
        timings["mine"] = run_mining(source_root, root / MINED_DIR, config)["seconds"]
        timings["align"] = align_stage(source_root, root, config)[0].get("timings", {}).get("seconds")
        image_root = root / ALIGNED_DIR
        all_paths = pd.read_parquet(root / "images.parquet")["path"].astype(str).tolist()
        extra = {"source_root": str(source_root.resolve()), "mining_timings": stage_timings(root / MINED_DIR)}
        card_config = labels_on_crops(root, config)
        source = (source_root, list_images(source_root))
    return build_mined(root, config, image_root, all_paths, timings, extra, card_config, source)


def build_mined(
    root: Path,
    config: FFHQRefConfig,
    image_root: Path,
    all_paths: list[str],
    timings: dict | None = None,
    build_extra: dict | None = None,
    card_config: Any = None,
    source: tuple[Path, list[str]] | None = None,
) -> dict:
    """The stages after mining: identities, corrections, splits, references, gt512, card, build.json."""
    identities_stage(root, config)
    kept, extra = corrected_paths(root, config, "identities", all_paths)
    splits_stage(root, config, kept)
    references_stage(root, config)
    gt_folder_stage(root, image_root)
    card_stage(root, card_config or config, "FFHQ-Ref-style dataset")
    extra = {**(build_extra or {}), **extra}
    write_build_json(root, "ffhq-ref", config, image_root, all_paths, timings or {}, extra, source=source)
    return build_summary(root)


def labels_on_crops(root: Path, config: Any) -> Any:
    """Known labels name source photos; the card needs them under the crop names (``labels.csv``)."""
    if not config.labels:
        return config

    labels = pd.read_csv(config.labels, dtype=str, keep_default_na=False)
    # Where each label comes from (the labels' own ``source``, else the photo's top folder) decides
    # which pairs the card scores "within one source"; crop names no longer carry it.
    if "source" not in labels.columns:
        labels["source"] = labels["path"].str.split("/").str[0]
    crops = pd.read_parquet(root / "sources.parquet")[["path", "source"]].rename(columns={"source": "photo"})
    moved = crops.merge(labels.rename(columns={"path": "photo"}), on="photo")[["path", "identity", "source"]]
    write_text(root / "labels.csv", moved.to_csv(index=False, lineterminator="\n"))
    return replace(config, labels=str(root / "labels.csv"))
