"""``refface export hf|basicsr``: hand a built dataset root to Hugging Face datasets or BasicSR."""

from __future__ import annotations

from pathlib import Path

import typer

from refface.cli.errors import exits_on_error

export_app = typer.Typer(
    help="Export a built dataset root: Hugging Face Parquet dataset (hf) or BasicSR paired folders (basicsr).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")


@export_app.command("hf")
@exits_on_error()
def hf(
    root: Path = typer.Argument(..., help="Built dataset root (split lists, reference CSVs, build.json)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Dataset folder to write (README.md + data/*.parquet)."
    ),
    shard_rows: int = typer.Option(1000, help="Rows per Parquet shard."),
    push_to_hub: str | None = typer.Option(
        None,
        help="Also upload the folder to this Hugging Face dataset repository (user/name); needs a token.",
    ),
    private: bool = typer.Option(True, help="Create the hub repository private (with --push-to-hub)."),
) -> None:
    """Write a Hugging Face dataset: one config per split, images embedded (Image feature), identity,
    references as row indices of the same split, LQ images with their degradation parameters, attributes
    and prompts, and a README.md card whose YAML header lists configs and dataset_info.

    Load it with ``datasets.load_dataset(OUT, "test")``. Nothing is uploaded unless --push-to-hub is given.
    """
    from refface.console import print_summary
    from refface.export.hf import HFExportConfig, export_hf

    summary = export_hf(
        root, out, HFExportConfig(shard_rows=shard_rows, push_to_hub=push_to_hub, private=private)
    )
    print_summary("refface export hf", summary)


@export_app.command("basicsr")
@exits_on_error()
def basicsr(
    root: Path = typer.Argument(
        ..., help="Built dataset root, degraded with `refface degrade` for LQ pairs."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder that receives the GT/LQ folders."),
    copy: bool = typer.Option(False, help="Write real files instead of symbolic links."),
    out_size: int = typer.Option(512, help="out_size of the GFPGAN HQ-only dataset block."),
) -> None:
    """Write BasicSR folders: train/gt (HQ only) and, per val/test LQ set, paired gt/ and lq/ folders with
    meta_info.txt, plus options.yml with PairedImageDataset and GFPGAN FFHQDegradationDataset blocks.
    """
    from refface.console import print_summary
    from refface.export.basicsr import BasicSRExportConfig, export_basicsr

    summary = export_basicsr(root, out, BasicSRExportConfig(copy=copy, out_size=out_size))
    print_summary("refface export basicsr", summary)
