"""``refface degrade``: LQ sets for a dataset root's test/val targets or any folder of images."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("degrade")(degrade)


def _list_table():
    from rich.table import Table

    from refface.degradations import PRESETS

    def rng(r) -> str:
        return "-" if r is None else f"[{r[0]:g}, {r[1]:g}]"

    def values(v) -> str:
        return "{" + ", ".join(f"{x:g}" for x in v) + "}"

    table = Table(title="degradation presets", title_justify="left", show_lines=True)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("set folder · ranges (blur σ, scale r, noise σ, JPEG q) · extras")
    for name in sorted(PRESETS):
        p = PRESETS[name]
        if p.grid is not None:
            g = p.grid
            ranges = f"σ {values(g['sigma_x'])} r {values(g['scale'])} n {values(g['noise'])} q {values(g['jpeg'])}"
        else:
            ranges = f"σ {rng(p.blur_sigma)} r {rng(p.downsample_range)} n {rng(p.noise_range)} q {rng(p.jpeg_range)}"
        extras = [p.description] if p.description else []
        if p.color_jitter_prob:
            extras.append(f"colour jitter p={p.color_jitter_prob:g}")
        if p.gray_prob:
            extras.append(f"gray p={p.gray_prob:g}")
        if p.poisson_scale_range:
            extras.append(f"poisson {rng(p.poisson_scale_range)}")
        table.add_row(name, "\n".join([p.set_name, ranges, "; ".join(extras)]))
    return table


def degrade(
    target: Path | None = typer.Argument(
        None,
        help="Dataset root (with test_references.csv / val_references.csv) or any folder of images.",
    ),
    preset: list[str] = typer.Option(
        ["refldm-severe", "refldm-moderate"],
        "--preset",
        "-p",
        help="Preset name; repeat for several sets (see --list).",
    ),
    list_: bool = typer.Option(False, "--list", help="List the presets and their ranges, then exit."),
    out: Path | None = typer.Option(
        None, help="Output folder for the sets (default: <root>/lq, or <folder>_lq beside a folder)."
    ),
    workers: int = typer.Option(1, help="Worker processes."),
    seed: int = typer.Option(0, help="Seed; each image's draws come from (seed, preset, image path)."),
    presets_file: Path | None = typer.Option(
        None, "--presets-file", help="YAML file of custom presets (name -> fields, optional base: <preset>)."
    ),
    images: Path | None = typer.Option(
        None, help="Image root of gt_image paths when the dataset's build.json has no image_root."
    ),
    chunk_size: int = typer.Option(16, help="Images per resumable chunk."),
    exact: bool = typer.Option(
        False, help="Blur every pixel with OpenCV (BasicSR's exact calls) instead of the fused fast path."
    ),
) -> None:
    """Write LQ sets with named degradation presets, deterministically per image.

    For a dataset root the targets are the gt_image column of its test/val reference CSVs (under build.json's image_root); for a folder, every image in it. Each set goes to OUT/<set folder>/ (ReF-LDM names such as severe_b8-16_r8-32_n0-20_j30-100) with one PNG per target at its relative path, params.parquet/.csv (every sampled value), errors.parquet/.csv and manifest.json; the lq_image column of the reference CSVs is then filled in.

    Reruns skip finished sets and chunks; a killed run resumes and ends with the same bytes.
    """
    from refface.console import console, print_summary

    if presets_file is not None:
        from refface.degradations import load_presets_file

        try:
            loaded = load_presets_file(presets_file)
        except ValueError as e:
            console.print(f"[red]{e}")
            raise typer.Exit(2) from e
        console.print(f"loaded presets: {', '.join(sorted(loaded))}")
    if list_:
        console.print(_list_table())
        return
    if target is None:
        console.print("[red]give a TARGET (dataset root or folder), or --list")
        raise typer.Exit(2)
    from refface.builders.degrade_sets import DegradeConfig, degrade_target
    from refface.degradations import get_preset

    try:
        for name in preset:
            get_preset(name)
        config = DegradeConfig(
            presets=tuple(dict.fromkeys(preset)),
            seed=seed,
            workers=workers,
            chunk_size=chunk_size,
            fast=not exact,
        )
        summary = degrade_target(target, config, out=out, images=images)
    except ValueError as e:
        console.print(f"[red]{e}")
        raise typer.Exit(2) from e
    rows: list[tuple[str, object]] = [
        ("target", f"{summary['target']} ({summary['kind']})"),
        ("out", summary["out"]),
    ]
    for s in summary["sets"]:
        state = "written" if s["ran"] else "up to date"
        rows.append(
            (
                s["set"],
                f"{s['images']} images, {s['written']} new, {s['already_done']} resumed, "
                f"{s['errors']} errors, {s['seconds']:.1f} s ({state})",
            )
        )
    for csv in summary["csvs"]:
        rows.append(("lq_image filled", csv))
    print_summary("refface degrade", rows)
