"""MGFR training entry point: ``accelerate launch -m refface.train.mgfr.train --config ... --stage 1|2``.

Stage 1 trains LCA (text + LQ); stage 2 loads stage 1's LCA, adds RCA/RLF/identity tokens/links (all
zero-initialised towards the UNet and LCA) and trains both. The loop is the shared one
(:mod:`refface.train.loop`); the task is in :mod:`refface.train.mgfr.task`, the config in
:mod:`refface.train.mgfr.config`; this file is the command line and the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from refface.mining.embed import check_embedding_dim
from refface.train.checkpoints import find_checkpoint
from refface.train.loaders import make_mgfr_dataloader
from refface.train.loop import train
from refface.train.loop_config import LoopConfig
from refface.train.mgfr.config import STAGES, MGFRConfig, load_yaml_config
from refface.train.mgfr.model import (
    load_frozen_sd,
)
from refface.train.mgfr.task import MGFRTask, build_adapters, resolve_checkpoint
from refface.train.sources import infer_embedding_dim

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# command line


@dataclass(frozen=True)
class MGFRRun:
    """One training stage: the flags of ``python -m refface.train.mgfr.train`` and ``refface train mgfr``."""

    config: str
    sd: str
    output: str
    dataset: str | None = None
    stage: int = 1
    init_from: str | None = None
    max_steps: int | None = None
    resume: str | None = None
    mixed_precision: str | None = None
    overrides: tuple[str, ...] = ()


def parse_args(argv: list[str] | None = None) -> MGFRRun:
    p = argparse.ArgumentParser(
        prog="python -m refface.train.mgfr.train",
        description="Train MGFR (LCA/RCA adapters on a frozen Stable Diffusion). Launch with "
        "`accelerate launch -m refface.train.mgfr.train ...` for multi-GPU / multi-node.",
    )
    p.add_argument(
        "--config", required=True, help="YAML config (configs/mgfr_sd15.yaml, configs/mgfr_tiny.yaml)"
    )
    p.add_argument("--dataset", help="dataset root or shard folder/pattern (refface.train.loaders)")
    p.add_argument("--sd", required=True, help="local diffusers Stable Diffusion 1.x/2.x folder")
    p.add_argument(
        "--stage", type=int, choices=STAGES, default=1, help="1: text + LQ; 2: adds reference/identity"
    )
    p.add_argument("--output", required=True, help="run folder; stage N writes <output>/stage<N>")
    p.add_argument(
        "--init-from",
        default=None,
        help="stage 2: stage-1 checkpoint or run folder (default <output>/stage1)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="override loop.max_steps")
    p.add_argument(
        "--resume", default=None, help="'latest' (default in configs), a checkpoint folder, or 'none'"
    )
    p.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="override the config"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override any config field, e.g. loop.max_steps=100 loop.report_to=wandb mgfr.batch_size=2",
    )
    return MGFRRun(**vars(p.parse_args(argv)))


def main(args: MGFRRun, dataloader=None) -> list[dict[str, float]]:
    """Run one stage as ``args`` say; returns the per-step logs.

    Args:
        args: parsed by :func:`parse_args` (never modified).
        dataloader: a ready dataloader of MGFR batches (programmatic use and tests); by default
            ``refface.train.loaders.make_mgfr_dataloader(args.dataset, ...)``.
    """
    loop_raw, mgfr_raw = load_yaml_config(args.config, args.stage, getattr(args, "overrides", None))
    out_dir = Path(args.output) / f"stage{args.stage}"
    loop_raw["output_dir"] = str(out_dir)
    if args.max_steps is not None:
        loop_raw["max_steps"] = args.max_steps
    if args.resume is not None:
        loop_raw["resume"] = None if args.resume.lower() == "none" else args.resume
    if args.mixed_precision is not None:
        loop_raw["mixed_precision"] = args.mixed_precision
    loop_cfg = LoopConfig.from_dict(loop_raw)
    cfg = MGFRConfig.from_dict(mgfr_raw)
    cfg = resolve_id_dim(cfg, args.dataset, dataloader, args.config)
    check_resume_id_dim(cfg, out_dir, loop_cfg.resume)

    sd = load_frozen_sd(args.sd)
    init_from = None
    if cfg.stage == 2:
        init_from = Path(args.init_from) if args.init_from else Path(args.output) / "stage1"
        init_from = resolve_checkpoint(init_from)
    adapters = build_adapters(sd, cfg, init_from, seed=loop_cfg.seed)
    if dataloader is None:
        dataloader = make_dataloader(args.dataset, cfg, loop_cfg.seed)
    task = MGFRTask(sd, adapters, cfg)
    return train(task, dataloader, loop_cfg)


def dataset_id_dim(dataset: str) -> tuple[int | None, str]:
    """``(D, description)`` of a dataset's identity embeddings; D is None when it holds none."""
    import json

    meta = Path(dataset) / "embeddings.json"
    what = f"dataset {dataset}"
    if meta.is_file():
        what += f" ({json.loads(meta.read_text()).get('model', 'unknown model')}, embeddings.json)"
    return infer_embedding_dim(dataset, default=None), what


