"""``refface doctor``: GPUs, runtime builds and the weights refface finds (:mod:`refface.doctor`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def doctor(
    model_root: Path | None = typer.Option(
        None, help="insightface model folder (default: $INSIGHTFACE_HOME or ~/.insightface, buffalo_l)."
    ),
    weights: Path | None = typer.Option(
        None, help="Folder of evaluation weights (default: $REFFACE_WEIGHTS or ./weights)."
    ),
    sd: Path | None = typer.Option(None, help="Stable Diffusion diffusers folder (default: $REFFACE_SD)."),
    deepface_home: Path | None = typer.Option(None, help="deepface home (default: $DEEPFACE_HOME)."),
    verify: bool = typer.Option(True, help="Hash the weights found and compare with the published files."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
    strict: bool = typer.Option(False, help="Exit with status 1 when there is any warning."),
) -> None:
    """Show the GPUs, torch / onnxruntime / FAISS builds and the weights refface finds.

    Warns when a GPU is present but a stage would run on the CPU (and names the fix), and when a
    weights file differs from the published one. Nothing is downloaded.
    """
    from refface.doctor import collect, render

    report = collect(
        model_root=model_root, weights_dir=weights, sd=sd, deepface_home=deepface_home, verify=verify
    )
    render(report)
    if json_out is not None:
        from refface.manifests.atomic import write_json

        write_json(json_out, json.loads(json.dumps(report.to_dict(), default=str)))
    if strict and report.warnings:
        raise typer.Exit(1)
