"""``refface convert refldm-official``: the official ReF-LDM release -> a refface model folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from refface.cli.errors import exits_on_error

convert_app = typer.Typer(
    name="convert",
    help="Convert released model weights into refface model folders.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    convert_app.command("refldm-official")(convert_refldm_official)
    app.add_typer(convert_app, name="convert")


@exits_on_error()
def convert_refldm_official(
    ckpt: Path = typer.Option(..., "--ckpt", help="The official refldm.ckpt (Lightning LatentDiffusion)."),
    vqgan: Path | None = typer.Option(
        None, "--vqgan", help="The official vqgan.ckpt; default: first_stage_model.* inside --ckpt."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Model folder to write (unet/, vqgan/, refldm.json)."
    ),
    inspect: bool = typer.Option(
        False, "--inspect", help="Only print a summary of the files' keys (prefixes, counts, EMA present)."
    ),
    no_ema: bool = typer.Option(
        False, "--no-ema", help="Read model.diffusion_model.* even when EMA is present."
    ),
    attention_head_dim: int = typer.Option(32, help="Channels per attention head (the official config: 32)."),
    resolution: int = typer.Option(512, help="Image size the model works at (the official: 512)."),
    trust_checkpoint: bool = typer.Option(
        False, "--trust-checkpoint", help="Allow full unpickling for files that hold more than tensors."
    ),
) -> None:
    """Convert the official ReF-LDM weights (refldm.ckpt + vqgan.ckpt) into a refface model folder.

    The folder loads with `refface restore --model refldm --checkpoint DIR` (sampling preset `official`
    by default) and `refface train refldm --init DIR`. The EMA weights are used when present. Every
    tensor must map: unknown or missing keys stop the conversion with their names listed.
    """
    from refface.console import print_summary
    from refface.train.refldm.official import convert_release, inspect_release

    if inspect:
        info = inspect_release(ckpt, vqgan, trust_checkpoint)
        typer.echo(json.dumps(info, indent=2))
        return
    if out is None:
        raise typer.BadParameter("--out is required unless --inspect", param_hint="--out")
    summary = convert_release(
        ckpt,
        out,
        vqgan,
        use_ema=not no_ema,
        attention_head_dim=attention_head_dim,
        resolution=resolution,
        trust=trust_checkpoint,
    )
    print_summary("refface convert refldm-official", summary)
