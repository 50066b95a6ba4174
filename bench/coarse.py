"""Coarse quantizer of the IVF index: exact (BLAS) centroid scan vs an HNSW graph over the centroids.

FAISS suggests an HNSW coarse quantizer (``IVF65536_HNSW32``) for large ``nlist``. The sharded
k-NN graph assigns every vector to its ``nprobe`` nearest lists twice (adding, searching), so
this is the cost that grows as N^1.5 on CPU. For each ``nlist`` (the power of two
``default_nlist`` gives at 4M, 67M and 1B faces) and the default ``nprobe = max(32, nlist/128)``,
both quantizers assign the same queries; printed: seconds, the ratio (flat / HNSW: above 1 means
HNSW is faster), HNSW's build time, and how many of the exact ``nprobe`` lists HNSW finds.

Centroids and queries are synthetic (decaying spectrum, like ``write_synthetic_shards``);
queries lie near a centroid, as vectors do near the centroid of their list.

    python bench/coarse.py [--nlists 4096,16384,65536] [--queries 20000]

Results: bench/results/coarse.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/scale.py

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run(nlist: int, n_queries: int, dim: int, ef_factors: tuple[int, ...], seed: int = 0) -> dict:
    import faiss

    rng = np.random.default_rng([seed, nlist])
    scale = ((1.0 + np.arange(dim)) ** -0.25).astype(np.float32)
    centroids = unit(rng.standard_normal((nlist, dim), dtype=np.float32) * scale)
    noise = rng.standard_normal((n_queries, dim), dtype=np.float32) * 0.03
    queries = unit(centroids[rng.integers(0, nlist, n_queries)] + noise)
    nprobe = max(32, nlist // 128)
    flat = faiss.IndexFlatIP(dim)
    flat.add(centroids)
    t0 = time.perf_counter()
    _, exact = flat.search(queries, nprobe)
    flat_s = time.perf_counter() - t0
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    t0 = time.perf_counter()
    hnsw.add(centroids)
    build_s = time.perf_counter() - t0
    out = {"nlist": nlist, "nprobe": nprobe, "queries": n_queries, "flat_s": round(flat_s, 3)}
    out["hnsw_build_s"] = round(build_s, 3)
    out["hnsw"] = []
    sample = min(2000, n_queries)
    for factor in ef_factors:
        hnsw.hnsw.efSearch = factor * nprobe
        t0 = time.perf_counter()
        _, found = hnsw.search(queries, nprobe)
        seconds = time.perf_counter() - t0
        overlap = np.mean(
            [np.intersect1d(a, b).size / nprobe for a, b in zip(exact[:sample], found[:sample], strict=True)]
        )
        out["hnsw"].append(
            {
                "ef_search": factor * nprobe,
                "seconds": round(seconds, 3),
                "flat_over_hnsw": round(flat_s / seconds, 2),
                "lists_found": round(float(overlap), 4),
                "top1_same": round(float(np.mean(exact[:, 0] == found[:, 0])), 4),
            }
        )
    return out


def to_markdown(report: dict) -> str:
    lines = [
        "# bench/coarse.py: IVF coarse quantizer, exact centroid scan vs HNSW32",
        "",
        f"Device: {report['device']}. Command: `{report['command']}`. {report['queries']:,} queries, D = {report['dim']}.",
        "",
        "| nlist | nprobe | flat s | HNSW efSearch | HNSW s | flat / HNSW | exact lists found | HNSW build s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        for h in r["hnsw"]:
            lines.append(
                f"| {r['nlist']:,} | {r['nprobe']} | {r['flat_s']} | {h['ef_search']} | {h['seconds']} | "
                f"{h['flat_over_hnsw']}x | {h['lists_found']} | {r['hnsw_build_s']} |"
            )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nlists", default="4096,16384,65536")
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ef-factors", default="1,2", help="efSearch as multiples of nprobe")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "coarse"))
    args = parser.parse_args()
    factors = tuple(int(f) for f in args.ef_factors.split(","))
    runs = []
    for nlist in (int(s) for s in args.nlists.split(",")):
        r = run(nlist, args.queries, args.dim, factors)
        runs.append(r)
        best = max(r["hnsw"], key=lambda h: h["flat_over_hnsw"])
        print(
            f"nlist {nlist:,} nprobe {r['nprobe']}: flat {r['flat_s']} s, HNSW {best['seconds']} s "
            f"(efSearch {best['ef_search']}) -> flat/HNSW {best['flat_over_hnsw']}x, lists found {best['lists_found']}",
            flush=True,
        )
    report = {
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "command": "python bench/coarse.py " + " ".join(sys.argv[1:]),
        "queries": args.queries,
        "dim": args.dim,
        "load_average": round(os.getloadavg()[0], 2),
        "runs": runs,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
