"""``refface train refldm``: run one ReF-LDM training stage in this process (multi-GPU: accelerate launch)."""

from __future__ import annotations

from pathlib import Path

import typer


def train_refldm(
    dataset: str = typer.Option(
        ..., "--dataset", help="Dataset root or shard folder (refface.train.data reads it)."
    ),
    stage: str = typer.Option(
        "refldm", "--stage", help="vqgan (A: autoencoder), ldm (B: LQ only) or refldm (C)."
    ),
    output: Path = typer.Option(
        Path("out/refldm"), "--output", help="Run folder; the stage writes <output>/<stage>/."
    ),
    config: Path = typer.Option(
        Path("configs/refldm.yaml"), "--config", help="YAML config (model, task, data, loop)."
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override loop.max_steps."),
    resume: str | None = typer.Option(None, "--resume", help="'latest', a checkpoint folder, or 'none'."),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Start from a model folder (unet/, vqgan/), e.g. one written by `refface convert refldm-official`: "
        "its UNet initialises stage C (or B) and its autoencoder is used frozen.",
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Override any config field: loop.max_steps=100 loop.report_to=wandb,tensorboard ...",
        show_default=False,
    ),
) -> None:
    """Train ReF-LDM (VQGAN -> LQ-only LDM -> ReF-LDM with CacheKV and the identity loss).

    Runs in this process on one device; for several GPUs or nodes use `accelerate launch -m refface.train.refldm.train` with the same flags. Rerunning resumes from the latest checkpoint; a finished stage does no work.
    """
    from refface.train.refldm.train import STAGES, main, parse_args

    if stage not in STAGES:
        raise typer.BadParameter(f"choose one of {', '.join(STAGES)}", param_hint="--stage")
    argv = ["--config", str(config), "--dataset", dataset, "--stage", stage, "--output", str(output)]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    if resume is not None:
        argv += ["--resume", resume]
    if init is not None:
        argv += ["--init", str(init)]
    argv += list(overrides or [])
    try:
        main(parse_args(argv))
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise typer.BadParameter(str(e)) from e
