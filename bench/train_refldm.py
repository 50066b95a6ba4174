"""ReF-LDM stage C speed and memory: CacheKV against spatial concatenation of the references, side by side.

Both methods use the same random-weight denoiser, autoencoder and ArcFace. Training step = encode GT /
LQ / references, ε-loss + timestep-scaled identity loss (x̂0 decoded, ArcFace), backward, AdamW step.
Sampling step = one DDIM step with CFG toward the references (batch doubled with the null condition).

- CacheKV: the references run through the UNet at t = 0 (every training step; once per sample at
  inference) and every self-attention of the target reads their cached K/V.
- Spatial concatenation (the baseline): the K reference latents are laid beside the target latent
  along the width, and the UNet runs on the (1 + K)-wide latent at every step.

Each measurement runs in a fresh process. Peak memory: CUDA max allocated over the timed steps (above
what the models and inputs hold); on CPU the peak of live tensors created during one more step
(activations, temporaries, gradients; sampling: the reference pass and two steps). Times are the median
step, which resists other work on a shared machine.

    .venv/bin/python bench/train_refldm.py                      # tiny config on CPU (default)
    .venv/bin/python bench/train_refldm.py --config configs/refldm.yaml --batch 8 --refs 5 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("REFFACE_PROGRESS", "0")

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("cachekv", "spatial")


def _live_peak_mode():
    """A dispatch mode recording the peak bytes of tensor storages created inside it and still alive.

    On CPU there is no allocator statistic like CUDA's max_memory_allocated, and the process's resident
    set mixes in the models, the encoder's earlier peak and allocator caching. Every op output is
    counted once per storage until its last tensor dies (PyTorch keeps a tensor's Python object alive
    while autograd holds it), so saved activations, temporaries and gradients all count.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LivePeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs: dict[int, int] = {}
            self.sizes: dict[int, int] = {}
            self.current = 0
            self.peak = 0

        def _drop(self, key: int) -> None:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.current -= self.sizes.pop(key)
                del self.refs[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key == 0:
                        continue
                    if key not in self.refs:
                        self.refs[key] = 0
                        self.sizes[key] = storage.nbytes()
                        self.current += storage.nbytes()
                        self.peak = max(self.peak, self.current)
                    self.refs[key] += 1
                    weakref.finalize(t, self._drop, key)
            return out

    return LivePeak()


def _measure(opts: dict, method: str, phase: str, queue) -> None:
    """Child process: build the models, run warm-up + timed steps of one method and phase."""
    import torch
    import torch.nn.functional as F
    from diffusers.utils import logging as diffusers_logging

    from refface.train.refldm.cachekv import RefCache
    from refface.train.refldm.config import load_config
    from refface.train.refldm.identity import identity_loss, iresnet
    from refface.train.refldm.model import RefLDMUNet, make_ddim_scheduler, make_train_scheduler
    from refface.train.refldm.vqgan import build_vqgan, decode, encode

    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(opts["threads"])
    cfg, _ = load_config(opts["config"])
    device = torch.device(opts["device"])
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts["precision"]]
    unet = RefLDMUNet.from_unet_config(cfg.unet).to(device)
    vq = build_vqgan(cfg.vqgan).to(device, dtype).eval().requires_grad_(False)
    paper = cfg.unet.base_channels >= 128
    arcface = (iresnet("r50") if paper else iresnet("r18", widths=tuple(cfg.task.arcface_widths))).to(
        device, dtype
    )
    arcface.eval().requires_grad_(False)
    b, k, res = opts["batch"], opts["refs"], opts["resolution"] or cfg.data.resolution
    g = torch.Generator(device="cpu").manual_seed(0)
    gt = (torch.rand(b, 3, res, res, generator=g) * 2 - 1).to(device)
    lq = (torch.rand(b, 3, res, res, generator=g) * 2 - 1).to(device)
    refs = (torch.rand(b, k, 3, res, res, generator=g) * 2 - 1).to(device)
    sched = make_train_scheduler(cfg.noise)
    acp_all = sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-5)

    def spatial_eps(x_target: torch.Tensor, zlq, t, zref) -> torch.Tensor:
        # (B, C, h, w) target ‖ LQ and K references ‖ zeros, side by side along the width.
        tgt = torch.cat([x_target, zlq], dim=1)
        parts = [tgt] + [
            torch.cat([zref[:, i], torch.zeros_like(zref[:, i])], dim=1) for i in range(zref.shape[1])
        ]
        wide = torch.cat(parts, dim=3)  # (B, 2C, h, (1 + K) w)
        return unet.unet(wide, t).sample[..., : x_target.shape[-1]]

    with torch.no_grad():
        z0 = encode(vq, gt.to(dtype)).float()
        zlq = encode(vq, lq.to(dtype)).float()
        zref = encode(vq, refs.flatten(0, 1).to(dtype)).float().view(b, k, *z0.shape[1:])

    def train_step() -> None:
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(z0)
        a = acp_all[t].view(b, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if method == "cachekv":
                eps = unet(zt, zlq, t, ref_latents=zref).float()
            else:
                eps = spatial_eps(zt, zlq, t, zref).float()
            loss = F.mse_loss(eps, noise)
            x0 = (zt - (1 - a).sqrt() * eps) / a.sqrt()
            pred = decode(vq, x0.to(dtype)).float()
            with torch.no_grad():
                target = decode(vq, z0.to(dtype)).float()
            loss = loss + identity_loss(arcface, pred, target, acp_all[t]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ddim = make_ddim_scheduler(cfg.noise)
    ddim.set_timesteps(opts["sample_steps"])
    state = {}

    @torch.no_grad()
    def sample_setup() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if method == "cachekv":
                state["cache"] = RefCache.cat(
                    [unet.build_cache(zref), unet.build_cache(torch.zeros_like(zref))]
                )
        state["x"] = torch.randn_like(z0)

    @torch.no_grad()
    def sample_step(t) -> None:
        x = state["x"]
        ts = torch.full((2 * b,), int(t), device=device, dtype=torch.long)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if method == "cachekv":
                eps = unet(torch.cat([x, x]), torch.cat([zlq, zlq]), ts, cache=state["cache"]).float()
            else:
                both = torch.cat([zref, torch.zeros_like(zref)])
                eps = spatial_eps(torch.cat([x, x]), torch.cat([zlq, zlq]), ts, both).float()
        eps = eps[b:] + cfg.task.guidance_scale * (eps[:b] - eps[b:])
        state["x"] = ddim.step(eps, t, x).prev_sample

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    unet.train(phase == "train")
    if phase == "train":
        train_step()  # warm-up (allocator, kernels)
        times = []
        for _ in range(opts["steps"]):
            sync()
            start = time.perf_counter()
            train_step()
            sync()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    else:
        sample_setup()
        timesteps = list(ddim.timesteps)
        sample_step(timesteps[0])  # warm-up
        sync()
        start = time.perf_counter()
        sample_setup()  # CacheKV's once-per-sample reference pass, spread over the sample's steps
        sync()
        setup = time.perf_counter() - start
        times = []
        for t in timesteps:
            start = time.perf_counter()
            sample_step(t)
            sync()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times) + setup / len(timesteps)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    else:
        mode = _live_peak_mode()
        with mode:
            if phase == "train":
                train_step()
            else:
                sample_setup()
                for t in list(ddim.timesteps)[:2]:
                    sample_step(t)
        peak_mb = mode.peak / 2**20
    queue.put({"method": method, "phase": phase, "seconds_per_step": seconds, "peak_mb": peak_mb})


def run_one(opts: dict, method: str, phase: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(opts, method, phase, queue))
    proc.start()
    import queue as queue_mod

    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"the {method}/{phase} measurement process died (exit code {proc.exitcode})"
                ) from None
    proc.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="model config (default: paper on CUDA, tiny on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 8 on CUDA, 2 on CPU)")
    parser.add_argument("--refs", type=int, default=5, help="references per target")
    parser.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the config's on CUDA, 128 on CPU)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--sample-steps", type=int, default=5, help="timed DDIM steps")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared box)"
    )
    parser.add_argument("--name", default="train_refldm", help="results file stem")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    root = Path(__file__).resolve().parents[1]
    config = args.config or str(root / "configs" / ("refldm.yaml" if gpu else "refldm_tiny.yaml"))
    opts = {
        "config": config,
        "batch": args.batch or (8 if gpu else 2),
        "refs": args.refs,
        "resolution": args.resolution or (None if gpu else 128),
        "steps": args.steps,
        "sample_steps": args.sample_steps,
        "precision": args.precision or ("bf16" if gpu else "no"),
        "device": device,
        "threads": args.threads,
    }
    if gpu:
        device_name = f"GPU: {torch.cuda.get_device_name(0)}"
    else:
        device_name = f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {args.threads} threads"
    rows = []
    for phase in ("train", "sample"):
        for method in METHODS:
            r = run_one(opts, method, phase)
            rows.append(r)
            print(
                f"{phase:6s} {method:8s} {r['seconds_per_step'] * 1000:9.1f} ms/step  peak {r['peak_mb']:8.1f} MB"
            )
    by = {(r["phase"], r["method"]): r for r in rows}
    summary = {}
    for phase in ("train", "sample"):
        c, s = by[(phase, "cachekv")], by[(phase, "spatial")]
        summary[phase] = {
            "cachekv_it_per_s": 1.0 / c["seconds_per_step"],
            "spatial_it_per_s": 1.0 / s["seconds_per_step"],
            "speedup_cachekv_vs_spatial": s["seconds_per_step"] / c["seconds_per_step"],
            "cachekv_peak_mb": c["peak_mb"],
            "spatial_peak_mb": s["peak_mb"],
            "memory_ratio_spatial_over_cachekv": s["peak_mb"] / c["peak_mb"] if c["peak_mb"] > 0 else None,
        }
        print(
            f"{phase}: CacheKV {summary[phase]['cachekv_it_per_s']:.2f} it/s vs spatial "
            f"{summary[phase]['spatial_it_per_s']:.2f} it/s (x{summary[phase]['speedup_cachekv_vs_spatial']:.2f}); "
            f"peak {c['peak_mb']:.0f} MB vs {s['peak_mb']:.0f} MB"
        )
    result = {"device": device_name, "options": opts, "rows": rows, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from refface.manifests.atomic import write_json, write_text

    write_json(RESULTS / f"{args.name}.json", result)
    md = [
        f"# ReF-LDM stage C: CacheKV vs spatial concatenation ({device_name})",
        "",
        f"config `{Path(config).name}`, batch {opts['batch']}, {opts['refs']} references, precision {opts['precision']}",
        "",
        "| phase | method | it/s | peak memory (MB) |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        md.append(f"| {r['phase']} | {r['method']} | {1 / r['seconds_per_step']:.2f} | {r['peak_mb']:.0f} |")
    md.append("")
    for phase, s in summary.items():
        ratio = s["memory_ratio_spatial_over_cachekv"]
        md.append(
            f"- {phase}: CacheKV is x{s['speedup_cachekv_vs_spatial']:.2f} the speed of spatial concatenation; "
            f"spatial needs x{ratio:.2f} the memory"
            if ratio
            else f"- {phase}: memory ratio unavailable"
        )
    write_text(RESULTS / f"{args.name}.md", "\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
