"""k-NN graph + identity clustering of N synthetic 512-d face embeddings: time, peak memory, recall.

Each size runs in its own process (so its peak RSS is its own): synthetic identities written as
shards -> sharded FAISS k-NN (index chosen by size) -> held-out recall against exact search ->
sparse clustering (connected components and average linkage). The baseline is exact search:
its cost for all N rows is extrapolated from the exact search of the held-out sample, measured
in the same run. With two or more sizes the per-stage growth exponent is fitted and projected
to 10M.

    python bench/scale.py                         # 100k and 250k, IVF-PQ (~3-5 min on 2 cores)
    python bench/scale.py --sizes 250000,1000000  # the recorded run
    python bench/scale.py --sizes 10000000 --kind auto   # a GPU machine (FAISS GPU build)
"""

from __future__ import annotations

import os

# FAISS's OpenMP threads spin while waiting by default; on a shared or busy machine that makes
# PQ training 20x slower. Must be set before libgomp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def device() -> str:
    try:
        from refface.mining.neighbors import gpu_available

        if gpu_available():
            return f"GPU (FAISS GPU build), {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class AnonPeak:
    """Peak anonymous (heap) memory, sampled from /proc/self/status twice a second.

    Peak RSS also counts the pages of memory-mapped shards that were read: at 10M faces that is
    the whole 20 GB of vectors, page cache the kernel reclaims at will. The process's own memory
    is the anonymous part.
    """

    def __init__(self, every_s: float = 0.5):
        import threading

        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                return

    def stop_mb(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kb / 1024, 1) if self.peak_kb else None


