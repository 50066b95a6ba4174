"""``refface shards``, ``refface shards verify`` and ``refface attributes``."""

from __future__ import annotations

from pathlib import Path

import typer

SHARDS_HELP = """Write a split of a dataset root as WebDataset shards, or verify written shards.

\b
  refface shards ROOT --out DIR [--split train|val] [--max-refs 5] [--codec png|jpeg|webp]
  refface shards verify DIR [--skip-bad-shards]

Writing reads ROOT's <split>_references.csv, build.json (image_root), embeddings, identities.parquet
and attributes.parquet (when present) and writes DIR/<split>-NNNNNN.tar plus DIR/index-<split>.json
(shard -> samples, bytes, sha256), the index last. Tars are reproducible (fixed mtime/owner, sorted
members); a killed run resumes after its last finished shard; a rerun with the same inputs does
nothing. Verifying re-reads every shard against its index and decodes every member.
"""


def register(app: typer.Typer) -> None:
    app.command("shards", help=SHARDS_HELP)(shards)
    app.command("attributes")(attributes)


def shards(
    root: str = typer.Argument(..., help="Dataset root to write from, or the word 'verify'."),
    folder: Path | None = typer.Argument(None, help="With 'verify': the shard folder to check."),
    out: Path | None = typer.Option(None, "--out", help="Shard folder to write into."),
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
    skip_bad_shards: bool = typer.Option(
        False, "--skip-bad-shards", help="verify: warn about bad shards and go on instead of stopping."
    ),
) -> None:
    from refface.builders.shards import ShardError, ShardsConfig, verify_shards, write_shards
    from refface.console import console, print_summary

    if root == "verify":
        if folder is None:
            raise typer.BadParameter("usage: refface shards verify DIR")
        try:
            result = verify_shards(folder, skip_bad_shards=skip_bad_shards)
        except (ShardError, FileNotFoundError, ValueError) as e:
            console.print(f"[red]{e}")
            raise typer.Exit(1) from e
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
        return
    if out is None:
        raise typer.BadParameter("--out DIR is required when writing shards")
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
    try:
        config.validate()
        result = write_shards(root, out, config, force=force)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}")
        raise typer.Exit(2) from e
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
    from refface.console import console, print_summary
    from refface.mining.attributes import DEFAULT_PROMPT_TEMPLATE, AttributesConfig, run_attributes

    try:
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
    except (ValueError, FileNotFoundError, ImportError) as e:
        console.print(f"[red]{e}")
        raise typer.Exit(2) from e
    print_summary(
        "refface attributes",
        {
            "rows": manifest.get("rows"),
            "errors": manifest.get("errors"),
            "up to date (skipped)": not ran,
            "output": str(Path(root) / "attributes.parquet"),
        },
    )


def _calibrate(root: Path, labels: str, out: str | None, precision: float) -> None:
    import json

    import pandas as pd

    from refface.console import print_summary
    from refface.manifests.atomic import write_text
    from refface.mining.attributes import read_attributes
    from refface.mining.vocabulary import calibrate_thresholds

    if out is None:
        raise ValueError("--calibrate writes its thresholds to --thresholds FILE; name the file")
    table = read_attributes(root)
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