def _peek_id_dim(dataloader) -> int | None:
    """D of ``id_embedding`` in a dataloader's first batch (global RNG state left as it was)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        batch = next(iter(dataloader))
    emb = batch.get("id_embedding") if isinstance(batch, dict) else None
    return int(emb.shape[-1]) if emb is not None else None


def resolve_id_dim(cfg: MGFRConfig, dataset: str | None, dataloader=None, config_path=None) -> MGFRConfig:
    """``cfg`` with ``id_dim`` read from the data when the config leaves it unset.

    The data's size comes from the dataset (``embeddings.json`` of a root, the first shard sample),
    else, in stage 2, from a given dataloader's first batch. A size set in the config that differs
    from the data's raises one ``ValueError`` naming both.
    """
    found, what = None, "the data"
    if dataset:
        found, what = dataset_id_dim(dataset)
    elif dataloader is not None and cfg.stage == 2:
        found, what = _peek_id_dim(dataloader), "the dataloader's first batch"
    if cfg.id_dim is None:
        if found is None and cfg.stage == 2:
            raise ValueError(
                f"stage 2 needs identity embeddings but {what} holds none; build the dataset with "
                "embeddings (`refface build ffhq-ref` writes them) or set mgfr.id_dim"
            )
        return dataclasses.replace(cfg, id_dim=found)
    if found is not None:
        check_embedding_dim(
            found,
            what,
            cfg.id_dim,
            f"mgfr.id_dim in {config_path or 'the config'}",
            "remove id_dim from the config (it is then read from the dataset) or rebuild the dataset with "
            "the embedder that gives that size (--embedder arcface: 512, dlib: 128)",
        )
    return cfg


def check_resume_id_dim(cfg: MGFRConfig, out_dir: Path, resume: str | None) -> None:
    """A stage-2 run resumed from a checkpoint built for another identity size: one clear error."""
    import json

    if cfg.stage != 2 or cfg.id_dim is None:
        return
    ckpt = find_checkpoint(out_dir, resume) if resume else None
    if ckpt is None:
        return
    saved = (json.loads((ckpt / "state.json").read_text()).get("task") or {}).get("mgfr") or {}
    if saved.get("id_dim") is not None:
        check_embedding_dim(
            cfg.id_dim,
            "this run's data",
            saved["id_dim"],
            f"the checkpoint it resumes ({ckpt})",
            "resume with the dataset that run was trained on, or start a new --output (or --resume none)",
        )


def make_dataloader(dataset: str | None, cfg: MGFRConfig, seed: int):
    """MGFR batches from the shared input pipeline (``refface.train.loaders.make_mgfr_dataloader``)."""
    if not dataset:
        raise ValueError("--dataset is required: a dataset root or a shard folder/pattern")
    return make_mgfr_dataloader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        resolution=cfg.resolution,
        negative_quality_fraction=cfg.negative_quality_fraction,
        negative_attribute_fraction=cfg.negative_attribute_fraction,
        seed=seed,
        embedding_dim=cfg.id_dim,
    )


if __name__ == "__main__":
    from refface.console import setup_logging

    setup_logging(False)
    main(parse_args())
