"""Faces per second for detection + embedding with dlib on CPU, on the shared labeled photos."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _photos_dir() -> Path:
    env = os.environ.get("REFFACE_SAMPLE_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "faces"]:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("shared face photos not found: set REFFACE_SAMPLE_DIR to a folder of face photos")


def bench_faces_per_second(n_images: int = 100, images_dir: str | os.PathLike | None = None) -> dict:
    """Time dlib detection (HOG + landmarks) and dlib ResNet embedding in one process.

    Images are spread evenly over the sorted folder listing (every source is represented) and
    decoded before timing starts, so the figure is detection + alignment + embedding only.

    Args:
        n_images: how many photos to time.
        images_dir: folder of photos (default: the shared labeled photos).

    Returns:
        dict with images, faces, detect_s, embed_s, seconds, faces_per_s, ms_per_face, device.
    """
    import numpy as np

    from refface.manifests.errors import ImageError
    from refface.manifests.io import list_images, read_image
    from refface.mining.detect import detect, make_detector
    from refface.mining.embed import make_embedder

    root = Path(images_dir) if images_dir else _photos_dir()
    paths = list_images(root)
    picks = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(n_images, len(paths)))]
    images = [read_image(root / p) for p in picks]
    detector, embedder = make_detector("dlib"), make_embedder("dlib")
    detect(detector, images[0])  # warm-up: first call pays one-off allocation costs

    t0 = time.perf_counter()
    crops = []
    for img in images:
        try:
            face = detect(detector, img).face
        except ImageError:
            continue
        crops.append(embedder.crop(img, face))
    t1 = time.perf_counter()
    embedder.embed_crops(crops)
    t2 = time.perf_counter()
    seconds = t2 - t0
    return {
        "images": len(images),
        "faces": len(crops),
        "detect_s": round(t1 - t0, 3),
        "embed_s": round(t2 - t1, 3),
        "seconds": round(seconds, 3),
        "faces_per_s": round(len(crops) / seconds, 2),
        "ms_per_face": round(1000 * seconds / max(len(crops), 1), 1),
        "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), 1 process",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-images", type=int, default=100, help="photos to time")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = parser.parse_args()
    result = bench_faces_per_second(args.n_images)
    print(
        f"dlib detection+embedding: {result['faces_per_s']} faces/s "
        f"({result['ms_per_face']} ms/face; detect {result['detect_s']} s, embed {result['embed_s']} s "
        f"for {result['faces']} faces) on {result['device']}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mining_faces.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    (args.out / "mining_faces.md").write_text(
        f"# dlib faces/s (detection + embedding)\n\n| what | value |\n|---|---|\n{rows}\n"
    )


if __name__ == "__main__":
    main()
