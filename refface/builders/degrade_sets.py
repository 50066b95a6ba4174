"""Fixed LQ test sets: degrade a dataset root's test/val targets (or any folder) with named presets.

Per set ``<out>/<set folder>/``: one PNG per target at the target's relative path, ``params.parquet``
+ ``params.csv`` (every sampled value), ``errors.parquet`` + ``errors.csv`` and ``manifest.json``
(written last: the set's done-marker). Work runs in chunks through :func:`refface.stages.map_chunks`;
each finished chunk leaves a part file, so a killed run resumes and ends with the same bytes.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from refface.builders.aligned import eval_names
from refface.degradations import Degrader, PresetConfig, get_preset
from refface.degradations.degrader import prepare_input
from refface.manifests.atomic import write_json, write_parquet, write_text
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import list_images, read_image, write_png
from refface.manifests.layout import BUILD, references_filename
from refface.stages import fingerprint, folder_fingerprint, map_chunks

log = logging.getLogger(__name__)

STAGE = "degrade"
MANIFEST_VERSION = 1
REFERENCE_CSVS = (references_filename("test"), references_filename("val"))


@dataclass(frozen=True)
class DegradeConfig:
    """What ``refface degrade`` runs; saved in every set's manifest."""

    presets: tuple[str, ...] = ("refldm-severe", "refldm-moderate")
    seed: int = 0
    workers: int = 1
    chunk_size: int = 16
    fast: bool = True
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        if not self.presets:
            raise ValueError("give at least one --preset (see `refface degrade --list`)")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")


@dataclass
class Target:
    """Resolved input: a dataset root (reference CSVs) or a plain folder of images."""

    kind: str  # "dataset" or "folder"
    root: Path
    image_root: Path
    items: list[str]
    csvs: list[Path] = field(default_factory=list)
    # LQ file name per target: flat unique ``<stem>.png`` for dataset roots (what ReF-LDM's inference
    # saves and its eval looks up), the relative path as PNG for folders.
    lq_names: dict[str, str] = field(default_factory=dict)

    def lq_name(self, rel: str) -> str:
        return self.lq_names.get(rel) or lq_name(rel)


def resolve_target(target: str | Path, images: str | Path | None = None) -> Target:
    """Find what to degrade under ``target``.

    A dataset root holds ``test_references.csv`` / ``val_references.csv``; their ``gt_image``
    column lists the targets, relative to ``build.json``'s ``image_root`` (else ``images``).
    Anything else is read as a folder of images.

    Raises:
        ValueError: missing target, no image root for a dataset, or nothing to degrade.
    """
    root = Path(target)
    if not root.exists():
        raise ValueError(f"target not found: {root}")
    csvs = [root / name for name in REFERENCE_CSVS if (root / name).exists()]
    if csvs:
        image_root = None
        build = root / BUILD
        if build.exists():
            recorded = json.loads(build.read_text()).get("image_root")
            if recorded:
                image_root = Path(recorded) if Path(recorded).is_absolute() else root / recorded
        if image_root is None and images is not None:
            image_root = Path(images)
        if image_root is None:
            raise ValueError(
                f"{root} is a dataset root but its build.json has no image_root; pass --images <folder of gt images>"
            )
        items: set[str] = set()
        for csv in csvs:
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
            if "gt_image" not in df.columns:
                raise ValueError(
                    f"{csv} has no gt_image column (expected ReF-LDM format: gt_image, lq_image, ref_image)"
                )
            items.update(v for v in df["gt_image"] if v)
        if not items:
            raise ValueError(f"no targets listed in {', '.join(c.name for c in csvs)}")

        return Target("dataset", root, image_root, sorted(items), csvs, eval_names(sorted(items)))
    if not root.is_dir():
        raise ValueError(f"{root} is neither a dataset root (reference CSVs) nor a folder of images")
    items_list = list_images(root)
    if not items_list:
        raise ValueError(f"no images found under {root}")
    return Target("folder", root, root, items_list)


def default_out(target: Target) -> Path:
    """``<root>/lq`` for a dataset root, ``<folder>_lq`` beside a plain folder."""
    if target.kind == "dataset":
        return target.root / "lq"
    return target.root.parent / f"{target.root.name}_lq"


def lq_name(rel: str) -> str:
    """LQ file name for a target: same relative path, PNG."""
    return Path(rel).with_suffix(".png").as_posix()


