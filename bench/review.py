"""Benchmark the review page at FFHQ-Ref size: 20k faces in 6.5k identities, in headless chromium.

Synthetic embeddings (identities of 1-6 faces around random centres, some near pairs) and tiny PNG
images stand in for a built root. Measures ``refface review`` (page data + thumbnails), the size of
``data.js``, and in chromium: load to first rendered page, next page, 50 identity steps with ``j``,
a filter change. Baseline: the same page on the shared photos' size (800 faces). Usage::

    python bench/review.py [--faces 20000] [--identities 6500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def synthetic_root(path: Path, faces: int, identities: int, seed: int = 0) -> Path:
    from PIL import Image

    from refface.manifests.atomic import write_parquet
    from refface.mining.cluster import identities_frame

    rng = np.random.default_rng(seed)
    dim = 128
    centres = rng.standard_normal((identities, dim)).astype(np.float32)
    labels = np.concatenate([np.arange(identities), rng.integers(0, identities, faces - identities)])
    labels.sort()
    vectors = centres[labels] + 0.12 * rng.standard_normal((faces, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [f"{i // 1000:05d}/{i:06d}.png" for i in range(faces)]
    images = path / "images"
    tile = np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((48, 48)))
    for p in paths:
        (images / p).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(images / p, compress_level=1)
    pd.DataFrame({"image_id": range(faces), "path": paths}).to_parquet(path / "images.parquet", index=False)
    np.save(path / "embeddings.npy", vectors)
    pd.DataFrame({"row": range(faces), "image_id": range(faces), "path": paths}).to_parquet(
        path / "embeddings.parquet", index=False
    )
    meta = {
        "model": "bench",
        "dim": dim,
        "fingerprint": "b" * 64,
        "metric": "cosine",
        "identity_threshold": 0.3,
    }
    (path / "embeddings.json").write_text(json.dumps(meta))
    (path / "build.json").write_text(
        json.dumps({"image_root": str(images), "config": {"identity_threshold": 0.3}})
    )
    sizes = np.bincount(labels)
    ident = np.where(sizes[labels] >= 2, labels, -1)
    write_parquet(path / "identities.parquet", identities_frame(paths, ident))
    return path


def browse(page: Path, profile: Path) -> dict:
    from common.cdp import Browser, find_chromium

    chromium = find_chromium()
    if chromium is None:
        return {"browser": "chromium not found"}
    out = {}
    with Browser(chromium, profile) as b:
        start = time.perf_counter()
        b.open(page.as_uri())
        out["load to first page (s)"] = round(time.perf_counter() - start, 3)
        out["rows rendered"] = b.eval("window.refface.status().rows")
        t = time.perf_counter()
        b.key("n")
        b.eval("window.refface.status()")
        out["next page (s)"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        for _ in range(50):
            b.key("j")
        b.eval("window.refface.status()")
        out["50 identity steps (s)"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        b.eval(
            "document.getElementById('f-min').value = 4; document.getElementById('f-min').dispatchEvent(new Event('change'))"
        )
        out["size filter (s)"] = round(time.perf_counter() - t, 3)
        out["identities after filter"] = b.eval("document.getElementById('page-info').textContent")
    return out


def run(faces: int, identities: int, work: Path) -> dict:
    from refface.review.data import ReviewConfig
    from refface.review.page import write_review

    root = synthetic_root(work / f"root-{faces}", faces, identities)
    start = time.perf_counter()
    summary = write_review(root, ReviewConfig(workers=2))
    first = time.perf_counter() - start
    start = time.perf_counter()
    write_review(root, ReviewConfig(workers=2))
    again = time.perf_counter() - start
    data_js = (root / "review" / "data.js").stat().st_size
    return {
        "faces": faces,
        "identities": summary["identities"],
        "possible same person pairs": summary["possible same person pairs"],
        "refface review, first (s)": round(first, 2),
        "refface review, rerun with thumbnails written (s)": round(again, 2),
        "data.js (MB)": round(data_js / 1e6, 2),
        **browse(root / "review" / "index.html", work / f"profile-{faces}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faces", type=int, default=20000)
    parser.add_argument("--identities", type=int, default=6500)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("REFFACE_PROGRESS", "0")
    work = Path(tempfile.mkdtemp(prefix="refface-bench-review-"))
    try:
        baseline = run(800, 260, work)
        result = run(args.faces, args.identities, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), headless chromium",
        "baseline": baseline,
        "result": result,
        "ratio load (result / baseline)": round(
            result.get("load to first page (s)", float("nan"))
            / baseline.get("load to first page (s)", float("nan")),
            2,
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "review.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Review page at FFHQ-Ref size",
        "",
        report["device"],
        "",
        f"| what | 800 faces (baseline) | {args.faces} faces |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {baseline.get(k, '')} | {v} |" for k, v in result.items()]
    lines += ["", f"load time ratio: {report['ratio load (result / baseline)']}"]
    (args.out / "review.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
