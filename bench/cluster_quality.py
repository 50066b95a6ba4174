"""Identity clustering quality as the photo pool grows: ``../shared/data/lfw_dev`` (2,902 people).

Mines the folder once with the default pipeline (dlib; cached under ``--cache``), then for pools of
``--sizes`` people (subsampled by identity, ``--seeds`` draws each; "all" = every person) runs the
default clustering and the anchors, and reports pairwise and BCubed precision/recall/F, reference
precision (share of target/reference pairs of the default reference rule that show the same
person), clusters vs identities and seconds. Anchors: connected components at the model's own
pairwise rule, average linkage at a fixed cut, and Chinese whispers / Infomap (published,
untrained face-clustering methods) on the k-NN graph.

``--half tune`` / ``--half holdout`` keep one of two fixed halves of the people (split by a hash of
the name): defaults are derived on the tuning half (and the shared photos) and reported on the
other, so no figure is measured on the set its parameters came from.

    python bench/cluster_quality.py                       # the recorded run (~15 min on 2 cores)
    python bench/cluster_quality.py --half holdout --name cluster_quality_holdout
    python bench/cluster_quality.py --method impostor --sizes all --seeds 1   # one method, one pool

Results: bench/results/<name>.json, .md and <name>.png (F against pool size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from refface.mining.tta import DEFAULT_TTA, TTA_MODES  # noqa: E402  (light: no numpy)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lfw_dev"
DEFAULT_CACHE = Path(os.environ.get("REFFACE_BENCH_CACHE", Path.home() / ".cache" / "refface-bench"))
DLIB_MODEL = "dlib_face_recognition_resnet_model_v1"

# name -> (method, threshold or None for the method's default, label)
RUNS = {
    "default": (None, None, "default"),
    "impostor_linkage": ("impostor_linkage", None, "impostor linkage alone (no second pass)"),
    "components": ("components", "rule", "components at the model's pairwise rule"),
    "average": ("average", 0.075, "average linkage, fixed cut 0.075"),
    "chinese_whispers": ("chinese_whispers", "rule", "Chinese whispers, k-NN graph at the model's rule"),
    "infomap": ("infomap", "rule", "Infomap, k-NN graph at the model's rule"),
}


def mine(data: Path, cache: Path, workers: int, tta: str = DEFAULT_TTA) -> Path:
    """The dlib-mined dataset root of ``data`` (``<name>_dlib``, or ``<name>_dlib_flip`` with
    ``--tta flip``), mined once: a finished root in the cache is reused as it is (delete it to mine
    again)."""
    from refface.mining.pipeline import MiningConfig, mine_folder

    root = cache / (f"{data.name}_dlib" + ("" if tta == "none" else f"_{tta}"))
    if not ((root / ".stages" / "mine.json").exists() and (root / "embeddings.json").exists()):
        mine_folder(data, root, MiningConfig(workers=workers, tta=tta))
    return root


def half_of(identity: str) -> str:
    """The fixed half a person belongs to: ``tune`` or ``holdout`` (hash of the name)."""
    return "tune" if hashlib.sha256(identity.encode()).digest()[0] % 2 == 0 else "holdout"


def load(root: Path, labels_csv: Path, half: str):
    """Embeddings of the labeled faces of ``half`` (all, tune or holdout) and their identities."""
    import pandas as pd

    from refface.manifests.embeddings import load_embeddings

    emb = load_embeddings(root)
    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    label_of = dict(zip(table["path"], table["identity"], strict=True))
    keep = [
        i
        for i, p in enumerate(emb.paths)
        if label_of.get(p, "") and (half == "all" or half_of(label_of[p]) == half)
    ]
    ids = np.array([label_of[emb.paths[i]] for i in keep])
    return emb, np.asarray(keep), ids


def pool(ids: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Rows of ``size`` people drawn at random (all rows when ``size`` is None or too large)."""
    people = np.unique(ids)
    if size is None or size >= people.size:
        return np.arange(ids.size)
    pick = np.random.default_rng(seed).choice(people, size, replace=False)
    return np.flatnonzero(np.isin(ids, pick))


