"""What test-time augmentation of the dlib embedder buys and costs: plain chip vs flipped-chip average
vs dlib's jitter average, on a labeled subset of ``../shared/data/lfw_dev``.

Faces are detected and aligned once (chips cached under ``--cache``); each variant then embeds the
same chips. Reported per variant: faces/s of detection + embedding (the detection time is shared),
the separation of same-person and stranger pairs (true-accept rate at a false-accept rate of
1e-3 and 1e-4 over every pair of the subset, equal error rate) and the default clustering's
pairwise/BCubed F on the subset.

    python bench/embed_tta.py [--identities 150] [--singletons 150] [--jitters 10] [--cache DIR]

Results: bench/results/embed_tta.json and .md.
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
DLIB_MODEL = "dlib_face_recognition_resnet_model_v1"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lfw_dev"


def subset(labels_csv: Path, n_multi: int, n_single: int, seed: int = 0):
    """Paths and identities: ``n_multi`` people with 2+ photos (all their photos) and ``n_single`` singletons."""
    import pandas as pd

    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    counts = table["identity"].value_counts()
    rng = np.random.default_rng(seed)
    multi = counts.index[counts > 1].to_numpy()
    single = counts.index[counts == 1].to_numpy()
    pick = set(rng.choice(multi, min(n_multi, multi.size), replace=False)) | set(
        rng.choice(single, min(n_single, single.size), replace=False)
    )
    chosen = table[table["identity"].isin(pick)].sort_values("path")
    return chosen["path"].tolist(), chosen["identity"].to_numpy()


def chips(data: Path, paths: list[str], cache: Path) -> tuple[np.ndarray, list[int], float]:
    """150x150 dlib chips of the kept face of each photo (cached); returns chips, kept rows, seconds."""
    import hashlib

    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    key = cache / f"chips-{digest}.npz"
    if key.exists():
        z = np.load(key)
        return z["chips"], z["rows"].tolist(), float(z["seconds"])
    from refface.manifests.errors import ImageError
    from refface.manifests.io import read_image
    from refface.mining.detect import detect, make_detector
    from refface.mining.embed import make_embedder

    detector, embedder = make_detector("dlib"), make_embedder("dlib")
    out, rows = [], []
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        img = read_image(data / p)
        try:
            face = detect(detector, img).face
        except ImageError:
            continue
        out.append(embedder.crop(img, face))
        rows.append(i)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    arr = np.stack(out)
    np.savez(key, chips=arr, rows=np.array(rows), seconds=seconds)
    return arr, rows, seconds


def embed(chip_arr: np.ndarray, variant: str, jitters: int) -> tuple[np.ndarray, float]:
    """Unit descriptors of the chips for one variant, and the seconds it took."""
    import dlib

    from refface.mining.detect import dlib_model_file
    from refface.mining.embed import DlibEmbedder, l2_normalize

    net = dlib.face_recognition_model_v1(str(dlib_model_file(DlibEmbedder.FILE)))
    batch = [np.ascontiguousarray(c) for c in chip_arr]
    t0 = time.perf_counter()
    if variant == "plain":
        raw = np.array([np.array(v) for v in net.compute_face_descriptor(batch)])
    elif variant == "flip":
        flipped = [np.ascontiguousarray(c[:, ::-1]) for c in chip_arr]
        a = np.array([np.array(v) for v in net.compute_face_descriptor(batch)])
        b = np.array([np.array(v) for v in net.compute_face_descriptor(flipped)])
        raw = a + b
    elif variant == "jitter":
        dlib.set_rand_seed(0) if hasattr(dlib, "set_rand_seed") else None
        raw = np.array([np.array(net.compute_face_descriptor(c, jitters)) for c in batch])
    else:
        raise ValueError(variant)
    seconds = time.perf_counter() - t0
    return l2_normalize(raw)[0], seconds


def separation(x: np.ndarray, y: np.ndarray) -> dict:
    """TAR at FAR 1e-3 / 1e-4 and the EER over every pair."""
    iu = np.triu_indices(len(x), 1)
    dist = (1.0 - x @ x.T)[iu]
    same = (y[:, None] == y[None, :])[iu]
    gen, imp = np.sort(dist[same]), np.sort(dist[~same])
    out = {"genuine_pairs": int(gen.size), "impostor_pairs": int(imp.size)}
    for far in (1e-3, 1e-4):
        cut = imp[max(0, int(far * imp.size) - 1)]
        out[f"tar_at_far_{far:g}"] = round(float((gen < cut).mean()), 4)
    grid = np.linspace(0, 0.3, 3001)
    frr = np.searchsorted(gen, grid, side="left") / gen.size
    far_ = np.searchsorted(imp, grid, side="left") / imp.size
    j = int(np.argmin(np.abs((1 - frr) - far_)))
    out["eer"] = round(float((far_[j] + (1 - frr[j])) / 2), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--identities", type=int, default=100, help="people with 2+ photos")
    parser.add_argument("--singletons", type=int, default=100)
    parser.add_argument("--jitters", type=int, default=10, help="dlib jitter count")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("REFFACE_BENCH_CACHE", "/tmp/refface-bench"))
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    from refface.manifests.embeddings import Embeddings
    from refface.mining.cluster import cluster
    from refface.mining.embed import DLIB_THRESHOLD
    from refface.mining.metrics import score_labels

    paths, ids = subset(args.data / "labels.csv", args.identities, args.singletons)
    chip_arr, rows, detect_s = chips(args.data, paths, args.cache / "embed_tta")
    y = ids[rows]
    n = len(rows)
    detect_per_face = detect_s / n
    results = {}
    for variant in ("plain", "flip", "jitter"):
        x, seconds = embed(chip_arr, variant, args.jitters)
        per_face = seconds / n
        sep = separation(x, y)
        s = score_labels(
            y, cluster(Embeddings(x, [str(i) for i in range(n)], DLIB_MODEL, "", "cosine", DLIB_THRESHOLD))
        )
        results[variant] = {
            "embed_ms_per_face": round(1000 * per_face, 1),
            "faces_per_s_with_detection": round(1.0 / (detect_per_face + per_face), 2),
            **sep,
            "pairwise_f": round(s.pairwise_f, 4),
            "bcubed_f": round(s.bcubed_f, 4),
        }
        print(variant, results[variant], flush=True)
    info = {
        "faces": n,
        "identities": int(np.unique(y).size),
        "jitters": args.jitters,
        "detect_ms_per_face": round(1000 * detect_per_face, 1),
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), 1 process",
        "load_average": round(os.getloadavg()[0], 2),
        "variants": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embed_tta.json").write_text(json.dumps(info, indent=2) + "\n")
    keys = list(next(iter(results.values())))
    lines = [
        "# dlib embedding test-time augmentation (bench/embed_tta.py)",
        "",
        f"{n} faces of {info['identities']} people from lfw_dev; detection {info['detect_ms_per_face']} ms/face; "
        f"{info['device']}, load average {info['load_average']}.",
        "",
        "| variant | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, r in results.items():
        label = f"jitter {args.jitters}" if name == "jitter" else name
        lines.append(f"| {label} | " + " | ".join(str(r[k]) for k in keys) + " |")
    (args.out / "embed_tta.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
