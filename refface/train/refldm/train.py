"""ReF-LDM training entry point: stage A (VQGAN), B (LQ-only LDM) and C (ReF-LDM) on the shared loop.

Usage::

    accelerate launch -m refface.train.refldm.train --config configs/refldm.yaml \\
        --dataset ROOT --stage vqgan|ldm|refldm --output out/refldm

Each stage writes ``<output>/<stage>/`` (the loop's checkpoints, logs, validation grids) and, when it
finishes, ``<output>/<stage>/model/`` (``save_pretrained`` folders with the EMA weights) that the next
stage and ``refface restore --model refldm`` read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from refface.console import print_summary
from refface.manifests.atomic import write_text
from refface.train.loaders import make_refldm_dataloader
from refface.train.loop import train
from refface.train.loop_config import LoopConfig
from refface.train.refldm.config import STAGES, RefLDMConfig, load_config
from refface.train.refldm.tasks import build_task, export_model

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# entry point


@dataclass(frozen=True)
class RefLDMRun:
    """One training run: the flags of ``python -m refface.train.refldm.train`` and ``refface train refldm``."""

    config: str
    dataset: str
    output: str
    stage: str = "refldm"
    max_steps: int | None = None
    resume: str | None = None
    init: str | None = None
    overrides: tuple[str, ...] = ()


def parse_args(argv: list[str] | None = None) -> RefLDMRun:
    p = argparse.ArgumentParser(description="Train ReF-LDM: stage vqgan (A), ldm (B) or refldm (C).")
    p.add_argument("--config", required=True, help="YAML config (configs/refldm.yaml)")
    p.add_argument(
        "--dataset", required=True, help="dataset root or shard folder read by make_refldm_dataloader"
    )
    p.add_argument("--stage", choices=STAGES, default="refldm", help="which stage to train")
    p.add_argument("--output", required=True, help="run folder; each stage writes <output>/<stage>/")
    p.add_argument("--max-steps", type=int, default=None, help="override loop.max_steps")
    p.add_argument(
        "--resume", default=None, help="'latest' (default from config), a checkpoint folder, or 'none'"
    )
    p.add_argument(
        "--init",
        default=None,
        help="model folder (unet/, vqgan/; e.g. a converted official release) to start stage ldm/refldm from",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override any config field, e.g. loop.max_steps=100 loop.report_to=wandb data.batch_size=4",
    )
    return RefLDMRun(**vars(p.parse_args(argv)))


def apply_init(cfg: RefLDMConfig, init: str | Path) -> RefLDMConfig:
    """Start from a model folder: its UNet as ``task.init_from``, its autoencoder as ``vqgan.pretrained``.

    The folder's architecture (``refldm.json``) replaces the config's ``unet``/``vqgan`` architecture
    fields, and its reference encoding is kept, so the weights load and see references as they were
    trained to.
    """
    init = Path(init)
    if not (init / "unet" / "config.json").is_file() or not (init / "vqgan" / "config.json").is_file():
        raise FileNotFoundError(
            f"--init {init}: expected a model folder with unet/ and vqgan/ (save_pretrained)"
        )
    if cfg.task.stage == "vqgan":
        raise ValueError("--init applies to stages ldm and refldm (stage vqgan trains the autoencoder)")
    meta = json.loads((init / "refldm.json").read_text()) if (init / "refldm.json").is_file() else {}
    saved = RefLDMConfig.from_dict(meta["config"]) if "config" in meta else None
    unet = saved.unet if saved else cfg.unet
    vq_arch = {f: getattr(saved.vqgan, f) for f in _VQ_ARCH} if saved else {}
    task = dataclasses.replace(cfg.task, init_from=str(init / "unet"))
    if saved:
        task = dataclasses.replace(task, ref_encoding=saved.task.ref_encoding)
    vq = dataclasses.replace(cfg.vqgan, pretrained=str(init / "vqgan"), **vq_arch)
    return dataclasses.replace(cfg, unet=unet, vqgan=vq, task=task)


_VQ_ARCH = (
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "num_vq_embeddings",
    "norm_num_groups",
)


def make_dataloader(dataset: str, cfg: RefLDMConfig, seed: int):
    """The training loader from ``refface.train.loaders``."""
    d = cfg.data
    return make_refldm_dataloader(
        dataset,
        resolution=d.resolution,
        batch_size=d.batch_size,
        num_refs=d.num_refs,
        num_workers=d.num_workers,
        seed=seed,
        **d.extra,
    )


def main(args: RefLDMRun) -> list[dict[str, float]]:
    """Train one stage as configured; export its model folder when the run is complete."""
    cfg, loop_raw = load_config(args.config, getattr(args, "overrides", None))
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, stage=args.stage))
    init = getattr(args, "init", None)
    if init:
        cfg = apply_init(cfg, init)
    stage_dir = Path(args.output) / args.stage
    loop_raw = {**loop_raw, "output_dir": str(stage_dir)}
    if args.max_steps is not None:
        loop_raw["max_steps"] = args.max_steps
    if args.resume is not None:
        loop_raw["resume"] = None if args.resume == "none" else args.resume
    loop_cfg = LoopConfig.from_dict(loop_raw)
    task = build_task(cfg, stage_dir, loop_cfg.gradient_accumulation_steps)
    loader = make_dataloader(args.dataset, cfg, loop_cfg.seed)
    logs = train(task, loader, loop_cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        model_dir = export_model(task, stage_dir)
        last = logs[-1] if logs else {}
        print_summary(
            f"ReF-LDM stage {args.stage}",
            {"steps run": len(logs), "final loss": last.get("loss", float("nan")), "model": str(model_dir)},
        )
        log_file = stage_dir / "train_log.jsonl"
        previous = log_file.read_text() if log_file.exists() else ""
        write_text(log_file, previous + "".join(json.dumps(r) + "\n" for r in logs))
    return logs


if __name__ == "__main__":
    main(parse_args())
