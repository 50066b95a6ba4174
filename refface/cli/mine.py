"""``refface embed``, ``cluster``, ``eval-clusters`` and ``knn-graph``: mining faces into a dataset root,
clustering identities and scoring the clusters."""

from __future__ import annotations

from pathlib import Path

import typer

from refface.cli.errors import exits_on_error
from refface.manifests.layout import IDENTITIES
from refface.mining.tta import DEFAULT_TTA


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
    app.command("cluster")(cluster_cmd)
    app.command("eval-clusters")(eval_clusters_cmd)
    app.command("knn-graph")(knn_graph)


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


@exits_on_error()
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
    tta: str = typer.Option(
        DEFAULT_TTA,
        help="Test-time augmentation of the embedder: flip (the aligned crop and its mirror in one "
        "batch, averaged; 1.6x the embedding time, better clusters) or none. Recorded in embeddings.json.",
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
    from refface.console import print_summary
    from refface.mining.pipeline import MiningConfig, mine_folder

    config = MiningConfig(
        detector=detector,
        embedder=embedder,
        model_path=str(model) if model else None,
        tta=tta,
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
    relpaths = None
    folder = images
    if images.is_file():
        relpaths = read_images_table(images)
        folder = image_root or images.parent
    result = mine_folder(folder, out, config, force=force, relpaths=relpaths)
    rows: list[tuple[str, object]] = [
        ("images", result.n_images),
        ("decoded", result.n_decoded),
        ("faces", result.n_faces),
        ("errors", result.n_errors),
    ]
    rows += [(f"  {reason}", n) for reason, n in result.errors_by_reason.items()]
    vectors = "embeddings.npy"
    if shard_rows:
        from refface.manifests.embedding_shards import DEFAULT_FOLDER, ShardedEmbeddings

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


COLUMNS = [
    ("pair P", "pairwise_precision"),
    ("pair R", "pairwise_recall"),
    ("pair F", "pairwise_f"),
    ("B3 P", "bcubed_precision"),
    ("B3 R", "bcubed_recall"),
    ("B3 F", "bcubed_f"),
    ("NMI", "nmi"),
    ("clusters", "n_clusters"),
    ("ids", "n_identities"),
]


def _method_help() -> str:
    return (
        "Clustering method: 'impostor' (default: average linkage with each face's cut from this set's own "
        "impostor-distance model, at --max-false-merge, then lone faces join the cluster their neighbours "
        "agree on), 'impostor_linkage' (the linkage alone), 'average' (average linkage at a fixed cut), "
        "'components' (connected components of the threshold graph), 'refldm' (ReF-LDM's rule: components "
        "at 0.4), 'chinese_whispers' or 'infomap' (on the k-NN graph of pairs within the threshold)."
    )


@exits_on_error()
def cluster_cmd(
    root: Path = typer.Argument(
        ..., help="Dataset root holding embeddings.npy/.parquet/.json (from `refface embed`)."
    ),
    method: str = typer.Option(
        None, "--method", help=_method_help() + " Default: the embedding model's (impostor)."
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Cosine distance below which faces are the same person (impostor: a cap on every face's "
        "radius). Default: the method's value for the embedding model (see docs/mining.md), else "
        "embeddings.json identity_threshold.",
    ),
    max_false_merge: float | None = typer.Option(
        None,
        "--max-false-merge",
        help="impostor: share of same-identity pairs this set's impostor model may expect to be strangers "
        "(a precision target, not a distance; lower = stricter). Default: the embedding model's "
        "(dlib 0.45, ArcFace and others 0.1; docs/mining.md).",
    ),
    k: int = typer.Option(64, "--k", help="Neighbours per face in the k-NN graph."),
    index: str = typer.Option(
        "auto", "--index", help="FAISS index: auto (exact up to 1M faces, IVF above), flat, ivf."
    ),
    nprobe: int = typer.Option(32, "--nprobe", help="IVF lists visited per query (recall vs speed)."),
    force: bool = typer.Option(False, "--force", help="Recompute even when the stage is up to date."),
) -> None:
    """Cluster a dataset root's face embeddings into identities and write identities.parquet.

    Reads embeddings.npy/.parquet/.json; writes identities.parquet (path, identity, cluster_size;
    identity -1 marks a face alone in its cluster) and .stages/identities.json. A rerun with the
    same embeddings and settings does no work.
    """
    from refface.console import console, print_summary
    from refface.mining.cluster import ClusterConfig, cluster_root

    config = ClusterConfig(
        method=method,
        threshold=threshold,
        k=k,
        index=index,
        nprobe=nprobe,
        max_false_merge=max_false_merge,
    )
    config.validate()
    with console.status(f"clustering {root} ({config.method or 'default'})"):
        manifest, ran = cluster_root(root, config, force=force)
    counts = manifest.get("counts", {})
    cfg = manifest["config"]
    print_summary(
        "refface cluster",
        [
            ("dataset root", str(root)),
            ("method", cfg["method"]),
            ("threshold (cosine distance)", cfg["threshold"] if cfg["threshold"] is not None else "-"),
            *(
                [
                    ("max false merge (share of pairs)", cfg["max_false_merge"]),
                    ("median radius (cosine distance)", manifest.get("radius_median")),
                    (
                        "second pass: fragments merged / lone faces joined",
                        "{} / {}".format(
                            manifest.get("second_pass", {}).get("fragments_merged", "-"),
                            manifest.get("second_pass", {}).get("lone_faces_joined", "-"),
                        ),
                    ),
                ]
                if cfg["method"] in ("impostor", "impostor_linkage")
                else []
            ),
            ("faces", counts.get("faces")),
            ("clusters (2+ faces)", counts.get("clusters")),
            ("faces in clusters", counts.get("clustered_faces")),
            ("singletons", counts.get("singletons")),
            ("largest cluster", counts.get("largest_cluster")),
            ("seconds", manifest["timings"].get("seconds")),
            ("status", "computed" if ran else "up to date (skipped)"),
            ("output", str(Path(root) / "identities.parquet")),
        ],
    )


def read_labels(path: Path) -> dict[str, str]:
    """path -> identity from a CSV with columns ``path`` and ``identity`` (empty = unknown)."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"path", "identity"} - set(df.columns)
    if missing:
        raise ValueError(
            f"{path}: labels CSV needs columns path, identity (missing: {', '.join(sorted(missing))})"
        )
    return dict(zip(df["path"], df["identity"], strict=True))


@exits_on_error()
def eval_clusters_cmd(
    root: Path = typer.Argument(
        ..., help="Dataset root with identities.parquet (or embeddings, with --method)."
    ),
    labels: Path = typer.Option(
        ..., "--labels", help="CSV with columns path, identity (paths as in the root)."
    ),
    method: str | None = typer.Option(
        None,
        "--method",
        help="Cluster the embeddings in memory with this method instead of reading identities.parquet.",
    ),
    threshold: list[float] = typer.Option(
        None, "--threshold", help="With --method: cosine-distance threshold(s); repeat the flag for a sweep."
    ),
    k: int = typer.Option(64, "--k", help="With --method: neighbours per face in the k-NN graph."),
    max_false_merge: float | None = typer.Option(
        None, "--max-false-merge", help="With --method impostor: the precision target (default: the model's)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write the scores as JSON here."),
) -> None:
    """Score identity clusters against ground-truth labels: pairwise and BCubed precision/recall/F,
    NMI and the number of clusters vs identities.

    Only labeled photos are scored; a labeled photo without a face counts as a singleton.
    """
    import pandas as pd
    from rich import box
    from rich.table import Table

    from refface.console import console
    from refface.manifests.atomic import write_json
    from refface.mining.metrics import evaluate_assignments

    truth = read_labels(labels)
    runs: list[tuple[str, dict[str, int]]] = []
    if method is None:
        path = root / "identities.parquet"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; run `refface cluster {root}` first (or pass --method)"
            )
        df = pd.read_parquet(path)
        runs.append(("identities.parquet", dict(zip(df["path"], df["identity"].astype(int), strict=True))))
    else:
        from refface.manifests.embeddings import load_embeddings
        from refface.mining.cluster import ClusterConfig, cluster

        emb = load_embeddings(root)
        taus: list[float | None] = list(threshold) if threshold else [None]
        for tau in taus:
            lab = cluster(
                emb,
                method=method,
                threshold=tau,
                config=ClusterConfig(k=k, max_false_merge=max_false_merge),
            )
            name = f"{method} {'default' if tau is None else tau}"
            runs.append((name, dict(zip(emb.paths, lab.tolist(), strict=True))))

    scores = {name: evaluate_assignments(assign, truth) for name, assign in runs}
    table = Table(title=f"cluster quality: {root}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("clustering", style="bold")
    for header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, s in scores.items():
        values = [getattr(s, key) for _, key in COLUMNS]
        table.add_row(name, *[f"{v:.4f}" if isinstance(v, float) else str(v) for v in values])
    first = next(iter(scores.values()))
    table.caption = (
        f"{first.n_items} labeled photos scored ({first.n_unclustered} of them without a face, scored as "
        f"singletons); {first.n_unlabeled} unlabeled photos not scored. clusters/ids count singletons."
    )
    # Piped output gets rich's 80 columns, which squeezes figures into ellipses: widen it.
    if console.is_terminal:
        console.print(table)
    else:
        from rich.console import Console

        Console(stderr=True, width=120).print(table)
    if out is not None:
        write_json(out, {name: s.as_dict() for name, s in scores.items()})


@exits_on_error()
def knn_graph(
    root: Path = typer.Argument(..., help="Dataset root with embeddings (from `refface embed`)."),
    shards: Path | None = typer.Option(
        None,
        help="Sharded embeddings folder (default ROOT/embeddings_shards, written by "
        "`refface embed --shard-rows`, else split from embeddings.npy).",
    ),
    out: Path | None = typer.Option(None, help="Output folder for the graph parts (default ROOT/knn)."),
    rows_per_shard: int = typer.Option(1_000_000, help="Vectors per shard when splitting embeddings.npy."),
    k: int = typer.Option(32, help="Neighbours per face."),
    index: str = typer.Option("auto", help="auto (by size, memory, GPU), flat, ivf_flat or ivf_pq."),
    nlist: int | None = typer.Option(None, help="IVF lists (default: power of two near 2*sqrt(N))."),
    nprobe: int | None = typer.Option(None, help="IVF lists visited per query (recall vs time)."),
    rerank: int = typer.Option(4, help="IVF-PQ: candidates per neighbour re-scored exactly."),
    recall_sample: int = typer.Option(1000, help="Held-out faces whose neighbours are also found exactly."),
    threshold: float | None = typer.Option(
        None, help="Cosine distance of 'same identity' (default: the embeddings' own)."
    ),
    method: str = typer.Option("average", help="Clustering: average (chain-resistant) or components."),
    graph_factor: float = typer.Option(2.0, help="average: graph edges reach graph_factor * threshold."),
) -> None:
    """Build the k-NN graph of every face shard by shard (resumable) and cluster it sparsely.

    Writes OUT/knn-<shard>.npz, OUT/index.faiss, OUT/knn.json (plan, timings, recall against exact
    search on held-out faces) and OUT/identities.parquet (path, identity, cluster_size).
    A killed run resumes per shard; no step holds an N x N matrix.
    """
    from refface.console import print_summary
    from refface.manifests.atomic import write_parquet
    from refface.manifests.embedding_shards import DEFAULT_FOLDER, ShardedEmbeddings
    from refface.manifests.embeddings import shard_embeddings
    from refface.mining.cluster import cosine_threshold, identities_frame
    from refface.mining.sharded import cluster_sharded, sharded_knn

    folder = shards or root / DEFAULT_FOLDER
    reader = (
        ShardedEmbeddings(folder)
        if (folder / "index.json").exists()
        else shard_embeddings(root, folder, rows_per_shard)
    )
    tau = threshold
    if tau is None:
        tau = cosine_threshold(
            float(reader.meta.get("identity_threshold", 0.4)), reader.meta.get("metric", "cosine")
        )
    dest = out or root / "knn"
    result = sharded_knn(
        reader,
        dest,
        k=k,
        kind=index,
        nlist=nlist,
        nprobe=nprobe,
        rerank=rerank,
        recall_sample=recall_sample,
        recall_radius=tau,
    )
    labels = cluster_sharded(result, tau, method, graph_factor=graph_factor)
    paths = reader.paths() if reader.meta.get("has_tables") else [str(i) for i in range(len(reader))]
    write_parquet(dest / IDENTITIES, identities_frame(paths, labels))
    rows: list[tuple[str, object]] = [
        ("faces", len(reader)),
        ("shards", reader.n_shards),
        ("index", f"{result.plan.kind} ({result.plan.reason})"),
        ("nlist / nprobe", f"{result.plan.nlist} / {result.plan.nprobe}"),
        ("recall@k (held out)", result.recall.get("recall_at_k", "-")),
        ("edge recall (held out)", result.recall.get("edge_recall", "-")),
        ("threshold", round(tau, 4)),
        ("clusters", int(labels.max() + 1) if (labels >= 0).any() else 0),
        ("singletons", int((labels < 0).sum())),
        ("shards searched now", result.shards_searched),
        ("output", str(dest)),
    ]
    print_summary("refface knn-graph", rows)
