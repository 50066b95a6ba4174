"""``refface demo``: the whole pipeline end to end on the default input."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    out: Path = typer.Option(Path("out/demo"), help="Folder that receives every result."),
    data: Path | None = typer.Option(
        None, help="Folder of face photos (default: $REFFACE_SAMPLE_DIR, else LFW fetched once)."
    ),
    workers: int = typer.Option(2, help="Worker processes for CPU stages."),
) -> None:
    """Run every pipeline stage on a small default input and print where the results are."""
    from refface.console import console, print_summary
    from refface.sample import SampleUnavailable, resolve_sample_dir

    try:
        images = resolve_sample_dir(data)
    except SampleUnavailable as e:
        console.print(f"[red]{e}")
        raise typer.Exit(1) from e
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {"input": str(images)}
    print_summary("refface demo", results)
