"""``refface shards write|verify`` and ``refface attributes``: data files derived from a dataset root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from refface.cli.errors import exits_on_error
from refface.console import console, print_summary
from refface.manifests.layout import ATTRIBUTES
from refface.manifests.shard_index import ShardError


class _WriteByDefault(TyperGroup):
    """``refface shards ROOT ...`` (no sub-command) means ``refface shards write ROOT ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own click Context
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["write", *args]
        return super().parse_args(ctx, args)


shards_app = typer.Typer(
    cls=_WriteByDefault,
    no_args_is_help=True,
    help="""Write a split of a dataset root as WebDataset shards, or verify written shards.

\b
  refface shards write ROOT --out DIR [--split train|val] [--max-refs 5] [--codec png|jpeg|webp]
  refface shards verify DIR [--skip-bad-shards]
  refface shards ROOT --out DIR       (the same as write)
""",
)


def register(app: typer.Typer) -> None:
    app.add_typer(shards_app, name="shards")
    app.command("attributes")(attributes)


@shards_app.command("write")
@exits_on_error(code=2)
def write(
    root: Path = typer.Argument(..., help="Dataset root to write from."),
    out: Path = typer.Option(..., "--out", help="Shard folder to write into."),
    split: str = typer.Option("train", help="Split to write: train, val or test."),
    max_refs: int = typer.Option(5, help="References stored per target (the first K of its list)."),
    codec: str = typer.Option("png", help="Image codec: png (lossless), jpeg or webp."),
    quality: int = typer.Option(95, help="JPEG/WebP quality."),
    shard_bytes: int = typer.Option(1_000_000_000, help="Rotate to a new shard before it passes this size."),
    shard_count: int = typer.Option(100_000, help="Rotate to a new shard after this many samples."),
    lq_preset: str | None = typer.Option(
        None, help="val/test: degrade targets with this preset when the CSV's LQ files do not exist."
    ),
    seed: int = typer.Option(0, help="Seed of the fixed LQ degradation."),
    workers: int = typer.Option(1, help="Encoder processes (the shard bytes do not depend on it)."),
    force: bool = typer.Option(False, help="Rewrite even when the index is up to date."),
) -> None:
    """Write a split of a dataset root as WebDataset shards.

    Reads ROOT's <split>_references.csv, build.json (image_root), embeddings, identities.parquet
    and attributes.parquet (when present) and writes DIR/<split>-NNNNNN.tar plus DIR/index-<split>.json
    (shard -> samples, bytes, sha256), the index last. Tars are reproducible (fixed mtime/owner, sorted
    members); a killed run resumes after its last finished shard; a rerun with the same inputs does
    nothing. A target or reference path that leaves the image root becomes an error row, unread.
    """
    from refface.builders.shards import ShardsConfig, write_shards

    config = ShardsConfig(
        split=split,
        max_refs=max_refs,
        codec=codec,
        quality=quality,
        shard_bytes=shard_bytes,
        shard_count=shard_count,
        lq_preset=lq_preset,
        seed=seed,
        workers=workers,
    )
    config.validate()
    result = write_shards(root, out, config, force=force)
    print_summary(
        f"refface shards {split}",
        {
            "samples": result["samples"],
            "shards": result["shards"],
            "MB": round(result["bytes"] / 1e6, 2),
            "up to date (skipped)": result["skipped"],
            "shards reused (resume)": result["resumed_shards"],
            "errors": result["errors"],
            "index": result["index"],
        },
    )


@shards_app.command("verify")
@exits_on_error(code=1, errors=(ShardError, FileNotFoundError, ValueError))
def verify(
    folder: Path = typer.Argument(..., help="The shard folder to check."),
    skip_bad_shards: bool = typer.Option(
        False, "--skip-bad-shards", help="Warn about bad shards and go on instead of stopping."
    ),
) -> None:
    """Re-read every shard of a folder against its index and decode every member."""
    from refface.manifests.webdataset import verify_shards

    result = verify_shards(folder, skip_bad_shards=skip_bad_shards)
    print_summary(
        f"refface shards verify {folder}",
        {
            "splits": ", ".join(result["splits"]),
            "shards": result["shards"],
            "samples": result["samples"],
            "bad shards (skipped)": len(result["bad"]),
        },
    )
    for message in result["bad"]:
        console.print(f"[yellow]bad: {message}")


