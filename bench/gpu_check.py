"""One part of the GPU check (bench/gpu_check.sh runs them all): real-size models, random weights.

    python bench/gpu_check.py --part arcface|faiss|refldm|mgfr|pipeline|report [--dry-run]

Parts (each writes bench/results/gpu_<part>.json; ``report`` writes gpu_check.{json,md}):
- arcface: ArcFace iresnet50 exported to ONNX (random weights), faces/s at batch 128 with
  onnxruntime's CUDA provider vs its CPU provider, through refface's ArcFaceEmbedder.
- faiss: bench/scale.py's k-NN graph of 10M x 512 synthetic embeddings on the FAISS GPU index
  refface picks, edge recall against exact search on a sample, beside the CPU IVF-PQ figure of
  bench/results/scale_10m.json.
- refldm: ReF-LDM stage C at the paper's configuration (UNet 117.8M, 512 px = 64x64 latents,
  batch 8, 5 references, bf16 autocast, AdamW): it/s and peak memory of the UNet training step
  with CacheKV; VQGAN encoding of the step's 56 images; inference memory of CacheKV vs feeding the
  references by spatial concatenation (paper: 2.87 GB vs 7.44 GB).
- mgfr: MGFR stage 1 and 2 on an SD-1.5-sized UNet at 512 px, batch 4, gradient checkpointing,
  bf16: it/s and peak memory.
- pipeline: the ReF-LDM input pipeline (16 workers) samples/s vs what stage C consumes.

``--dry-run`` runs every part at toy sizes on whatever the machine has (CPU included), so each step
is known to run; GPU-only measurements are skipped with a message when CUDA is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("REFFACE_PROGRESS", "0")
RESULTS = REPO / "bench" / "results"
PARTS = ("arcface", "faiss", "refldm", "mgfr", "pipeline")


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {os.cpu_count()} CPU cores)"
    except ImportError:
        pass
    return f"CPU only: {os.cpu_count()} cores ({platform.machine()})"


def cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def write(part: str, data: dict, dry: bool) -> dict:
    data = {"part": part, "device": device_name(), "dry_run": dry, **data}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"gpu_{part}{'_dry' if dry else ''}.json"
    (RESULTS / name).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2), flush=True)
    return data


def timed(fn, warmup: int, iters: int, sync=None) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / iters


# ------------------------------------------------------------------------------------------ arcface


def part_arcface(dry: bool) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from refface.mining.embed import ArcFaceEmbedder
    from refface.train.refldm.identity import iresnet

    arch, batch = ("r18", 8) if dry else ("r50", 128)
    work = Path(tempfile.mkdtemp(prefix="refface-gpu-arcface-"))
    path = work / f"iresnet_{arch}.onnx"
    torch.manual_seed(0)
    model = iresnet(arch).eval()
    torch.onnx.export(
        model,
        torch.randn(1, 3, 112, 112),
        str(path),
        input_names=["input.1"],
        output_names=["fc1"],
        dynamic_axes={"input.1": {0: "batch"}, "fc1": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    crops = list(np.random.default_rng(0).integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8))
    out = {"model": f"iresnet{arch[1:]} ONNX, random weights", "batch": batch, "providers": {}}
    available = ort.get_available_providers()
    out["available_providers"] = available
    for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        if provider not in available:
            out["providers"][provider] = "skipped: not available in this onnxruntime"
            print(f"arcface: {provider} not available, skipped", flush=True)
            continue
        emb = ArcFaceEmbedder(path, batch_size=batch, threads=os.cpu_count() or 1)
        emb.session = ort.InferenceSession(str(path), providers=[provider])
        assert emb.session.get_providers()[0] == provider
        iters = 3 if (dry or provider == "CPUExecutionProvider") else 20
        sec = timed(lambda e=emb: e.embed_crops(crops), warmup=1 if dry else 3, iters=iters)
        out["providers"][provider] = {
            "faces_per_s": round(batch / sec, 1),
            "ms_per_batch": round(sec * 1000, 2),
        }
    cuda_fps = out["providers"].get("CUDAExecutionProvider", {})
    cpu_fps = out["providers"].get("CPUExecutionProvider", {})
    if isinstance(cuda_fps, dict) and isinstance(cpu_fps, dict) and cuda_fps and cpu_fps:
        out["cuda_vs_cpu"] = round(cuda_fps["faces_per_s"] / cpu_fps["faces_per_s"], 1)
    return out


# -------------------------------------------------------------------------------------------- faiss


def part_faiss(dry: bool) -> dict:
    import subprocess

    from refface.mining.neighbors import gpu_available

    n = 20_000 if dry else int(os.environ.get("GPU_CHECK_FAISS_N", 10_000_000))
    dim = 64 if dry else 512
    gpu = gpu_available()
    if not gpu and not dry:
        print("faiss: this FAISS build sees no GPU; skipped (install faiss-gpu)", flush=True)
        return {"skipped": "FAISS sees no GPU"}
    out_prefix = RESULTS / ("gpu_faiss_scale_dry" if dry else "gpu_faiss_scale")
    cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--sizes", str(n), "--dim", str(dim)]
    cmd += [
        "--kind",
        "auto",
        "--out",
        str(out_prefix),
        "--work",
        tempfile.mkdtemp(prefix="refface-gpu-faiss-"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/scale.py failed: {proc.stderr[-3000:]}")
    run = json.loads(out_prefix.with_suffix(".json").read_text())["runs"][0]
    out = {
        "n": n,
        "dim": dim,
        "faiss_gpu": gpu,
        "index": run["plan"].get("kind"),
        "knn_build_s": run.get("knn_build_s"),
        "knn_search_s": run.get("knn_search_s"),
        "edge_recall": run["recall"].get("edge_recall"),
        "recall_at_k": run["recall"].get("recall_at_k"),
        "generate_s": run.get("generate_s"),
        "total_s": run.get("total_s"),
    }
    cpu_ref = REPO / "bench" / "results" / "scale_10m.json"
    if cpu_ref.exists():
        cpu = next((r for r in json.loads(cpu_ref.read_text())["runs"] if r["n"] == 10_000_000), None)
        if cpu:
            out["cpu_ivf_pq_10m"] = {
                "build_s": cpu["knn_build_s"],
                "search_s": cpu["knn_search_s"],
                "edge_recall": cpu["recall"]["edge_recall"],
                "device": json.loads(cpu_ref.read_text())["device"],
            }
            if not dry and out["knn_build_s"] is not None:
                gpu_s = out["knn_build_s"] + out["knn_search_s"]
                out["speedup_vs_cpu_ivf_pq"] = round((cpu["knn_build_s"] + cpu["knn_search_s"]) / gpu_s, 1)
    return out


# ------------------------------------------------------------------------------------------- refldm


def _peak_gb(torch) -> float:
    return round(torch.cuda.max_memory_allocated() / 1024**3, 3)


def part_refldm(dry: bool) -> dict:
    import torch

    from refface.train import paper_size
    from refface.train.refldm.vqgan import encode

    on_gpu = cuda()
    if not on_gpu and not dry:
        print("refldm: no CUDA device; skipped", flush=True)
        return {"skipped": "no CUDA device"}
    dev = torch.device("cuda" if on_gpu else "cpu")
    batch, refs, latent, image = (8, 5, 64, 512) if not dry else (1, 2, 8, 64)
    torch.manual_seed(0)
    if dry:
        from refface.train.refldm.model import RefLDMUNet
        from refface.train.refldm.vqgan import VQGANConfig, build_vqgan

        unet = RefLDMUNet(base_channels=32, channel_mult=(1, 2), attention_levels=(False, True))
        vq = build_vqgan(VQGANConfig(block_out_channels=[32, 32, 32, 32], num_vq_embeddings=64))
    else:
        unet, vq = paper_size.build_refldm()
    unet, vq = unet.to(dev).train(), vq.to(dev).eval().requires_grad_(False)
    out = {"unet_params": paper_size.count_parameters(unet), "batch": batch, "refs": refs, "latent": latent}
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-5)
    z = torch.randn(batch, 8, latent, latent, device=dev)
    lq = torch.randn_like(z)
    ref = torch.randn(batch, refs, 8, latent, latent, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step():
        with amp:
            loss = torch.nn.functional.mse_loss(unet(z, lq, t, ref_latents=ref).float(), z)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if on_gpu else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, warmup=1 if dry else 3, iters=2 if dry else 10, sync=sync)
    out["train_step"] = {"it_per_s": round(1 / sec, 3), "samples_per_s": round(batch / sec, 2)}
    if on_gpu:
        out["train_step"]["peak_gb"] = _peak_gb(torch)
    # The step's images through the frozen VQGAN encoder: target, LQ and the references.
    images = torch.rand(batch * (2 + refs), 3, image, image, device=dev) * 2 - 1
    with torch.no_grad(), amp:
        enc = timed(lambda: encode(vq, images), warmup=1, iters=1 if dry else 3, sync=sync)
    out["vqgan_encode_step_s"] = round(enc, 3)
    # Inference memory, batch 1: CacheKV (references cached once) vs spatial concatenation.
    unet.eval()
    with torch.no_grad(), amp:
        z1, lq1, ref1 = z[:1], lq[:1], ref[:1]
        t1 = torch.tensor([500], device=dev)
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if on_gpu else 0
        cache = unet.build_cache(ref1)
        unet(z1, lq1, t1, cache=cache)
        cachekv = (torch.cuda.max_memory_allocated() - base) / 1024**3 if on_gpu else None
        del cache
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # The references side by side with the target in one wide latent (LQ channels zero there).
        wide_z = torch.cat([z1, *ref1.unbind(1)], dim=-1)  # (1, C, h, (1 + K) w)
        wide_lq = torch.cat([lq1] + [torch.zeros_like(lq1)] * refs, dim=-1)
        unet(wide_z, wide_lq, t1)
        spatial = (torch.cuda.max_memory_allocated() - base) / 1024**3 if on_gpu else None
    out["inference_memory_gb"] = {
        "cachekv": None if cachekv is None else round(cachekv, 3),
        "spatial_concat": None if spatial is None else round(spatial, 3),
        "paper_1080": {"cachekv": 2.87, "spatial_concat": 7.44},
        "note": f"activation + cache memory above the resident weights, batch 1, {refs} references, bf16",
    }
    return out


# --------------------------------------------------------------------------------------------- mgfr


def part_mgfr(dry: bool) -> dict:
    import torch

    on_gpu = cuda()
    if not on_gpu and not dry:
        print("mgfr: no CUDA device; skipped", flush=True)
        return {"skipped": "no CUDA device"}
    dev = torch.device("cuda" if on_gpu else "cpu")
    batch, latent = (4, 64) if not dry else (1, 16)
    out = {"batch": batch, "latent": latent, "gradient_checkpointing": True, "stages": {}}
    for stage in (1, 2):
        out["stages"][f"stage{stage}"] = _mgfr_stage(stage, dry, dev, batch, latent)
        if on_gpu:
            torch.cuda.empty_cache()
    return out


def _mgfr_stage(stage: int, dry: bool, dev, batch: int, latent: int) -> dict:
    """it/s and peak memory of one MGFR training step: frozen UNet (bf16), fp32 adapters, bf16 autocast."""
    from types import SimpleNamespace

    import torch

    from refface.train import paper_size
    from refface.train.mgfr.model import predict

    on_gpu = dev.type == "cuda"
    if dry:
        from diffusers import UNet2DConditionModel

        from refface.train.mgfr.tiny_sd import UNET_CONFIG

        unet = UNet2DConditionModel(**{**UNET_CONFIG, "cross_attention_dim": 768}).to(dev)
    else:
        unet = paper_size.build_sd15_unet_fast(dtype=torch.bfloat16, device=dev)
    unet.requires_grad_(False).enable_gradient_checkpointing()
    adapters = paper_size.build_mgfr_adapters(unet, stage=stage, fast=not dry).float().to(dev).train()
    adapters.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-5)
    sd = SimpleNamespace(unet=unet)
    z = torch.randn(batch, 4, latent, latent, device=dev)
    kw = {"text_embeds": torch.randn(batch, 77, 768, device=dev), "lq_latents": torch.randn_like(z)}
    if stage == 2:
        kw.update(ref_latents=torch.randn_like(z), id_embedding=torch.randn(batch, 512, device=dev))
    t = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(predict(sd, adapters, z, t, **kw).float(), z)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if on_gpu else None
    sec = timed(step, warmup=1 if dry else 2, iters=2 if dry else 8, sync=sync)
    res = {"it_per_s": round(1 / sec, 3), "trainable_params": paper_size.count_parameters(adapters)}
    if on_gpu:
        res["peak_gb"] = _peak_gb(torch)
    return res


# ----------------------------------------------------------------------------------------- pipeline


def part_pipeline(dry: bool) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    import loader  # bench/loader.py: the dataset root and shards it measures on

    from refface.train.loaders import make_refldm_dataloader

    workers = 2 if dry else 16
    n_images, per_id, samples = (12, 4, 16) if dry else (240, 6, 2048)
    work = Path(tempfile.mkdtemp(prefix="refface-gpu-pipeline-"))
    root, _, _ = loader.build_root(work / "root", n_images, per_id, size=128 if dry else 512)
    loader.time_shard_write(root, work / "shards", "png")
    dl = make_refldm_dataloader(
        str(work / "shards"),
        resolution=128 if dry else 512,
        batch_size=8,
        num_refs=5,
        num_workers=workers,
        seed=0,
        samples_per_epoch=samples + 8 * (workers + 1),
    )
    seen, t0 = 0, None
    while seen < samples:
        for batch in dl:
            if t0 is None:
                t0 = time.perf_counter()  # worker start-up is not throughput
                continue
            seen += next(len(v) for v in batch.values() if hasattr(v, "shape"))
            if seen >= samples:
                break
    sps = seen / (time.perf_counter() - t0)
    out = {"workers": workers, "samples_per_s": round(sps, 1), "samples": seen}
    ref = RESULTS / "gpu_refldm.json"
    if ref.exists() and not dry:
        consume = json.loads(ref.read_text()).get("train_step", {}).get("samples_per_s")
        if consume:
            out["stage_c_consumes_samples_per_s"] = consume
            out["headroom"] = round(sps / consume, 2)
    return out


# ------------------------------------------------------------------------------------------- report


def part_report(dry: bool) -> dict:
    suffix = "_dry" if dry else ""
    parts = {}
    for p in PARTS:
        f = RESULTS / f"gpu_{p}{suffix}.json"
        parts[p] = json.loads(f.read_text()) if f.exists() else {"missing": True}
    data = {"device": device_name(), "dry_run": dry, "parts": parts}
    (RESULTS / f"gpu_check{suffix}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# GPU check{' (dry run: toy sizes)' if dry else ''} — {data['device']}", ""]
    for p in PARTS:
        r = parts[p]
        lines.append(f"## {p}")
        lines.append("")
        if r.get("missing") or r.get("error"):
            lines.append(f"not measured: {r.get('error', 'part did not finish')}")
        elif r.get("skipped"):
            lines.append(f"skipped: {r['skipped']}")
        else:
            body = {k: v for k, v in r.items() if k not in ("part", "device", "dry_run")}
            lines.append("```json")
            lines.append(json.dumps(body, indent=2))
            lines.append("```")
        lines.append("")
    (RESULTS / f"gpu_check{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=(*PARTS, "report"))
    ap.add_argument("--dry-run", action="store_true", help="toy sizes; runs anywhere")
    args = ap.parse_args()
    if args.part == "report":
        part_report(args.dry_run)
        return 0
    fn = globals()[f"part_{args.part}"]
    start = time.perf_counter()
    try:
        result = fn(args.dry_run)
    except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
        write(args.part, {"error": f"{type(e).__name__}: {e}"[:2000]}, args.dry_run)
        raise
    write(args.part, {**result, "seconds": round(time.perf_counter() - start, 1)}, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