def run_one(n: int, args: argparse.Namespace) -> dict:
    """One size, in this process: returns timings, peak memory, recall and cluster quality."""
    import numpy as np
    from synthetic import write_synthetic_shards

    from refface.mining.metrics import explode_singletons, pairwise_prf
    from refface.mining.sharded import cluster_sharded, sharded_knn

    work = Path(args.work) / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    out: dict = {"n": n, "dim": args.dim, "k": args.k, "threshold": args.threshold}
    # Wall times on a shared machine depend on what else runs: record the load beside them.
    out["load_average_start"] = round(os.getloadavg()[0], 2)
    anon = AnonPeak()
    t0 = time.perf_counter()
    shards, labels = write_synthetic_shards(work / "emb", n, args.dim, rows_per_shard=args.rows_per_shard)
    out["generate_s"] = round(time.perf_counter() - t0, 2)
    out["shards"] = shards.n_shards
    out["identities_multi"] = int((np.bincount(labels) > 1).sum())
    out["singleton_faces"] = int((np.bincount(labels)[labels] == 1).sum())
    t0 = time.perf_counter()
    result = sharded_knn(
        shards,
        work / "knn",
        k=args.k,
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        rerank=args.rerank,
        recall_sample=args.recall_sample,
        recall_radius=args.threshold,
        save_index=False,
    )
    out["knn_s"] = round(time.perf_counter() - t0, 2)
    out.update({f"knn_{k}": v for k, v in result.timings.items()})
    out["plan"] = {k: v for k, v in vars(result.plan).items()}
    out["recall"] = result.recall
    # Baseline: exact all-rows search, extrapolated from the exact search of the held-out sample
    # (its cost is linear in the query count).
    if result.recall:
        out["exact_all_rows_est_s"] = round(result.timings["recall_s"] * n / result.recall["sample"], 1)
        build_search = result.timings["build_s"] + result.timings["search_s"]
        out["speedup_vs_exact"] = round(out["exact_all_rows_est_s"] / build_search, 2)
    for method in ("components", "average"):
        t0 = time.perf_counter()
        pred = cluster_sharded(result, args.threshold, method, graph_factor=args.graph_factor)
        seconds = time.perf_counter() - t0
        p, r, f = pairwise_prf(labels, explode_singletons(pred))
        out[f"cluster_{method}"] = {
            "seconds": round(seconds, 2),
            "clusters": int(pred.max() + 1) if (pred >= 0).any() else 0,
            "pair_precision": round(p, 4),
            "pair_recall": round(r, 4),
            "pair_f": round(f, 4),
        }
    edges = result.edges(args.threshold)[0].size
    out["edges_below_threshold"] = int(edges)
    out["total_s"] = round(
        out["generate_s"]
        + out["knn_s"]
        + sum(out[f"cluster_{m}"]["seconds"] for m in ("components", "average")),
        2,
    )
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_anon_mb"] = anon.stop_mb()
    out["load_average_end"] = round(os.getloadavg()[0], 2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def growth(runs: list[dict], target: int = 10_000_000) -> dict:
    """Fit t = a * N^b between the smallest and largest run per stage; project to ``target``."""
    if len(runs) < 2:
        return {}
    lo, hi = runs[0], runs[-1]
    ratio = hi["n"] / lo["n"]
    model = {}
    for key in ("knn_build_s", "knn_search_s", "total_s", "peak_rss_mb"):
        a, b = lo.get(key), hi.get(key)
        if not a or not b:
            continue
        exp = math.log(b / a) / math.log(ratio)
        model[key] = {
            "exponent": round(exp, 2),
            f"projected_{target}": round(b * (target / hi["n"]) ** exp, 1),
        }
    return model


def to_markdown(report: dict) -> str:
    lines = [
        "# bench/scale.py: k-NN graph + clustering of synthetic 512-d face embeddings",
        "",
        f"Device: {report['device']}. Command: `{report['command']}`.",
        "",
        "| N | index | nlist/nprobe | build s | search s | recall@k | edge recall | exact est. s | "
        "speedup | components F | average F | cluster s (avg) | total s | peak RSS MB | peak anon MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        plan = r["plan"]
        lines.append(
            f"| {r['n']:,} | {plan['kind']} | {plan['nlist']}/{plan['nprobe']} | {r['knn_build_s']} | "
            f"{r['knn_search_s']} | {r['recall'].get('recall_at_k')} | {r['recall'].get('edge_recall')} | "
            f"{r.get('exact_all_rows_est_s')} | {r.get('speedup_vs_exact')}x | "
            f"{r['cluster_components']['pair_f']} | {r['cluster_average']['pair_f']} | "
            f"{r['cluster_average']['seconds']} | {r['total_s']} | {r['peak_rss_mb']} | "
            f"{r.get('peak_anon_mb', '-')} |"
        )
    if report.get("growth"):
        lo, hi = report["runs"][0]["n"], report["runs"][-1]["n"]
        head = f"Growth fitted as t = a * N^b between N = {lo:,} and {hi:,}"
        lines += ["", head + (":" if hi == 10_000_000 else ", projected to 10M:"), ""]
        for key, g in report["growth"].items():
            at = "" if hi == 10_000_000 else f", projected {g['projected_10000000']}"
            lines.append(f"- {key}: exponent {g['exponent']}{at}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,250000", help="comma-separated N values")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=16, help="neighbours per face")
    parser.add_argument("--threshold", type=float, default=0.4, help="cosine distance of 'same identity'")
    parser.add_argument("--graph-factor", type=float, default=1.5, help="average linkage graph radius factor")
    parser.add_argument(
        "--kind",
        default="ivf_pq",
        help="index: ivf_pq (the CPU scale path), auto (by size/memory/GPU), flat or ivf_flat",
    )
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--rerank", type=int, default=2, help="IVF-PQ candidates per neighbour")
    parser.add_argument("--recall-sample", type=int, default=1000)
    parser.add_argument("--rows-per-shard", type=int, default=250_000)
    parser.add_argument("--work", default="/tmp/refface-scale", help="scratch folder for shards")
    parser.add_argument("--keep", action="store_true", help="keep the shards and k-NN parts")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale"))
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args)))
        return {}
    runs: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in sorted(int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n)] + [a for a in (argv or sys.argv[1:])]
        print(f"N={n:,} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"size {n} failed")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"  index {run['plan']['kind']} build {run['knn_build_s']}s search {run['knn_search_s']}s "
            f"edge recall {run['recall'].get('edge_recall')} recall@k {run['recall'].get('recall_at_k')} "
            f"speedup vs exact {run.get('speedup_vs_exact')}x total {run['total_s']}s peak {run['peak_rss_mb']} MB",
            flush=True,
        )
        # Written after every size, so a long run that is stopped keeps what it measured.
        report = {
            "device": device(),
            "command": "python bench/scale.py " + " ".join(argv or sys.argv[1:]),
            "runs": runs,
            "growth": growth(runs),
        }
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
