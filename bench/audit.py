"""Leakage audit speed: FAISS audit of a large vs a small synthetic embedding set, against brute-force numpy.

Synthetic identities (unit centres plus noise, so same-identity pairs sit above the bar and others
far below) give a base set and a query set that share a fraction of identities. The figure is the
wall time of the whole embedding audit (pair search, classification, histogram samples) and of the
pair search alone; the baseline is the same all-pairs threshold search done by blocked numpy matmul,
measured in the same run, with its pairs checked equal to the FAISS pairs.

    .venv/bin/python bench/audit.py [--base 100000] [--query 10000] [--dim 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("REFFACE_PROGRESS", "0")

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_sets(n_base: int, n_query: int, dim: int, per_id: int, shared: float, seed: int):
    """Two unit-vector sets; ``shared`` of the query identities also appear in the base set."""
    rng = np.random.default_rng(seed)
    n_base_ids = n_base // per_id
    n_query_ids = n_query // per_id
    n_shared = int(round(shared * n_query_ids))
    centres = rng.standard_normal((n_base_ids + n_query_ids, dim)).astype(np.float32)
    base_ids = np.repeat(np.arange(n_base_ids), per_id)[:n_base]
    query_id_pool = np.concatenate([np.arange(n_shared), n_base_ids + np.arange(n_query_ids - n_shared)])
    query_ids = np.repeat(query_id_pool, per_id)[:n_query]
    # Noise per coordinate of 0.35 puts same-identity cosine near 0.9 and unrelated pairs near 0.
    noise = 0.35

    def draw(ids):
        v = centres[ids] + noise * rng.standard_normal((len(ids), dim)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    return draw(base_ids), base_ids, draw(query_ids), query_ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=int, default=100_000, help="images in the large set")
    parser.add_argument("--query", type=int, default=10_000, help="images in the small set")
    parser.add_argument("--dim", type=int, default=128, help="embedding size (128 dlib, 512 ArcFace)")
    parser.add_argument("--per-id", type=int, default=5, help="images per synthetic identity")
    parser.add_argument(
        "--shared", type=float, default=0.3, help="fraction of query identities in the base set"
    )
    parser.add_argument("--threshold", type=float, default=0.4, help="identity bar, cosine distance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cluster-scale",
        type=float,
        default=0.2,
        help="the cluster-rule audit (k-NN graph + average linkage over both sets) runs on this fraction "
        "of the sizes, to keep the default run short; 1 = full size",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "audit.json")
    args = parser.parse_args(argv)

    import faiss

    from refface.audit.config import AuditConfig, AuditSet
    from refface.audit.run import run_audit
    from refface.audit.search import brute_force_pairs, embedding_pairs

    load_before = round(os.getloadavg()[0], 2)
    base, base_ids, query, query_ids = synthetic_sets(
        args.base, args.query, args.dim, args.per_id, args.shared, args.seed
    )
    model = {
        "model": "synthetic",
        "fingerprint": "synthetic",
        "metric": "cosine",
        "identity_threshold": args.threshold,
    }
    min_dot = 1.0 - args.threshold

    def as_set(name, v):
        return AuditSet(
            name,
            "synthetic",
            "memory",
            [f"{name}{i}" for i in range(len(v))],
            [None] * len(v),
            v,
            np.arange(len(v)),
            model,
        )

    audits = {}
    nb_c, nq_c = int(args.base * args.cluster_scale), int(args.query * args.cluster_scale)
    for rule, nb, nq in (("pair", args.base, args.query), ("cluster", nb_c, nq_c)):
        config = AuditConfig(hash_images=False, workers=1, identity_rule=rule)
        start = time.perf_counter()
        result = run_audit([as_set("base", base[:nb]), as_set("query", query[:nq])], config)
        audits[rule] = (time.perf_counter() - start, result.summary["pairs"]["base~query"])

    start = time.perf_counter()
    r1, c1, _, _ = embedding_pairs(query, base, min_dot)
    faiss_s = time.perf_counter() - start
    start = time.perf_counter()
    r2, c2, _ = brute_force_pairs(query, base, min_dot)
    numpy_s = time.perf_counter() - start
    start = time.perf_counter()
    r3, c3, _, _ = embedding_pairs(query, base, min_dot, index="ivf")
    ivf_s = time.perf_counter() - start

    faiss_pairs = set(zip(r1.tolist(), c1.tolist(), strict=True))
    numpy_pairs = set(zip(r2.tolist(), c2.tolist(), strict=True))
    agree = len(faiss_pairs & numpy_pairs) / max(1, len(numpy_pairs | faiss_pairs))
    ivf_recall = len(set(zip(r3.tolist(), c3.tolist(), strict=True)) & numpy_pairs) / max(1, len(numpy_pairs))
    truth = int(np.isin(query_ids, base_ids).sum())
    truth_c = int(np.isin(query_ids[:nq_c], base_ids[:nb_c]).sum())
    pair_s, pair_stats = audits["pair"]
    cluster_s, cluster_stats = audits["cluster"]
    out = {
        "bench": "audit",
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "faiss": faiss.__version__,
        # Other work on the machine skews single timings; the ratios are measured side by side.
        "load_average_1min": [load_before, round(os.getloadavg()[0], 2)],
        "base": args.base,
        "query": args.query,
        "dim": args.dim,
        "identity_threshold_cosine_distance": args.threshold,
        "audit_pair_rule_seconds": round(pair_s, 3),
        "audit_cluster_rule_seconds": round(cluster_s, 3),
        "audit_cluster_rule_sizes": [nb_c, nq_c],
        "query_images_with_shared_identity_cluster_sizes": truth_c,
        "pair_search_faiss_seconds": round(faiss_s, 3),
        "pair_search_numpy_seconds": round(numpy_s, 3),
        "speedup_numpy_over_faiss": round(numpy_s / faiss_s, 2) if faiss_s > 0 else None,
        "pair_search_faiss_ivf_seconds": round(ivf_s, 3),
        "speedup_numpy_over_faiss_ivf": round(numpy_s / ivf_s, 2) if ivf_s > 0 else None,
        "ivf_pair_recall": round(ivf_recall, 6),
        "pairs_found": len(faiss_pairs),
        "pairs_agreement_with_numpy": round(agree, 6),
        "leaked_query_images_pair_rule": pair_stats["leaked_images"]["query"],
        "leaked_query_images_cluster_rule": cluster_stats["leaked_images"]["query"],
        "query_images_with_shared_identity": truth,
        "leaked_identities_cluster_rule": cluster_stats["leaked_identities"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from refface.manifests.atomic import write_json, write_text

    write_json(args.out, out)
    md = [
        "# bench/audit.py",
        "",
        f"Device: {out['device']}; faiss {out['faiss']}; {args.base:,} vs {args.query:,} synthetic {args.dim}-d embeddings; "
        f"1-min load average before/after: {out['load_average_1min']}.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| whole audit, `--identity-rule pair` (pair search, classification, histograms) | {out['audit_pair_rule_seconds']} |",
        f"| whole audit, `--identity-rule cluster` (default; clusters both sets together), {nb_c:,} vs {nq_c:,} "
        f"| {out['audit_cluster_rule_seconds']} |",
        f"| pair search, FAISS exact (`index=auto` -> flat below 1M) | {out['pair_search_faiss_seconds']} |",
        f"| pair search, FAISS IVF (`index=ivf`, nprobe 32) | {out['pair_search_faiss_ivf_seconds']} |",
        f"| pair search, brute-force numpy (blocked matmul, baseline) | {out['pair_search_numpy_seconds']} |",
        "",
        f"numpy / FAISS-exact time ratio: **{out['speedup_numpy_over_faiss']}x** (pairs agree: "
        f"{out['pairs_agreement_with_numpy']}); numpy / FAISS-IVF: **{out['speedup_numpy_over_faiss_ivf']}x** "
        f"at pair recall {out['ivf_pair_recall']}. Pairs found {out['pairs_found']:,}; leaked query images "
        f"{out['leaked_query_images_pair_rule']:,} of {truth:,} (pair rule) and "
        f"{out['leaked_query_images_cluster_rule']:,} of {truth_c:,} (cluster rule) that share an identity "
        "with the base set.",
        "",
    ]
    write_text(args.out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()
