"""``refface embed``: a folder of photos -> faces, landmarks and identity embeddings in a dataset root."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)


def read_images_table(path: Path) -> list[str]:
    """The ``path`` column of an images table (.parquet or .csv)."""
    import pandas as pd

    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        raise ValueError(f"{path}: an images table must be .parquet or .csv; or pass a folder of photos")
    if "path" not in table.columns:
        raise ValueError(f"{path} has no 'path' column (columns: {', '.join(map(str, table.columns))})")
    return [p for p in table["path"].astype(str) if p]


def embed(
    images: Path = typer.Argument(
        ...,
        help="Folder of photos (searched recursively; JPEG/PNG/WebP/BMP/TIFF), or an images table "
        "(.parquet/.csv with a 'path' column, paths relative to --image-root).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Dataset root that receives the tables and embeddings."
    ),
    detector: str = typer.Option(
        "dlib",
        help="Face detector: dlib (offline), scrfd (insightface det_10g.onnx), prealigned (FFHQ crops).",
    ),
    embedder: str = typer.Option(
        "dlib", help="Embedder: dlib (offline, 128-d) or arcface (insightface ONNX, 512-d)."
    ),
    model: Path | None = typer.Option(
        None, help="Embedder weights: an ArcFace .onnx (e.g. w600k_r50.onnx) or a folder holding one."
    ),
    model_root: Path | None = typer.Option(
        None,
        help="Folder holding det_10g.onnx for --detector scrfd (default ~/.insightface/models/buffalo_l).",
    ),
    dlib_detector: str = typer.Option(
        "hog", help="dlib detector: hog (fast) or mmod (CNN, slower, more poses)."
    ),
    face_policy: str = typer.Option(
        "largest_central", help="Face kept when several are found: largest, central or largest_central."
    ),
    save_crops: bool = typer.Option(
        False, "--save-crops", help="Also write FFHQ-style aligned crops to ROOT/aligned/."
    ),
    crop_size: int = typer.Option(512, help="Side of the aligned crops in pixels."),
    workers: int = typer.Option(2, help="Worker processes (results do not depend on it)."),
    chunk_size: int = typer.Option(32, help="Images per unit of work / resumable part file."),
    executor: str = typer.Option(
        "local",
        help="Where chunks run: local (process pool) or ray (Ray Data; a local Ray, or the cluster "
        "named by RAY_ADDRESS). Outputs are identical either way.",
    ),
    shard_rows: int = typer.Option(
        0,
        help="0: one embeddings.npy. N > 0: embeddings as shard files of about N faces in "
        "OUT/embeddings_shards/ with an index.json, never one file (10M+ faces; `refface knn-graph` reads them).",
    ),
    force: bool = typer.Option(False, "--force", help="Recompute even when the outputs are up to date."),
    image_root: Path | None = typer.Option(
        None, help="With an images table: the folder its paths are relative to (default: the table's folder)."
    ),
) -> None:
    """Detect, align and embed every face photo under IMAGES into the dataset root OUT.

    Writes images.parquet, faces.parquet, embeddings.npy/.parquet/.json and errors.parquet/.csv
    (with --shard-rows, embeddings_shards/ in place of embeddings.npy).

    Every unreadable, corrupt, oversized or faceless image becomes one row of the errors table.

    A killed run resumes where it stopped; a rerun with the same inputs and settings does nothing.
    """
    from refface.console import console, print_summary
    from refface.mining.pipeline import MiningConfig, mine_folder

    config = MiningConfig(
        detector=detector,
        embedder=embedder,
        model_path=str(model) if model else None,
        model_root=str(model_root) if model_root else None,
        dlib_detector=dlib_detector,
        face_policy=face_policy,
        crop_size=crop_size,
        save_crops=save_crops,
        workers=workers,
        chunk_size=chunk_size,
        executor=executor,
        shard_rows=shard_rows,
    )
    try:
        relpaths = None
        folder = images
        if images.is_file():
            relpaths = read_images_table(images)
            folder = image_root or images.parent
        result = mine_folder(folder, out, config, force=force, relpaths=relpaths)
    except (ValueError, FileNotFoundError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    rows: list[tuple[str, object]] = [
        ("images", result.n_images),
        ("decoded", result.n_decoded),
        ("faces", result.n_faces),
        ("errors", result.n_errors),
    ]
    rows += [(f"  {reason}", n) for reason, n in result.errors_by_reason.items()]
    vectors = "embeddings.npy"
    if shard_rows:
        from refface.mining.sharded import DEFAULT_FOLDER, ShardedEmbeddings

        vectors = f"{ShardedEmbeddings(out / DEFAULT_FOLDER).n_shards} shard(s) in {out / DEFAULT_FOLDER}"
    rows += [
        ("model", result.model),
        ("embeddings", vectors),
        ("seconds", round(result.seconds, 1)),
        ("faces/s", round(result.faces_per_second, 2)),
        ("status", "computed" if result.ran else "up to date (nothing to do)"),
        ("dataset root", str(out)),
    ]
    print_summary("refface embed", rows)
