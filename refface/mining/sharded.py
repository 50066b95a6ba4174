"""Sharded embeddings with a memory-mapped reader, and k-NN graphs and clusters at 10M+ faces.

Layout of a sharded embeddings folder (``<root>/embeddings_shards/`` by default)::

    shard-000000.npy        float32 (rows, D), L2-normalized; one file per chunk/partition
    shard-000000.parquet    row (global), image_id, path           (optional)
    index.json              version, dim, count, shards [{name, start, rows}], model metadata

``index.json`` is written last: a folder is valid only once it exists. Readers memory-map the
shards, so 10M x 512 (20 GB) never has to fit in one process.

A sharded k-NN search (:func:`sharded_knn`) builds one index over every shard (chosen by size and
memory: exact below ~1M vectors, IVF-Flat or IVF-PQ above, trained on a sample, on GPU when FAISS
sees one), then searches shard by shard, writing ``knn-<shard>.npz`` atomically per query shard so
a killed run resumes per shard. Its recall against exact search is measured on a held-out sample
and written into ``knn.json``. :func:`cluster_edges` clusters the resulting sparse graph without
any dense matrix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refface.console import make_progress
from refface.manifests.atomic import atomic_path, write_json
from refface.manifests.embedding_shards import ShardedEmbeddings
from refface.mining.ann import IndexPlan, build_sharded_index, plan_index, to_gpu
from refface.mining.cluster import relabel
from refface.mining.linkage import average_linkage_graph
from refface.mining.neighbors import load_faiss, recall_at_k
from refface.stages import fingerprint

log = logging.getLogger(__name__)


KNN_VERSION = 1


# ------------------------------------------------------------------------------ sharded search
@dataclass
class KnnResult:
    """A finished sharded k-NN search: per-shard part files plus ``knn.json``."""

    folder: Path
    n: int
    k: int
    plan: IndexPlan
    recall: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    shards_searched: int = 0

    def part(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (rows, k) float32, neighbour ids (rows, k) int64) of query shard ``s``."""
        with np.load(self.folder / f"knn-{s:06d}.npz") as z:
            return z["sims"], z["idx"].astype(np.int64)

    def parts(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield ``(shard, start_row, sims, idx)`` for every query shard."""
        meta = json.loads((self.folder / "knn.json").read_text())
        for s, start in enumerate(meta["starts"]):
            sims, idx = self.part(s)
            yield s, int(start), sims, idx

    def edges(self, max_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Graph edges (rows, cols, cosine distance) closer than ``max_distance``, shard by shard."""
        rows, cols, dist = [], [], []
        for _, start, sims, idx in self.parts():
            d = 1.0 - sims.astype(np.float64)
            inside = (idx >= 0) & (d < max_distance)
            rows.append(np.repeat(np.arange(start, start + idx.shape[0], dtype=np.int64), inside.sum(axis=1)))
            cols.append(idx[inside])
            dist.append(d[inside])
        if not rows:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(dist)


def _search(
    index,
    plan: IndexPlan,
    shards: ShardedEmbeddings,
    query: np.ndarray,
    ids: np.ndarray,
    k: int,
):
    """k-NN of ``query`` rows (global ids ``ids``), self excluded; IVF-PQ candidates re-ranked exactly.

    Every IVF-PQ candidate is re-scored: 4-bit PQ scores rank well but are biased low (a
    same-person pair at cosine 0.77 scored 0.32), so no threshold can be applied to them.
    """
    fetch = k * plan.rerank + 1
    sims, idx = index.search(query, min(fetch, len(shards)))
    if plan.kind == "ivf_pq":
        # Exact scores of the candidates, read from the shards: PQ scores only rank candidates.
        q_rows, c_cols = np.nonzero(idx >= 0)
        # Limit memory: at most 65536 candidate vectors gathered at a time.
        for b in range(0, q_rows.size, 65_536):
            r, c = q_rows[b : b + 65_536], c_cols[b : b + 65_536]
            sims[r, c] = shards.dot(idx[r, c], query[r])
    sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
    sims[idx == ids[:, None]] = -np.inf  # self
    idx = np.where(np.isfinite(sims), idx, -1)
    # Best k by score, ties by smaller id so every run and device orders them alike.
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    return sims, idx


def exact_knn(shards: ShardedEmbeddings, ids: np.ndarray, k: int, block: int = 262_144):
    """Exact k-NN of rows ``ids`` (self excluded): FAISS flat search block by block, merged."""
    faiss = load_faiss()
    ids = np.asarray(ids, dtype=np.int64)
    query = shards.take(ids)
    best_s = np.full((len(ids), 0), -np.inf, np.float32)
    best_i = np.full((len(ids), 0), -1, np.int64)
    for _, start, mm in shards.iter_shards():
        for b in range(0, mm.shape[0], block):
            flat = faiss.IndexFlatIP(shards.dim)
            flat.add(np.ascontiguousarray(mm[b : b + block], dtype=np.float32))
            s, i = flat.search(query, min(k + 1, flat.ntotal))
            i = np.where(i >= 0, i + start + b, -1)
            s[(i == ids[:, None]) | (i < 0)] = -np.inf
            best_s = np.concatenate([best_s, s], axis=1)
            best_i = np.concatenate([best_i, i], axis=1)
            keep = np.lexsort((best_i, -best_s), axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
    best_i = np.where(np.isfinite(best_s), best_i, -1)
    return best_s, best_i


def graph_recall(
    approx_sims: np.ndarray,
    approx_idx: np.ndarray,
    exact_sims: np.ndarray,
    exact_idx: np.ndarray,
    radius: float,
) -> dict:
    """Recall@k of the approximate neighbour lists, and recall of the edges closer than ``radius``."""
    near = (exact_idx >= 0) & (1.0 - exact_sims < radius)
    found = (exact_idx[:, :, None] == approx_idx[:, None, :]).any(axis=2)
    return {
        "recall_at_k": round(recall_at_k(approx_idx, exact_idx), 5),
        "edge_recall": round(float(found[near].mean()) if near.any() else 1.0, 5),
        "edges_in_sample": int(near.sum()),
        "edge_radius": radius,
    }


def sharded_knn(
    shards: ShardedEmbeddings,
    out: str | os.PathLike,
    k: int = 32,
    kind: str = "auto",
    memory_bytes: int | None = None,
    gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    rerank: int = 4,
    recall_sample: int = 1000,
    recall_radius: float = 0.4,
    batch_size: int = 8192,
    seed: int = 0,
    save_index: bool = True,
) -> KnnResult:
    """k-NN graph of every row against all rows, built shard by shard and resumable per shard.

    Outputs in ``out``: ``knn-<shard>.npz`` per query shard (``sims`` float32, ``idx`` int32/int64,
    (rows, k), best first, self excluded, -1 padding), ``index.faiss`` (the trained and filled
    index, so a resumed run searches the same index) and ``knn.json`` last, with the plan, timings
    and the recall on ``recall_sample`` held-out rows (left out of quantizer training) against
    exact search. A run whose settings differ from the folder's starts over.

    Args:
        shards: the embeddings reader.
        out: output folder.
        k: neighbours per row.
        kind, memory_bytes, gpu, nlist, nprobe, pq_m, rerank: see :func:`plan_index`.
        recall_sample: held-out rows whose neighbours are also found exactly (0 = skip).
        recall_radius: cosine distance under which an exact neighbour counts as a graph edge.
        batch_size: query rows per search call (bounds result buffers).
        seed: training and recall samples.
        save_index: keep ``index.faiss`` for resuming (costs its size on disk).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    faiss = load_faiss()
    out = Path(out)
    n = len(shards)
    plan = plan_index(n, shards.dim, kind, memory_bytes, gpu, nlist, nprobe, pq_m, rerank)
    rng = np.random.default_rng(seed + 1)
    held = (
        np.sort(rng.choice(n, min(recall_sample, n), replace=False))
        if recall_sample
        else np.empty(0, np.int64)
    )
    settings = {
        "k": k,
        "plan": asdict(plan),
        "seed": seed,
        "recall_sample": int(held.size),
    }
    fp = fingerprint("sharded_knn", KNN_VERSION, settings, shards.meta)
    state_path = out / "knn.state.json"
    done_path = out / "knn.json"
    if done_path.exists() and json.loads(done_path.read_text()).get("fingerprint") == fp:
        meta = json.loads(done_path.read_text())
        return KnnResult(out, n, k, plan, meta["recall"], meta["timings"], 0)
    out.mkdir(parents=True, exist_ok=True)
    if not state_path.exists() or json.loads(state_path.read_text()).get("fingerprint") != fp:
        # Different settings: parts of an older search must not be mixed in.
        for old in [*out.glob("knn-*.npz"), out / "index.faiss", done_path]:
            old.unlink(missing_ok=True)
        write_json(state_path, {"fingerprint": fp, "settings": settings})
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index_path = out / "index.faiss"
    if index_path.exists():
        index = faiss.read_index(str(index_path))
        if plan.kind != "flat":
            faiss.extract_index_ivf(index).nprobe = plan.nprobe
        if plan.gpu:
            index = to_gpu(faiss, index, plan)
    else:
        index = build_sharded_index(shards, plan, exclude=held, seed=seed)
        if save_index and plan.kind != "flat":
            cpu = faiss.index_gpu_to_cpu(index) if plan.gpu else index
            with atomic_path(index_path) as tmp:
                faiss.write_index(cpu, str(tmp))
    timings["build_s"] = round(time.perf_counter() - t0, 2)
    id_dtype = np.int32 if n < 2**31 else np.int64
    t0 = time.perf_counter()
    searched = 0

    with make_progress() as progress:
        task = progress.add_task("k-NN shards", total=n)
        for s, start, mm in shards.iter_shards():
            part = out / f"knn-{s:06d}.npz"
            if part.exists():
                progress.advance(task, mm.shape[0])
                continue
            sims = np.empty((mm.shape[0], k), np.float32)
            idx = np.empty((mm.shape[0], k), np.int64)
            for b in range(0, mm.shape[0], batch_size):
                q = np.ascontiguousarray(mm[b : b + batch_size], dtype=np.float32)
                ids = np.arange(start + b, start + b + q.shape[0], dtype=np.int64)
                sims[b : b + q.shape[0]], idx[b : b + q.shape[0]] = _search(index, plan, shards, q, ids, k)
                progress.advance(task, q.shape[0])
            with atomic_path(part) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, sims=sims, idx=idx.astype(id_dtype))
            searched += 1
    timings["search_s"] = round(time.perf_counter() - t0, 2)
    result = KnnResult(out, n, k, plan, {}, timings, searched)
    if held.size:
        t0 = time.perf_counter()
        e_sims, e_idx = exact_knn(shards, held, k)
        a_sims, a_idx = _rows_of(result, shards, held)
        result.recall = graph_recall(a_sims, a_idx, e_sims, e_idx, recall_radius)
        result.recall["sample"] = int(held.size)
        timings["recall_s"] = round(time.perf_counter() - t0, 2)
    write_json(
        done_path,
        {
            "version": KNN_VERSION,
            "fingerprint": fp,
            "n": n,
            "k": k,
            "plan": asdict(plan),
            "starts": [int(s["start"]) for s in shards.shards],
            "recall": result.recall,
            "timings": timings,
        },
    )
    return result


def _rows_of(result: KnnResult, shards: ShardedEmbeddings, ids: np.ndarray):
    which = np.searchsorted(shards.starts, ids, side="right") - 1
    sims = np.empty((ids.size, result.k), np.float32)
    idx = np.empty((ids.size, result.k), np.int64)
    for s in np.unique(which):
        mask = which == s
        p_sims, p_idx = result.part(int(s))
        local = ids[mask] - shards.starts[s]
        sims[mask], idx[mask] = p_sims[local], p_idx[local]
    return sims, idx


# ------------------------------------------------------------------------------ sparse clustering
CLUSTER_METHODS = ("components", "average")


def cluster_edges(
    n: int,
    rows: np.ndarray,
    cols: np.ndarray,
    dist: np.ndarray,
    threshold: float,
    method: str = "average",
    missing: float | None = None,
) -> np.ndarray:
    """Cluster ``n`` items from sparse edges (no dense matrix; memory grows with the edge count).

    Args:
        n: number of items (graph nodes).
        rows, cols, dist: edges with cosine distance (either or both directions).
        threshold: cosine distance of "same identity".
        method: ``components`` (connected components of edges below ``threshold``: ReF-LDM's rule,
            via scipy's sparse graph routines) or ``average`` (the chain-resistant sparse average
            linkage of :func:`refface.mining.linkage.average_linkage_graph`; edges should reach
            out to ``missing``).
        missing: distance assumed for pairs without an edge in ``average`` (default: the largest
            edge distance, at least ``threshold``).

    Returns:
        (n,) int64 canonical labels: clusters numbered by size, singletons -1.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CLUSTER_METHODS)}")
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    dist = np.asarray(dist, dtype=np.float64)
    if method == "components":
        keep = dist < threshold
        graph = sparse.coo_matrix(
            (np.ones(int(keep.sum()), np.int8), (rows[keep], cols[keep])), shape=(n, n)
        ).tocsr()
        _, comp = connected_components(graph, directed=False)
        return relabel(comp)
    if missing is None:
        missing = max(float(threshold), float(dist.max()) if dist.size else float(threshold))
    return relabel(average_linkage_graph(n, rows, cols, dist, float(threshold), float(missing)))


def cluster_sharded(
    result: KnnResult, threshold: float, method: str = "average", graph_factor: float = 2.0
) -> np.ndarray:
    """Cluster a sharded k-NN graph: edges within ``graph_factor * threshold`` (average) or
    ``threshold`` (components), read part by part."""
    radius = min(1.0, graph_factor * threshold) if method == "average" else threshold
    rows, cols, dist = result.edges(radius)
    return cluster_edges(result.n, rows, cols, dist, threshold, method, missing=radius)
