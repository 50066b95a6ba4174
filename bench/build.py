"""Benchmark ``refface build ffhq-ref``: per-stage time for N images and images/s against pure decode.

Decoding the same files is the floor a build can approach (every image must be read once), so the
figure to watch is build images/s divided by decode images/s. Usage::

    python bench/build.py --images ../shared/data/faces --n 200 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _decode(paths: list[str]) -> int:
    from refface.manifests.io import read_image

    for p in paths:
        read_image(p)
    return len(paths)


def decode_rate(files: list[str], workers: int) -> float:
    """Images/s of plain decoding (EXIF + RGB conversion) with ``workers`` processes."""
    import multiprocessing as mp

    if workers <= 1:
        start = time.perf_counter()
        _decode(files)
        return len(files) / (time.perf_counter() - start)
    chunks = [files[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        # Warm the workers first: the figure is decoding, not interpreter start-up.
        list(pool.map(_decode, [[]] * workers))
        start = time.perf_counter()
        list(pool.map(_decode, chunks))
        return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--n", type=int, default=200, help="number of images (first N in path order)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--detector", default="dlib", help="dlib for photos; prealigned for FFHQ crops")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="build", help="results file stem (bench/results/<name>.json/.md)")
    args = parser.parse_args()
    os.environ.setdefault("REFFACE_PROGRESS", "0")

    from refface.builders.ffhq_ref import FFHQRefConfig, build_ffhq_ref
    from refface.manifests.io import list_images

    chosen = list_images(args.images)[: args.n]
    work = Path(tempfile.mkdtemp(prefix="refface-bench-build-"))
    try:
        images = work / "images"
        for rel in chosen:
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(args.images / rel, images / rel)
        files = [str(images / rel) for rel in chosen]
        decode_1 = decode_rate(files, 1)
        decode_w = decode_rate(files, args.workers)

        config = FFHQRefConfig(detector=args.detector, workers=args.workers)
        start = time.perf_counter()
        summary = build_ffhq_ref(images, work / "root", config)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        build_ffhq_ref(images, work / "root", config)
        rerun_s = time.perf_counter() - start
        stages = json.loads((work / "root" / "build.json").read_text())["timings"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    build_rate = len(chosen) / build_s
    decode_best = max(decode_1, decode_w)
    result = {
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "images": len(chosen),
        "workers": args.workers,
        "detector": args.detector,
        "embedder": config.embedder,
        "build_seconds": round(build_s, 2),
        "build_images_per_s": round(build_rate, 2),
        "decode_images_per_s_1_worker": round(decode_1, 1),
        f"decode_images_per_s_{args.workers}_workers": round(decode_w, 1),
        "build_vs_decode_ratio": round(build_rate / decode_best, 4),
        "rerun_seconds_no_work": round(rerun_s, 2),
        "stage_seconds": stages,
        "summary": {k: v for k, v in summary.items() if k != "root"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = [
        "# bench/build.py",
        "",
        f"{result['device']}; {len(chosen)} images of the shared photos; detector {args.detector}, "
        f"embedder {config.embedder}, {args.workers} workers.",
        "",
        "| what | value |",
        "|---|---|",
        f"| build (fresh) | {build_s:.1f} s = {build_rate:.2f} images/s |",
        f"| pure decode, 1 worker | {decode_1:.1f} images/s |",
        f"| pure decode, {args.workers} workers | {decode_w:.1f} images/s |",
        f"| build / best decode | {build_rate / decode_best:.4f} |",
        f"| rerun (every stage skipped) | {rerun_s:.2f} s |",
    ]
    lines += [f"| stage `{k}` | {v} s |" for k, v in stages.items()]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
