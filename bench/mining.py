"""Mining speed: dlib faces/s, and k-NN-graph time with FAISS vs a blocked-numpy baseline.

One run prints and records:
- faces/s for dlib detection + embedding on CPU (``bench/mining_faces.py``);
- for each N (default 10k, 100k, 1M synthetic 512-d unit vectors): the time to build the
  k-NN graph (top-k neighbours of every vector, self excluded) with FAISS through
  ``refface.mining.neighbors.knn`` (exact ``IndexFlatIP`` up to 1M, IVF above or when forced);
- for N <= 100k the same graph from blocked numpy (``Q @ X.T`` + ``argpartition``) and the
  ratio. The baseline is timed on ``--baseline-queries`` rows and scaled to N (rows are
  independent, so the cost is linear in them); the FAISS figure is always the full graph;
- for IVF runs, recall@k against exact search on a sample of queries.

Results: bench/results/mining.json and .md.

    .venv/bin/python bench/mining.py [--sizes 10000 100000 1000000] [--k 10] [--faces 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_vectors(n: int, dim: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """``n`` unit vectors in clumps of ~10 (like photos of one identity), generated chunk by chunk."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        m = stop - start
        centres = rng.standard_normal((m // 10 + 1, dim), dtype=np.float32)
        ids = rng.integers(0, centres.shape[0], m)
        x = centres[ids] + 0.7 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_knn(query: np.ndarray, base: np.ndarray, k: int, offset: int = 0, block: int = 1024):
    """Blocked numpy top-k (self excluded): the plain baseline."""
    idx = np.empty((query.shape[0], k), dtype=np.int64)
    for start in range(0, query.shape[0], block):
        q = query[start : start + block]
        sims = q @ base.T
        rows = np.arange(q.shape[0])
        sims[rows, offset + start + rows] = -np.inf  # self
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        idx[start : start + q.shape[0]] = np.take_along_axis(part, order, 1)
    return idx


def bench_size(
    n: int,
    dim: int,
    k: int,
    index: str,
    nprobe: int,
    baseline_max: int,
    baseline_queries: int,
    recall_queries: int,
    max_queries: int = 0,
) -> dict:
    from refface.mining import neighbors as nb

    x = synthetic_vectors(n, dim, seed=n)
    kind = nb.choose_index(n, index)
    t0 = time.perf_counter()
    built = nb.build_index(x, kind, nprobe=nprobe, gpu=False)
    t1 = time.perf_counter()
    # Query rows are independent: on a slow box the search may be timed on the first rows only
    # and scaled to N (reported as such).
    q = n if not max_queries or max_queries >= n else max_queries
    _, idx = nb.drop_self(*nb.search(x[:q], built, k + 1), np.arange(q))
    t2 = time.perf_counter()
    search_s = (t2 - t1) * n / q
    faiss_s = (t1 - t0) + search_s
    row: dict = {
        "n": n,
        "dim": dim,
        "k": k,
        "index": kind,
        "faiss_build_s": round(t1 - t0, 2),
        "faiss_search_s": round(search_s, 2),
        "faiss_graph_s": round(faiss_s, 2),
        "faiss_queries_timed": q,
    }
    if kind == "ivf":
        row.update(nlist=built.nlist, nprobe=nprobe)
        rng = np.random.default_rng(1)
        sample = np.sort(rng.choice(q, min(recall_queries, q), replace=False))
        exact = nb.build_index(x, "flat", gpu=False)
        _, ex = nb.drop_self(*nb.search(x[sample], exact, k + 1), sample)
        row["recall_at_k"] = round(nb.recall_at_k(idx[sample], ex), 4)
        row["recall_queries"] = int(sample.size)
        # The recall/speed knob: the same sampled rows at other nprobe values.
        sweep = {}
        for probes in sorted({nprobe, 4 * nprobe, 16 * nprobe}):
            built.cpu_index.nprobe = min(probes, built.nlist)
            ts = time.perf_counter()
            _, got = nb.drop_self(*nb.search(x[sample], built, k + 1), sample)
            ms = 1000 * (time.perf_counter() - ts) / sample.size
            sweep[str(probes)] = {
                "recall_at_k": round(nb.recall_at_k(got, ex), 4),
                "ms_per_query": round(ms, 3),
            }
        built.cpu_index.nprobe = nprobe
        row["nprobe_sweep"] = sweep
    else:
        row["recall_at_k"] = 1.0
    if n <= baseline_max:
        bq = min(q, baseline_queries)
        t0 = time.perf_counter()
        base_idx = numpy_knn(x[:bq], x, k)
        seconds = (time.perf_counter() - t0) * n / bq
        row["numpy_graph_s"] = round(seconds, 2)
        row["numpy_queries_timed"] = bq
        row["speedup_vs_numpy"] = round(seconds / faiss_s, 2)
        row["agreement_with_numpy"] = round(nb.recall_at_k(idx[:bq], base_idx), 4)
    return row


def device() -> str:
    from refface.mining.neighbors import gpu_available

    cpu = f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    return cpu + (", FAISS GPU build with a GPU present (not used: gpu=False)" if gpu_available() else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="N values")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10, help="neighbours per vector")
    parser.add_argument("--index", default="auto", help="auto (flat up to 1M, IVF above), flat or ivf")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query")
    parser.add_argument("--baseline-max", type=int, default=100_000, help="largest N timed with numpy")
    parser.add_argument("--baseline-queries", type=int, default=5_000, help="numpy rows timed (scaled to N)")
    parser.add_argument("--recall-queries", type=int, default=1_000, help="sampled rows for IVF recall")
    parser.add_argument(
        "--max-queries",
        type=int,
        default=100_000,
        help="FAISS search timed on at most this many rows, scaled to N (0 = the whole graph)",
    )
    parser.add_argument("--faces", type=int, default=100, help="photos timed for dlib faces/s (0 to skip)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = parser.parse_args()

    result: dict = {"device": device(), "faiss_threads": None, "graphs": []}
    import faiss

    result["faiss_threads"] = faiss.omp_get_max_threads()
    if args.faces > 0:
        sys.path.insert(0, str(REPO / "bench"))
        try:
            from mining_faces import bench_faces_per_second

            faces = bench_faces_per_second(args.faces)
            result["faces"] = faces
            print(
                f"dlib detection+embedding: {faces['faces_per_s']} faces/s ({faces['ms_per_face']} ms/face, {faces['faces']} faces)"
            )
        except FileNotFoundError as e:
            print(f"faces/s skipped: {e}")
    for n in args.sizes:
        row = bench_size(
            n,
            args.dim,
            args.k,
            args.index,
            args.nprobe,
            args.baseline_max,
            args.baseline_queries,
            args.recall_queries,
            args.max_queries,
        )
        result["graphs"].append(row)
        line = f"k-NN graph N={n:>9,} d={args.dim} k={args.k} [{row['index']}]: FAISS {row['faiss_graph_s']:.2f} s"
        if row["faiss_queries_timed"] < n:
            line += f" (search timed on {row['faiss_queries_timed']:,} rows, scaled)"
        if "numpy_graph_s" in row:
            line += f", numpy {row['numpy_graph_s']:.2f} s -> {row['speedup_vs_numpy']:.2f}x"
        if row["index"] == "ivf":
            line += (
                f", recall@{args.k} {row['recall_at_k']:.3f} (nprobe {row['nprobe']}, nlist {row['nlist']})"
            )
        print(line, flush=True)
        for probes, v in row.get("nprobe_sweep", {}).items():
            print(
                f"    nprobe {probes:>4}: recall@{args.k} {v['recall_at_k']:.3f}, {v['ms_per_query']:.2f} ms/query"
            )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mining.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Mining benchmark",
        "",
        f"Device: {result['device']}; FAISS threads: {result['faiss_threads']}.",
        "",
    ]
    if "faces" in result:
        f = result["faces"]
        lines += [
            f"dlib detection + embedding (CPU, 1 process): **{f['faces_per_s']} faces/s** "
            f"({f['ms_per_face']} ms/face over {f['faces']} faces).",
            "",
        ]
    lines += [
        f"k-NN graph (top-{args.k}, self excluded) of N synthetic {args.dim}-d unit vectors (clumps of ~10):",
        "",
        "| N | index | FAISS s (build + search) | numpy s | speed-up | recall@k |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["graphs"]:
        numpy_s = f"{r['numpy_graph_s']:.2f}" if "numpy_graph_s" in r else "—"
        ratio = f"{r['speedup_vs_numpy']:.2f}x" if "speedup_vs_numpy" in r else "—"
        lines.append(
            f"| {r['n']:,} | {r['index']} | {r['faiss_graph_s']:.2f} ({r['faiss_build_s']:.2f} + {r['faiss_search_s']:.2f}) "
            f"| {numpy_s} | {ratio} | {r['recall_at_k']:.3f} |"
        )
    for r in result["graphs"]:
        if "nprobe_sweep" in r:
            lines += [
                "",
                f"IVF recall@{args.k} vs nprobe at N = {r['n']:,} (nlist {r['nlist']}, {r['recall_queries']:,} sampled rows):",
                "",
            ]
            lines += ["| nprobe | recall@k | ms/query |", "|---:|---:|---:|"]
            lines += [
                f"| {p} | {v['recall_at_k']:.3f} | {v['ms_per_query']:.2f} |"
                for p, v in r["nprobe_sweep"].items()
            ]
    lines += [
        "",
        f"numpy = blocked `Q @ X.T` + `argpartition`, timed on {args.baseline_queries:,} query rows and scaled to N. "
        f"FAISS = index build (IVF: k-means training + adding) + search; the search is timed on at most "
        f"{args.max_queries:,} query rows and scaled to N (rows are independent). "
        f"IVF recall is measured against exact search on {args.recall_queries:,} sampled rows. "
        f"Reproduce: `python bench/mining.py` (flags: --sizes, --k, --nprobe, --max-queries, --faces).",
        "",
    ]
    (args.out / "mining.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
