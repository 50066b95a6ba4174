"""``refface cluster`` and ``refface eval-clusters``: identity clustering of a dataset root and its scores."""

from __future__ import annotations

from pathlib import Path

import typer

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


def register(app: typer.Typer) -> None:
    app.command("cluster")(cluster_cmd)
    app.command("eval-clusters")(eval_clusters_cmd)


def _method_help() -> str:
    return (
        "Clustering method: 'impostor' (default: average linkage with each face's cut from this set's own "
        "impostor-distance model, at --max-false-merge), 'average' (average linkage at a fixed cut), "
        "'components' (connected components of the threshold graph), 'refldm' (ReF-LDM's rule: components "
        "at 0.4), 'chinese_whispers' or 'infomap' (on the k-NN graph of pairs within the threshold)."
    )


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
    try:
        config.validate()
        with console.status(f"clustering {root} ({config.method or 'default'})"):
            manifest, ran = cluster_root(root, config, force=force)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}")
        raise typer.Exit(2) from e
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
                ]
                if cfg["method"] == "impostor"
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

    try:
        truth = read_labels(labels)
        runs: list[tuple[str, dict[str, int]]] = []
        if method is None:
            path = root / "identities.parquet"
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found; run `refface cluster {root}` first (or pass --method)"
                )
            df = pd.read_parquet(path)
            runs.append(
                ("identities.parquet", dict(zip(df["path"], df["identity"].astype(int), strict=True)))
            )
        else:
            from refface.mining.cluster import ClusterConfig, cluster
            from refface.mining.embed import load_embeddings

            emb = load_embeddings(root)
            for tau in threshold or [None]:
                lab = cluster(
                    emb,
                    method=method,
                    threshold=tau,
                    config=ClusterConfig(k=k, max_false_merge=max_false_merge),
                )
                name = f"{method} {'default' if tau is None else tau}"
                runs.append((name, dict(zip(emb.paths, lab.tolist(), strict=True))))
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}")
        raise typer.Exit(2) from e

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