def reference_precision(vectors, result, ids) -> dict:
    """Share of (target, reference) pairs of the default training reference rule that show one
    person (against labels), the impostor model's label-free estimate of it, and the pair count."""
    from refface.mining.references import (
        ReferenceConfig,
        estimated_reference_precision,
        select_references,
    )

    paths = [f"{i:06d}" for i in range(len(result.labels))]
    model = result.info.get("impostor_model")
    impostor = (result.scale, model["exponent"]) if model else None
    refs = select_references(
        paths, vectors, result.labels, "cosine", result.radius, ReferenceConfig(), impostor=impostor
    )
    pairs = [(t, r) for t, rs in refs.items() for r in rs]
    out = {"reference_precision": float("nan"), "reference_pairs": len(pairs)}
    if pairs:
        out["reference_precision"] = sum(ids[t] == ids[r] for t, r in pairs) / len(pairs)
    out["reference_precision_estimated"] = (
        estimated_reference_precision(refs, vectors, result.labels, *impostor)["estimate"]
        if impostor
        else float("nan")
    )
    return out


def attach_config(settings: list[str]):
    """The second pass's settings with ``NAME=VALUE`` overrides (numbers as the field's type)."""
    from dataclasses import fields

    from refface.mining.attach import AttachConfig

    types = {f.name: type(getattr(AttachConfig(), f.name)) for f in fields(AttachConfig)}
    overrides = {}
    for item in settings:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--attach {item}: unknown setting; choose one of {', '.join(types)}")
        overrides[name] = types[name](value)
    return AttachConfig(**overrides)


def run_one(emb, rows: np.ndarray, ids: np.ndarray, name: str, args) -> dict:
    from refface.manifests.embeddings import Embeddings
    from refface.mining import cluster as cl
    from refface.mining.metrics import score_labels

    method, threshold, _ = RUNS[name]
    sub = Embeddings(
        np.ascontiguousarray(emb.vectors[rows], dtype=np.float32),
        [emb.paths[i] for i in rows],
        emb.model,
        emb.fingerprint,
        emb.metric,
        emb.identity_threshold,
    )
    if threshold == "rule":
        threshold = cl.cosine_threshold(emb.identity_threshold, emb.metric)
    config = cl.ClusterConfig(
        method=method,
        threshold=threshold,
        k=args.k,
        max_false_merge=args.max_false_merge if method in (None, "impostor", "impostor_linkage") else None,
        second_pass=attach_config(args.attach),
    )
    config = cl.resolve_config(sub, config)
    start = time.perf_counter()
    result = cl.run_clustering(sub.vectors, config)
    seconds = time.perf_counter() - start
    s = score_labels(ids, result.labels)
    return {
        "pairwise_precision": s.pairwise_precision,
        "pairwise_recall": s.pairwise_recall,
        "pairwise_f": s.pairwise_f,
        "bcubed_precision": s.bcubed_precision,
        "bcubed_recall": s.bcubed_recall,
        "bcubed_f": s.bcubed_f,
        **reference_precision(sub.vectors, result, ids),
        "clusters": s.n_clusters,
        "identities": s.n_identities,
        "faces": s.n_items,
        "seconds": seconds,
    }


def summarize(values: list[dict]) -> dict:
    out = {}
    for key in values[0]:
        arr = np.array([v[key] for v in values], dtype=float)
        out[key] = round(float(np.nanmean(arr)), 4) if np.isfinite(arr).any() else float("nan")
        if len(values) > 1 and key in ("pairwise_f", "bcubed_f"):
            out[key + "_std"] = round(float(np.nanstd(arr)), 4)
    return out


