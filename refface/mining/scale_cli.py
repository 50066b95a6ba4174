"""``refface knn-graph``: sharded k-NN graph and sparse identity clustering for 10M+ embeddings."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("knn-graph")(knn_graph)


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
    from refface.console import console, print_summary
    from refface.manifests.atomic import write_parquet
    from refface.mining.cluster import cosine_threshold, identities_frame
    from refface.mining.sharded import (
        DEFAULT_FOLDER,
        ShardedEmbeddings,
        cluster_sharded,
        shard_embeddings,
        sharded_knn,
    )

    try:
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
        write_parquet(dest / "identities.parquet", identities_frame(paths, labels))
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
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
