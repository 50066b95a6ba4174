"""Degradation speed per core at 512×512: refface's degrader vs BasicSR's functions on the same params.

For each preset and pass, every image gets one parameter draw; both sides run on the same image
with the same parameters, interleaved image by image so machine load hits both alike. After an
untimed warm-up, each pass gives a ratio (wall clock, and CPU time of the calling thread); the
medians over passes are reported. BasicSR draws its noise with ``np.random.randn`` as in
training; the pixel comparison reruns it untimed with our noise realization. Checks that
blur+downsample agree within one grey level everywhere and that the final LQ is at PSNR ≥ 45 dB
against BasicSR's, and times the torch batch path. Results: bench/results/degrade.json and .md.

    .venv/bin/python bench/degrade.py [--images 24] [--repeats 5] [--presets refldm-severe refldm-moderate]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_images(n: int, size: int) -> tuple[list[np.ndarray], str]:
    """The first ``n`` shared face photos at ``size``², else synthetic images."""
    from refface.degradations import get_preset, prepare_input
    from refface.manifests.io import read_image

    cfg = get_preset("refldm-severe", out_size=size)
    root = Path(os.environ.get("REFFACE_SAMPLE_DIR", REPO.parent / "shared" / "data" / "faces"))
    if (root / "labels.csv").exists():
        import pandas as pd

        paths = pd.read_csv(root / "labels.csv", dtype=str)["path"].tolist()
        step = max(1, len(paths) // n)
        return [prepare_input(read_image(root / p), cfg)[0] for p in paths[::step][:n]], str(root)
    rng = np.random.default_rng(0)
    imgs = [cv2.resize(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (size, size)) for _ in range(n)]
    return imgs, "synthetic"


def bench_preset(bsr, images: list[np.ndarray], preset: str, repeats: int, tolerance: float) -> dict:
    """Both sides on the same images and params, interleaved; one ratio per pass, medians reported.

    Each pass draws new parameters for every image. Wall-clock time is what a user waits for;
    the calling thread's CPU time (``time.thread_time``, one thread per side) is the work per
    core and stays meaningful when other jobs share the cores.
    """
    from refface.degradations import Degrader, apply_params, ops
    from refface.degradations.kernels import make_kernel
    from refface.degradations.reference import basicsr_blur_downsample, basicsr_degrade

    degrader = Degrader(preset, seed=0)
    np.random.seed(0)  # BasicSR draws its noise from NumPy's global generator
    # Untimed warm-up of both sides (first-call costs: allocator, BLAS and DFT set-up, caches).
    for i, img in enumerate(images[:4]):
        params = degrader.sample(f"warmup-{i}")
        apply_params(img, params, fast=True, tolerance=tolerance)
        basicsr_degrade(bsr, img, params, own_noise=True)
    passes = []
    worst_level, psnrs, routes = 0.0, [], {}
    for r in range(repeats):
        ours_s = theirs_s = ours_cpu = theirs_cpu = 0.0
        for i, img in enumerate(images):
            params = degrader.sample(f"bench-{r}-{i}")
            c0, t0 = time.thread_time(), time.perf_counter()
            ours = apply_params(img, params, fast=True, tolerance=tolerance)
            c1, t1 = time.thread_time(), time.perf_counter()
            basicsr_degrade(bsr, img, params, own_noise=True)
            c2, t2 = time.thread_time(), time.perf_counter()
            ours_s, theirs_s = ours_s + t1 - t0, theirs_s + t2 - t1
            ours_cpu, theirs_cpu = ours_cpu + c1 - c0, theirs_cpu + c2 - c1
            # Untimed: BasicSR again with our noise realization, for the pixel comparison.
            theirs = basicsr_degrade(bsr, img, params)
            psnrs.append(ops.psnr(ours, theirs))
            h, w = img.shape[:2]
            kernel = make_kernel(params, params["kernel_size"])
            size = ops.lq_size(w, h, params["scale"])
            p, _, _ = ops.separable_pieces(kernel, tolerance / 255.0)
            route = ops.choose_route(img.shape, size, *p.shape)
            routes[route] = routes.get(route, 0) + 1
            fused = ops.blur_downsample(img, kernel, size, tolerance)
            reference = basicsr_blur_downsample(bsr, img, params)
            worst_level = max(worst_level, float(np.abs(fused[:, :, ::-1] - reference).max() * 255))
        n = len(images)
        passes.append(
            {
                "ours_images_per_s": n / ours_s,
                "basicsr_images_per_s": n / theirs_s,
                "ratio": theirs_s / ours_s,
                "ours_cpu_images_per_s": n / ours_cpu,
                "basicsr_cpu_images_per_s": n / theirs_cpu,
                "cpu_ratio": theirs_cpu / ours_cpu,
            }
        )
    finite = [p for p in psnrs if np.isfinite(p)]
    row = {"preset": preset, "images": len(images) * repeats, "passes": repeats}
    for key in passes[0]:
        row[key] = float(np.median([p[key] for p in passes]))
    row.update(
        ratio_per_pass=[round(p["ratio"], 3) for p in passes],
        cpu_ratio_per_pass=[round(p["cpu_ratio"], 3) for p in passes],
        blur_routes=routes,
        blur_downsample_max_abs_levels=worst_level,
        final_min_psnr_db=min(psnrs),
        final_median_psnr_db=float(np.median(finite)) if finite else float("inf"),
        identical_images=int(sum(not np.isfinite(p) for p in psnrs)),
    )
    return row


def bench_torch(
    images: list[np.ndarray], preset: str, batch: int, device: str, blur: str | None = None
) -> dict:
    import torch

    from refface.degradations.torch_ops import degrade_batch

    x = torch.from_numpy(np.stack(images[:batch])).permute(0, 3, 1, 2).float().div(255).to(device)
    keys = [f"torch-{i}" for i in range(x.shape[0])]
    degrade_batch(x, keys, preset, seed=0, blur=blur)  # warm-up (FFT plans, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rounds = 2
    for r in range(rounds):
        degrade_batch(x, [f"{k}-{r}" for k in keys], preset, seed=0, blur=blur)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    route = blur or ("fused" if device == "cpu" else "fft")
    return {
        "preset": preset,
        "device": device,
        "blur": route,
        "batch": x.shape[0],
        "images_per_s": rounds * x.shape[0] / dt,
    }


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}; CPU: {os.cpu_count()} cores"
    except ImportError:
        pass
    return f"CPU: {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="images per preset (each with its own draw)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="passes over the images (new draws each pass; medians reported)",
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--presets", nargs="+", default=["refldm-severe", "refldm-moderate"])
    parser.add_argument("--torch-batch", type=int, default=8)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="fused blur error bound in grey levels (default: the library's)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    # Per core: one thread everywhere.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    import torch

    torch.set_num_threads(1)

    from refface.degradations.ops import DEFAULT_TOLERANCE
    from refface.degradations.reference import load_basicsr_degradations

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    bsr = load_basicsr_degradations()
    images, source = load_images(args.images, args.size)
    rows = []
    for preset in args.presets:
        row = bench_preset(bsr, images, preset, args.repeats, tolerance)
        rows.append(row)
        print(
            f"{preset:18s} ours {row['ours_images_per_s']:7.1f} img/s  BasicSR {row['basicsr_images_per_s']:6.1f} img/s"
            f"  ratio {row['ratio']:.2f}x (CPU time {row['cpu_ratio']:.2f}x; per pass {row['ratio_per_pass']})"
            f"  blur+down max |Δ| {row['blur_downsample_max_abs_levels']:.4f} levels"
            f"  min PSNR {row['final_min_psnr_db']:.1f} dB"
        )
    torch_rows = [
        bench_torch(images, p, args.torch_batch, "cpu", blur)
        for p in args.presets
        for blur in ("fused", "fft")
    ]
    if torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        torch_rows += [bench_torch(images, p, args.torch_batch, "cuda") for p in args.presets]
    for t in torch_rows:
        print(
            f"torch batch path {t['preset']:18s} {t['device']:5s} blur={t['blur']:5s} "
            f"{t['images_per_s']:7.1f} img/s (batch {t['batch']})"
        )

    result = {
        "device": device_name(),
        "threads": 1,
        "load_average_1m": os.getloadavg()[0],
        "size": args.size,
        "images_source": source,
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "target_ratio": 3.0,
        "tolerance_levels": tolerance,
        "presets": rows,
        "torch": torch_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "degrade.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Degradation speed per core",
        "",
        f"Device: {result['device']}, one thread per side; {args.size}×{args.size}; images: {source}; "
        f"1-minute load average during the run: {result['load_average_1m']:.1f}. Medians over "
        f"{args.repeats} interleaved passes (new draws each pass); wall clock, and the CPU time "
        "of the calling thread.",
        "",
        "| preset | ours img/s | BasicSR img/s | ratio (wall) | ratio per pass | ratio (CPU time) "
        "| blur routes | blur+down max abs diff (levels) | final min PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_pass = ", ".join(f"{v:.2f}" for v in r["ratio_per_pass"])
        routes = ", ".join(f"{k} {v}" for k, v in sorted(r["blur_routes"].items()))
        lines.append(
            f"| {r['preset']} | {r['ours_images_per_s']:.1f} | {r['basicsr_images_per_s']:.1f} | {r['ratio']:.2f}x | "
            f"{per_pass} | {r['cpu_ratio']:.2f}x | {routes} | "
            f"{r['blur_downsample_max_abs_levels']:.4f} | {r['final_min_psnr_db']:.1f} |"
        )
    lines += ["", "| torch batch path | device | blur route | batch | img/s |", "|---|---|---|---|---|"]
    for t in torch_rows:
        lines.append(
            f"| {t['preset']} | {t['device']} | {t['blur']} | {t['batch']} | {t['images_per_s']:.1f} |"
        )
    (args.out / "degrade.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'degrade.json'} and .md")


if __name__ == "__main__":
    main()
