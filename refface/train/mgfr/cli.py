"""``refface train mgfr``: run one MGFR training stage in this process (single device)."""

from __future__ import annotations

from pathlib import Path

import typer


def train_mgfr(
    config: Path = typer.Option(
        Path("configs/mgfr_sd15.yaml"), help="YAML config (loop, mgfr, stage1/stage2)."
    ),
    dataset: str = typer.Option(
        ..., help="Dataset root or shard folder/pattern (the input pipeline's source)."
    ),
    sd: Path = typer.Option(
        ..., help="Local diffusers Stable Diffusion 1.x/2.x folder (nothing is downloaded)."
    ),
    stage: int = typer.Option(
        1, min=1, max=2, help="1: text + LQ (LCA); 2: adds reference + identity (RCA)."
    ),
    output: Path = typer.Option(Path("out/mgfr"), help="Run folder; stage N writes <output>/stage<N>."),
    init_from: Path | None = typer.Option(
        None, help="Stage 2: stage-1 checkpoint or run folder (default <output>/stage1)."
    ),
    max_steps: int | None = typer.Option(None, help="Override loop.max_steps."),
    resume: str | None = typer.Option(
        None, help="'latest' (config default), a checkpoint folder, or 'none'."
    ),
    mixed_precision: str | None = typer.Option(None, help="Override loop.mixed_precision: no, fp16 or bf16."),
    overrides: list[str] | None = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Override any config field: loop.max_steps=100 loop.report_to=wandb,tensorboard ...",
        show_default=False,
    ),
) -> None:
    """Train MGFR stage 1 or 2: LCA/RCA adapters on a frozen Stable Diffusion.

    Resumes from the stage's latest checkpoint by default. This runs on one device; for several GPUs or
    nodes use `accelerate launch -m refface.train.mgfr.train` with the same flags (`make train-mgfr`).
    """
    from refface.console import print_summary
    from refface.train.mgfr.train import main, parse_args

    argv = ["--config", str(config), "--dataset", dataset, "--sd", str(sd), "--stage", str(stage)]
    argv += ["--output", str(output)]
    if init_from is not None:
        argv += ["--init-from", str(init_from)]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    if resume is not None:
        argv += ["--resume", resume]
    if mixed_precision is not None:
        argv += ["--mixed-precision", mixed_precision]
    argv += list(overrides or [])
    try:
        logs = main(parse_args(argv))
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    rows = {"stage": stage, "output": str(output / f"stage{stage}"), "steps run": len(logs)}
    if logs:
        rows.update({"last step": logs[-1]["step"], "last loss": f"{logs[-1]['loss']:.4f}"})
    print_summary("MGFR training", rows)