def plot(results: dict, sizes: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r["identities"] for r in next(iter(results.values())).values()]
    for name, by_size in results.items():
        label = RUNS[name][2]
        for ax, key in zip(axes, ("pairwise_f", "bcubed_f"), strict=True):
            ys = [by_size[str(s)][key] for s in sizes]
            err = [by_size[str(s)].get(key + "_std", 0.0) for s in sizes]
            ax.errorbar(
                xs, ys, yerr=err, marker="o", capsize=3, label=label, lw=2 if name == "default" else 1
            )
    for ax, key in zip(axes, ("pairwise F", "BCubed F"), strict=True):
        ax.set(xscale="log", xlabel="people in the pool", ylabel=key, ylim=(0.0, 1.0))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labeled photo folder (labels.csv)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the mined root is kept")
    parser.add_argument("--workers", type=int, default=2, help="mining processes (first run only)")
    parser.add_argument(
        "--tta", choices=TTA_MODES, default=DEFAULT_TTA, help="embedder test-time augmentation"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="a mined root of --data to read instead of mining (e.g. bench/reembed_tta.py's)",
    )
    parser.add_argument("--sizes", default="500,1000,2000,all", help="people per pool; 'all' = everyone")
    parser.add_argument("--seeds", type=int, default=3, help="draws per pool size (1 for 'all')")
    parser.add_argument("--half", choices=("all", "tune", "holdout"), default="all")
    parser.add_argument("--method", action="append", choices=sorted(RUNS), help="runs (default: all)")
    parser.add_argument("--k", type=int, default=64, help="neighbours per face")
    parser.add_argument(
        "--max-false-merge", type=float, default=None, help="impostor's bound (default: the model's)"
    )
    parser.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a second-pass setting (a field of refface.mining.attach.AttachConfig, e.g. lone_spread=2.0); "
        "repeatable",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="cluster_quality", help="results file stem")
    args = parser.parse_args()
    os.environ.setdefault("REFFACE_PROGRESS", "0")

    args.data = args.data.resolve()
    root = args.root or mine(args.data, args.cache, args.workers, args.tta)
    emb, keep, ids = load(root, args.data / "labels.csv", args.half)
    n_people = int(np.unique(ids).size)
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
    sizes = [s for s in sizes if s is None or s < n_people] + ([None] if None not in sizes else [])
    sizes = list(dict.fromkeys(sizes))
    names = args.method or list(RUNS)
    results: dict[str, dict] = {}
    for name in names:
        results[name] = {}
        for size in sizes:
            seeds = range(1 if size is None else args.seeds)
            values = []
            for seed in seeds:
                rows = pool(ids, size, seed)
                values.append(run_one(emb, keep[rows], ids[rows], name, args))
            key = str(size or "all")
            results[name][key] = summarize(values)
            r = results[name][key]
            print(
                f"{name:17s} people={r['identities']:5.0f} pair P/R/F {r['pairwise_precision']:.4f}/"
                f"{r['pairwise_recall']:.4f}/{r['pairwise_f']:.4f} B3 F {r['bcubed_f']:.4f} "
                f"ref P {r['reference_precision']:.4f} clusters {r['clusters']:.0f} s {r['seconds']:.2f}",
                flush=True,
            )
    size_keys = [str(s or "all") for s in sizes]
    info = {
        "data": str(args.data),
        "half": args.half,
        "root": str(root),
        "tta": emb.tta,
        "people": n_people,
        "faces": int(len(ids)),
        "seeds": args.seeds,
        "k": args.k,
        "runs": {n: RUNS[n][2] for n in names},
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "load_average": round(os.getloadavg()[0], 2),
        "results": results,
    }
    for name in names:
        fs = [results[name][k]["pairwise_f"] for k in size_keys]
        info.setdefault("pairwise_f_range", {})[name] = round(max(fs) - min(fs), 4)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(info, indent=2) + "\n")
    cols = [
        ("pair P", "pairwise_precision"),
        ("pair R", "pairwise_recall"),
        ("pair F", "pairwise_f"),
        ("B3 P", "bcubed_precision"),
        ("B3 R", "bcubed_recall"),
        ("B3 F", "bcubed_f"),
        ("ref P", "reference_precision"),
        ("ref P est.", "reference_precision_estimated"),
        ("clusters", "clusters"),
        ("people", "identities"),
        ("s", "seconds"),
    ]
    lines = [
        f"# Identity clustering quality vs pool size ({args.data.name}, {args.half} people)",
        "",
        f"Command: `python bench/cluster_quality.py --half {args.half} --sizes {args.sizes} --seeds {args.seeds}"
        + f" --tta {emb.tta}"
        + "".join(f" --attach {a}" for a in args.attach)
        + (f" --max-false-merge {args.max_false_merge}" if args.max_false_merge else "")
        + f"`. {n_people} people, {len(ids)} faces (dlib, test-time augmentation {emb.tta}"
        + f"). Pools are drawn by person; figures are means over "
        f"{args.seeds} draws (one for the whole set). {info['device']}, load average {info['load_average']}.",
        "",
        "| clustering | pool | " + " | ".join(c for c, _ in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for name in names:
        for k in size_keys:
            r = results[name][k]
            vals = [
                f"{r[key]:.4f}"
                if key not in ("clusters", "identities", "seconds")
                else f"{r[key]:.0f}"
                if key != "seconds"
                else f"{r[key]:.2f}"
                for _, key in cols
            ]
            lines.append(f"| {RUNS[name][2]} | {k} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "Pairwise F range across pool sizes: "
        + ", ".join(f"{n} {v}" for n, v in info["pairwise_f_range"].items()),
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(results, size_keys, args.out / f"{args.name}.png", f"{args.data.name} ({args.half}): F vs pool size")


if __name__ == "__main__":
    main()