@exits_on_error(code=2)
def attributes(
    root: Path = typer.Argument(..., help="Dataset root (images.parquet or reference CSVs, build.json)."),
    backend: str = typer.Option(
        "deepface",
        help="Analyzer: clip (zero-shot eye/hair colour, hair length, facial hair, glasses, makeup, age "
        "group, expression, skin tone; needs --clip-model), deepface, or torch (a TorchScript --model).",
    ),
    clip_model: str | None = typer.Option(
        None, help="clip backend: local transformers CLIP folder (config.json, weights, tokenizer)."
    ),
    thresholds: str | None = typer.Option(
        None, help="clip backend: JSON {group: threshold} (from --calibrate); default: built-in values."
    ),
    calibrate: str | None = typer.Option(
        None,
        help="Write calibrated thresholds instead: a CSV of known labels (path + one column per group) "
        "scored against ROOT's attributes.parquet; the JSON goes to --thresholds.",
    ),
    precision: float = typer.Option(0.9, help="--calibrate: share of stated labels that must be right."),
    deepface_home: str | None = typer.Option(
        None, help="Folder holding .deepface/weights/ (default: $DEEPFACE_HOME); nothing is downloaded."
    ),
    model: str | None = typer.Option(None, help="torch backend: TorchScript file of the attribute model."),
    template: str | None = typer.Option(
        None, help="deepface/torch prompt template; fields {age} {gender} {race} {emotion}."
    ),
    device: str = typer.Option("cpu", help="clip backend: torch device."),
    batch_size: int = typer.Option(16, help="Crops per analyzer call."),
    force: bool = typer.Option(False, help="Recompute even when attributes.parquet is up to date."),
) -> None:
    """Attributes of every aligned crop and its text prompts -> attributes.parquet (docs/shards.md)."""
    from refface.mining.attributes import DEFAULT_PROMPT_TEMPLATE, AttributesConfig, run_attributes

    if calibrate is not None:
        return _calibrate(root, calibrate, thresholds, precision)
    config = AttributesConfig(
        backend=backend,
        deepface_home=deepface_home,
        model_path=model,
        clip_model=clip_model,
        thresholds=thresholds,
        device=device,
        template=template or DEFAULT_PROMPT_TEMPLATE,
        batch_size=batch_size,
    )
    manifest, ran = run_attributes(root, config, force=force)
    print_summary(
        "refface attributes",
        {
            "rows": manifest.get("rows"),
            "errors": manifest.get("errors"),
            "up to date (skipped)": not ran,
            "output": str(Path(root) / ATTRIBUTES),
        },
    )


def _calibrate(root: Path, labels: str, out: str | None, precision: float) -> None:
    import json

    import pandas as pd

    from refface.console import print_summary
    from refface.manifests.atomic import write_text
    from refface.manifests.root import DatasetRoot
    from refface.mining.vocabulary import calibrate_thresholds

    if out is None:
        raise ValueError("--calibrate writes its thresholds to --thresholds FILE; name the file")
    table = DatasetRoot(root).attributes()
    if table is None or "scores" not in table.columns:
        raise FileNotFoundError(
            f"{root}/attributes.parquet with clip scores not found; run --backend clip first"
        )
    truth = pd.read_csv(labels, dtype=str, keep_default_na=False)
    result = calibrate_thresholds(table, truth, precision=precision)
    if not result:
        raise ValueError(f"{labels} labels no vocabulary group for the images of {root}")
    write_text(Path(out), json.dumps({g: r["threshold"] for g, r in result.items()}, indent=2) + "\n")
    rows = {
        g: f"{r['threshold']:.3f} ({r['stated']}/{r['labeled']} stated, precision {r['precision']:.2f})"
        for g, r in result.items()
    }
    print_summary("attribute thresholds", {**rows, "written": out})
