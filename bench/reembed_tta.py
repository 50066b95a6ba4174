"""Re-embed a dlib-mined dataset root under ``--tta flip``, reusing the root's own detections.

A whole ``refface embed --tta flip`` of ``../shared/data/lfw_dev`` repeats the HOG detection of
every photo (the plain mining took 55 min on 2 shared cores). The flip average only needs each
face's dlib chip and its mirror, so this script rebuilds the chip from the recorded box (dlib's
5-point predictor on the box, as the detector does), checks the rebuilt 68-point landmarks against
the recorded ones (a photo that does not match is detected again), embeds the mirrored chips and
averages them with the recorded plain vectors exactly as :func:`refface.mining.embed.flip_average`
does in the pipeline. Every ``--check-every``-th face is also embedded plain again and compared with
the recorded vector, so the figures say how exactly the chips were rebuilt.

    python bench/reembed_tta.py <plain root> <flip root> \\
        --images ../shared/data/lfw_dev --workers 2

The output root holds embeddings.npy/.parquet/.json (``"tta": "flip"``) plus copies of the
source's images.parquet and faces.parquet; bench/cluster_quality.py reads it with ``--root``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_W: dict = {}


def _init(images: str) -> None:
    import dlib

    from refface.mining.detect import DlibDetector, dlib_model_file
    from refface.mining.embed import DlibEmbedder

    _W["images"] = Path(images)
    _W["p68"] = dlib.shape_predictor(str(dlib_model_file("shape_predictor_68_face_landmarks.dat")))
    _W["p5"] = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    _W["detector"] = DlibDetector()
    _W["embedder"] = DlibEmbedder()


def _chip(row: dict):
    """(plain chip, whether the recorded landmarks were rebuilt exactly, detected again)."""
    import dlib

    from refface.manifests.io import decode_image
    from refface.mining.detect import Face, detect

    img = decode_image((_W["images"] / row["path"]).read_bytes())
    x0, y0, x1, y1 = (int(round(v)) for v in (row["x0"], row["y0"], row["x1"], row["y1"]))
    rect = dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
    arr = np.ascontiguousarray(img)
    pts = np.array([[p.x, p.y] for p in _W["p68"](arr, rect).parts()], dtype=np.float64)
    lm = np.stack([pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]])
    recorded = np.asarray(row["lm"], dtype=np.float64).reshape(5, 2)
    if np.abs(lm - recorded).max() < 1e-4:
        p5 = np.array([[p.x, p.y] for p in _W["p5"](arr, rect).parts()], dtype=np.float64)
        face = Face(bbox=np.array([x0, y0, x1, y1], float), score=0.0, landmarks=lm, dlib_points=p5)
        return _W["embedder"].crop(img, face), True, False
    face = detect(_W["detector"], img, "largest_central").face
    return _W["embedder"].crop(img, face), False, True


def _work(args) -> dict:
    rows, check = args
    chips, exact, redetected, plain_idx = [], 0, 0, []
    for i, row in enumerate(rows):
        chip, ok, again = _chip(row)
        chips.append(chip)
        exact += ok
        redetected += again
        if row["check"]:
            plain_idx.append(i)
    t0 = time.perf_counter()
    mirrored, _ = _W["embedder"].embed_crops([np.ascontiguousarray(c[:, ::-1]) for c in chips])
    seconds = time.perf_counter() - t0
    plain, _ = _W["embedder"].embed_crops([chips[i] for i in plain_idx])
    return {
        "mirrored": mirrored,
        "plain_checked": plain,
        "plain_idx": plain_idx,
        "exact": exact,
        "redetected": redetected,
        "mirror_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="a dlib-mined dataset root (plain embeddings)")
    parser.add_argument("out", type=Path, help="where the flip-embedded root goes")
    parser.add_argument(
        "--images", type=Path, required=True, help="the photo folder the source was mined from"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first n faces (a quick look)")
    parser.add_argument(
        "--check-every", type=int, default=10, help="re-embed every n-th face plain as a check"
    )
    args = parser.parse_args()

    import pandas as pd

    from refface.manifests.embeddings import Embeddings, load_embeddings, save_embeddings
    from refface.mining.embed import flip_average

    emb = load_embeddings(args.source)
    if args.limit:
        emb.vectors, emb.paths = emb.vectors[: args.limit], emb.paths[: args.limit]
        emb.image_ids = emb.image_ids[: args.limit] if emb.image_ids is not None else None
        emb.norms = emb.norms[: args.limit] if emb.norms is not None else None
    faces = pd.read_parquet(args.source / "faces.parquet").set_index("path")
    rows = []
    for n, p in enumerate(emb.paths):
        f = faces.loc[p]
        rows.append(
            {
                "path": p,
                "x0": f["x0"],
                "y0": f["y0"],
                "x1": f["x1"],
                "y1": f["y1"],
                "lm": list(f["lm"]),
                "check": n % args.check_every == 0,
            }
        )
    chunks = [(rows[i : i + args.chunk], True) for i in range(0, len(rows), args.chunk)]
    start = time.perf_counter()
    with Pool(args.workers, initializer=_init, initargs=(str(args.images),)) as pool:
        parts = []
        for k, part in enumerate(pool.imap(_work, chunks)):
            parts.append(part)
            if k % 10 == 0:
                print(
                    f"{(k + 1) * args.chunk}/{len(rows)} faces, {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    wall = time.perf_counter() - start
    mirrored = np.concatenate([p["mirrored"] for p in parts])
    diffs = []
    for ci, part in enumerate(parts):
        for j, i in enumerate(part["plain_idx"]):
            diffs.append(float(np.abs(part["plain_checked"][j] - emb.vectors[ci * args.chunk + i]).max()))
    vectors = flip_average(emb.vectors, mirrored)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("images.parquet", "faces.parquet", "errors.csv", "errors.parquet"):
        if (args.source / name).exists():
            shutil.copy2(args.source / name, args.out / name)
    out = Embeddings(
        vectors,
        emb.paths,
        emb.model,
        emb.fingerprint,
        emb.metric,
        emb.identity_threshold,
        emb.image_ids,
        emb.norms,
    )
    save_embeddings(args.out, out)
    meta = json.loads((args.out / "embeddings.json").read_text())
    meta["tta"] = "flip"
    (args.out / "embeddings.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    report = {
        "source": str(args.source),
        "faces": len(rows),
        "landmarks_rebuilt_exactly": int(sum(p["exact"] for p in parts)),
        "detected_again": int(sum(p["redetected"] for p in parts)),
        "plain_checked": len(diffs),
        "plain_check_max_abs_diff": max(diffs) if diffs else None,
        "plain_check_over_1e-4": int(sum(d > 1e-4 for d in diffs)),
        "mirror_embed_seconds_per_face": sum(p["mirror_seconds"] for p in parts) / len(rows),
        "wall_seconds": round(wall, 1),
        "workers": args.workers,
        "load_average": round(os.getloadavg()[0], 2),
    }
    (args.out / "reembed_tta.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
