"""MGFR training speed and memory: step time (it/s) and peak memory of stage 1 and stage 2.

Runs the real shared loop (``refface.train.loop.train``) on random-weight Stable Diffusion parts built
from configs (nothing downloaded) and synthetic batches. Presets:

- ``tiny`` (default on CPU): the test-suite SD (32x32 images).
- ``sd15`` (default on GPU): SD 1.5's UNet / VAE / CLIP ViT-L shapes, 512x512, bf16, gradient
  checkpointing, batch 4 and 8.

Baseline: stage 1 (LCA only); the ratio printed is stage 2's step time over stage 1's at the same batch.
Results: ``bench/results/train_mgfr.json`` and ``.md`` (device named).

    .venv/bin/python bench/train_mgfr.py                       # tiny on CPU
    .venv/bin/python bench/train_mgfr.py --preset sd15 --batch-sizes 4 8 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SD15 = {
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    "text": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "vocab_size": 49408,
    },
    "max_length": 77,
}


def build_sd(preset: str):
    """Random-weight FrozenSD for a preset."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from refface.train.mgfr import tiny_sd
    from refface.train.mgfr.model import FrozenSD

    if preset == "tiny":
        cfg = {
            "unet": tiny_sd.UNET_CONFIG,
            "vae": tiny_sd.VAE_CONFIG,
            "text": tiny_sd.TEXT_CONFIG,
            "max_length": 16,
        }
    else:
        cfg = SD15
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sd.write_tokenizer(tmp, max_length=cfg["max_length"]))
    text_cfg = dict(cfg["text"])
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_cfg,
        )
    )
    return FrozenSD(
        unet, vae, text_encoder, tokenizer, dict(tiny_sd.SCHEDULER_CONFIG), path=f"random:{preset}"
    )


def synthetic_loader(batch_size: int, resolution: int, id_dim: int, n_batches: int):
    import torch

    g = torch.Generator().manual_seed(0)
    n = batch_size * n_batches
    items = [
        {
            "gt": torch.rand(3, resolution, resolution, generator=g) * 2 - 1,
            "lq": torch.rand(3, resolution, resolution, generator=g) * 2 - 1,
            "ref": torch.rand(3, resolution, resolution, generator=g) * 2 - 1,
            "id_embedding": torch.nn.functional.normalize(torch.randn(id_dim, generator=g), dim=0),
            "prompt": "a man who has a beard and big nose",
            "negative_quality": torch.tensor(i % 10 == 0),
            "key": f"k{i}",
        }
        for i in range(n)
    ]
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False, drop_last=True)


def measure(sd, stage: int, batch_size: int, args, out_dir: Path) -> dict:
    """Median step time and peak memory of ``args.steps`` measured steps after ``args.warmup``."""
    import resource

    import torch
    from accelerate.state import AcceleratorState, GradientState

    from refface.train.loop import train
    from refface.train.loop_config import LoopConfig
    from refface.train.mgfr.config import MGFRConfig
    from refface.train.mgfr.task import MGFRTask, build_adapters

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cuda = torch.cuda.is_available()
    cfg = MGFRConfig(
        stage=stage, resolution=args.resolution, batch_size=batch_size, num_workers=0, id_dim=512
    )
    adapters = build_adapters(sd, cfg)
    task = MGFRTask(sd, adapters, cfg)
    total = args.warmup + args.steps
    loop = LoopConfig(
        output_dir=str(out_dir / f"stage{stage}_b{batch_size}"),
        max_steps=total,
        learning_rate=1e-5,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        ema_decay=0.9999,
        checkpoint_every=10**9,
        checkpoints_total_limit=1,
        validate_every=0,
        report_to="none",
        resume=None,
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    logs = train(task, synthetic_loader(batch_size, args.resolution, 512, total), loop)
    times = [r["step_time_s"] for r in logs[args.warmup :]]
    step = statistics.median(times)
    n_trainable = sum(p.numel() for p in adapters.parameters() if p.requires_grad)
    row = {
        "stage": stage,
        "batch_size": batch_size,
        "step_time_s": round(step, 4),
        "it_per_s": round(1.0 / step, 3),
        "images_per_s": round(batch_size / step, 2),
        "trainable_params_M": round(n_trainable / 1e6, 1),
        "final_loss": round(logs[-1]["loss"], 4),
    }
    if cuda:
        row["peak_gpu_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        row["peak_rss_GiB_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    # Free this run's adapters/optimizer before the next configuration.
    del task, adapters
    if cuda:
        torch.cuda.empty_cache()
    return row


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}"


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("tiny", "sd15"), default="sd15" if cuda else "tiny")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16" if cuda else "no")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--threads", type=int, default=1, help="CPU torch threads (1 is fastest on a busy 2-core box)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    if args.batch_sizes is None:
        args.batch_sizes = [4, 8] if args.preset == "sd15" else [2]
    if args.resolution is None:
        args.resolution = 512 if args.preset == "sd15" else 32
    if not cuda:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    sd = build_sd(args.preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bs in args.batch_sizes:
            for stage in args.stages:
                row = measure(sd, stage, bs, args, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
    by = {(r["stage"], r["batch_size"]): r for r in rows}
    ratios = {
        f"batch {bs}": round(by[(2, bs)]["step_time_s"] / by[(1, bs)]["step_time_s"], 3)
        for bs in args.batch_sizes
        if (1, bs) in by and (2, bs) in by
    }
    result = {
        "bench": "train_mgfr",
        "device": device_name(),
        "preset": args.preset,
        "resolution": args.resolution,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "rows": rows,
        "stage2_over_stage1_step_time": ratios,
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from refface.manifests.atomic import write_json, write_text

    write_json(args.out / "train_mgfr.json", result)
    mem_key = "peak_gpu_mem_GiB" if cuda else "peak_rss_GiB_process"
    lines = [
        "# MGFR training step time and memory",
        "",
        f"Device: {result['device']}. Preset {args.preset}, {args.resolution}x{args.resolution}, "
        f"{args.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}; median of "
        f"{args.steps} steps after {args.warmup} warm-up steps; random weights, synthetic batches.",
        "",
        f"| stage | batch | step s | it/s | images/s | trainable M | {mem_key} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['batch_size']} | {r['step_time_s']} | {r['it_per_s']} | {r['images_per_s']} "
            f"| {r['trainable_params_M']} | {r[mem_key]} |"
        )
    lines += ["", f"Stage 2 / stage 1 step time (baseline stage 1): {ratios}", ""]
    write_text(args.out / "train_mgfr.md", "\n".join(lines))
    print(f"device: {result['device']}")
    print(f"stage 2 / stage 1 step time: {ratios}")
    print(f"wrote {args.out / 'train_mgfr.json'} and .md")


if __name__ == "__main__":
    main()