def _init_worker() -> None:
    # One thread per worker process: the pool already uses every core.
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)


def _row_from_params(rel: str, params: dict, name: str) -> dict:
    row = {"gt_image": rel, "lq_image": name, "status": "ok", "reason": ""}
    for key, value in params.items():
        if key == "color_jitter":
            value = json.dumps(value) if value is not None else ""
        row[key] = value
    return row


def degrade_chunk(
    items: list[str],
    image_root: str,
    set_dir: str,
    preset: dict,
    seed: int,
    fast: bool,
    tolerance: float,
    names: dict[str, str] | None = None,
) -> list[dict]:
    """Degrade one chunk of targets; pure apart from writing each PNG atomically. Picklable."""
    from threadpoolctl import threadpool_limits

    cfg = PresetConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in preset.items()})
    degrader = Degrader(cfg, seed=seed, fast=fast, tolerance=tolerance)
    # One BLAS thread whatever the caller set, so the bytes never depend on the worker count.
    with threadpool_limits(1):
        return [
            _degrade_one(
                rel, Path(image_root), Path(set_dir), degrader, (names or {}).get(rel) or lq_name(rel)
            )
            for rel in items
        ]


def _degrade_one(rel: str, image_root: Path, set_dir: Path, degrader, name: str) -> dict:
    """One target: its params row, or an error row with the reason."""
    out_path = set_dir / name
    try:
        img = read_image(image_root / rel)
        if out_path.exists():
            # Finished earlier (a resumed run): the parameters are a pure function of the key.
            prepared, notes = prepare_input(img, degrader.config)
            params = degrader.sample(rel)
            h, w = prepared.shape[:2]
            lw, lh = max(1, int(w // params["scale"])), max(1, int(h // params["scale"]))
            params.update(input_notes="; ".join(notes), lq_width=lw, lq_height=lh, width=w, height=h)
        else:
            lq, params = degrader.degrade(img, rel)
            write_png(out_path, lq)
        return _row_from_params(rel, params, name)
    except ImageError as e:
        return {"gt_image": rel, "lq_image": "", "status": "error", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the set; the reason is kept
        log.warning("degrading %s failed: %s", rel, e)
        return {"gt_image": rel, "lq_image": "", "status": "error", "reason": f"{type(e).__name__}: {e}"}


def _write_part(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(rows, sort_keys=True))


def _read_part(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _claim_set_dir(set_dir: Path, preset: dict, config: DegradeConfig) -> None:
    """Record the set's recipe before any image is written; refuse a folder made with another one.

    Finished images are reused on resume, so a folder holding images of another seed, preset or
    path must never be mixed into: that would silently combine two different test sets.
    """
    recipe = {"preset": preset, "seed": config.seed, "fast": config.fast, "tolerance": config.tolerance}
    path = set_dir / "recipe.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != json.loads(json.dumps(recipe)):
            raise ValueError(
                f"{set_dir} holds a set made with another recipe (seed, preset fields or --exact differ); "
                "write to another --out or delete that folder"
            )
        return
    write_json(path, recipe)


def degrade_set(target: Target, out: Path, preset_name: str, config: DegradeConfig) -> dict:
    """Write one LQ set; skipped when its manifest matches. Returns the set's summary."""
    preset = get_preset(preset_name)
    set_dir = out / preset.set_name
    fp = fingerprint(
        STAGE,
        preset.to_dict(),
        config.seed,
        config.fast,
        config.tolerance,
        target.items,
        folder_fingerprint(target.image_root, target.items),
        target.lq_names or None,
    )
    manifest_path = set_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{manifest_path} has version {manifest.get('version')}, expected {MANIFEST_VERSION}"
            )
        if manifest.get("fingerprint") == fp and (set_dir / "params.parquet").exists():
            log.info("%s: up to date, skipped", set_dir)
            done = manifest["summary"]["images"] - manifest["summary"]["errors"]
            return {**manifest["summary"], "written": 0, "already_done": done, "seconds": 0.0, "ran": False}
    _claim_set_dir(set_dir, preset.to_dict(), config)
    start = time.perf_counter()
    existed = sum((set_dir / target.lq_name(rel)).exists() for rel in target.items)
    parts = set_dir / ".parts" / fp[:16]
    fn = functools.partial(
        degrade_chunk,
        image_root=str(target.image_root),
        set_dir=str(set_dir),
        preset=preset.to_dict(),
        seed=config.seed,
        fast=config.fast,
        tolerance=config.tolerance,
        names=target.lq_names,
    )
    chunks = map_chunks(
        fn,
        target.items,
        config.chunk_size,
        workers=config.workers,
        description=preset.set_name,
        part_path=lambda i: parts / f"chunk-{i:06d}.json",
        write_part=_write_part,
        read_part=_read_part,
        initializer=_init_worker if config.workers > 1 else None,
    )
    rows = [row for chunk in chunks for row in chunk]
    ok = [r for r in rows if r["status"] == "ok"]
    table = (
        pd.DataFrame(ok).sort_values("gt_image", kind="stable").reset_index(drop=True)
        if ok
        else pd.DataFrame()
    )
    write_parquet(set_dir / "params.parquet", table)
    write_text(set_dir / "params.csv", table.to_csv(index=False))
    errors = ErrorsTable()
    for r in rows:
        if r["status"] != "ok":
            errors.add(r["gt_image"], STAGE, r["reason"])
    errors.write(set_dir, "errors")
    seconds = round(time.perf_counter() - start, 3)
    summary = {
        "set": preset.set_name,
        "preset": preset.name,
        "folder": str(set_dir),
        "images": len(target.items),
        "written": len(ok) - min(existed, len(ok)),
        "already_done": min(existed, len(ok)),
        "errors": len(errors),
        "seconds": seconds,
    }
    write_json(
        manifest_path,
        {
            "version": MANIFEST_VERSION,
            "stage": STAGE,
            "fingerprint": fp,
            "config": {"seed": config.seed, "fast": config.fast, "tolerance": config.tolerance},
            "preset": preset.to_dict(),
            "inputs": {"image_root": str(target.image_root), "images": len(target.items)},
            "summary": summary,
        },
    )
    shutil.rmtree(set_dir / ".parts", ignore_errors=True)
    return {**summary, "ran": True}


def fill_lq_column(target: Target, ok_names: set[str]) -> list[str]:
    """Set ``lq_image`` of the reference CSVs (atomically): the LQ name where every set has it, else ''."""
    written = []
    for csv in target.csvs:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        values = [target.lq_name(g) if g in ok_names else "" for g in df["gt_image"]]
        if "lq_image" in df.columns:
            df["lq_image"] = values
        else:
            df.insert(list(df.columns).index("gt_image") + 1, "lq_image", values)
        write_text(csv, df.to_csv(index=False))
        written.append(str(csv))
    return written


def degrade_target(
    target: str | Path,
    config: DegradeConfig,
    out: str | Path | None = None,
    images: str | Path | None = None,
) -> dict:
    """Degrade a dataset root's test/val targets, or a folder, with every preset in ``config``.

    Returns:
        ``{"target", "kind", "out", "sets": [per-set summary], "csvs": [filled CSVs]}``.
    """
    resolved = resolve_target(target, images)
    out_dir = Path(out) if out is not None else default_out(resolved)
    sets = [degrade_set(resolved, out_dir, name, config) for name in config.presets]
    csvs: list[str] = []
    if resolved.kind == "dataset":
        ok_names = set(resolved.items)
        for s in sets:
            params = pd.read_parquet(Path(s["folder"]) / "params.parquet", columns=None)
            ok_names &= set(params["gt_image"]) if len(params) else set()
        csvs = fill_lq_column(resolved, ok_names)
    return {
        "target": str(resolved.root),
        "kind": resolved.kind,
        "out": str(out_dir),
        "sets": sets,
        "csvs": csvs,
    }


def degrade_folder(
    images_dir: str | Path,
    out_dir: str | Path,
    presets: tuple[str, ...] | list[str] = ("refldm-severe", "refldm-moderate"),
    workers: int = 1,
    seed: int = 0,
    chunk_size: int = 16,
) -> dict:
    """Degrade every image under ``images_dir`` into ``out_dir/<set folder>/`` (the demo's hook).

    Returns the summary of :func:`degrade_target`.
    """
    config = DegradeConfig(presets=tuple(presets), seed=seed, workers=workers, chunk_size=chunk_size)
    return degrade_target(images_dir, config, out=out_dir)
