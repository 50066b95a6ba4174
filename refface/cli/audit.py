"""``refface audit``: leakage between image sets (exact, near-duplicate, same identity) as a CI gate."""

from __future__ import annotations

from pathlib import Path

import typer

from refface.cli.errors import exits_on_error
from refface.mining.tta import DEFAULT_TTA


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)


@exits_on_error()
def audit(
    sets: list[str] = typer.Option(
        ...,
        "--set",
        metavar="NAME=SOURCE",
        help="NAME=SOURCE, given two or more times. SOURCE is a split list (*_image.txt), a reference CSV "
        "(gt_image, ref_image), a dataset root (its embeddings are reused) or a plain folder of images "
        "(mined into OUT/cache/mined/NAME).",
    ),
    out: Path = typer.Option(
        Path("out/audit"), "--out", help="Folder for summary.json, leaks.csv and report.html."
    ),
    max_leak_rate: float = typer.Option(
        0.0, help="Fail (exit 1) when any pair of sets leaks more than this fraction of images."
    ),
    identity_rule: str = typer.Option(
        "cluster",
        help="cluster: faces are the same person when the builder's identity clustering of both sets joins "
        "them (a split made from those clusters audits clean); pair: any cross pair closer than the identity "
        "threshold (raw rule; flags look-alikes with weak embedders such as dlib).",
    ),
    identity_threshold: float | None = typer.Option(
        None,
        help="Same-identity distance bar in the embedder's metric (pairs with distance below it leak); "
        "default: the value recorded with the embeddings (the builder's rule).",
    ),
    near_dup_threshold: float | None = typer.Option(
        None, help="Embedding distance below which two faces are near-duplicates; default: identity bar / 4."
    ),
    phash_distance: int = typer.Option(
        10,
        help="Perceptual-hash bits (of 64, image or its mirror) at or below which images are near-duplicates.",
    ),
    image_root: Path | None = typer.Option(
        None, help="Folder that split lists / reference CSVs outside a dataset root are relative to."
    ),
    detector: str = typer.Option("dlib", help="Face detector for plain folders that must be mined."),
    embedder: str = typer.Option("dlib", help="Face embedder for plain folders; must match the other sets."),
    tta: str = typer.Option(
        DEFAULT_TTA,
        help="Embedder test-time augmentation for plain folders (none, flip); must match the other sets.",
    ),
    workers: int = typer.Option(2, help="Worker processes for hashing and mining."),
    index: str = typer.Option("auto", help="FAISS index: auto, flat or ivf (as in the mining core)."),
    sheet_pairs: int = typer.Option(
        24, help="Leaked pairs shown side by side in report.html per pair of sets."
    ),
    no_hash: bool = typer.Option(
        False, "--no-hash", help="Skip content and perceptual hashes (embeddings only)."
    ),
) -> None:
    """Find leakage between image sets: exact duplicates, near-duplicates and same-identity pairs.

    Every pair of sets is compared; reference lists of each dataset root involved are checked never
    to cross splits. Writes OUT/summary.json, OUT/leaks.csv and a self-contained OUT/report.html.
    Exits 1 when leakage exceeds --max-leak-rate (default 0), so it can gate CI; exits 2 on bad input.
    """
    from refface.audit.config import AuditConfig
    from refface.audit.run import audit_sets
    from refface.audit.sets import parse_set_specs
    from refface.console import console, print_summary

    named = parse_set_specs(sets)
    config = AuditConfig(
        identity_rule=identity_rule,
        identity_threshold=identity_threshold,
        near_dup_threshold=near_dup_threshold,
        phash_distance=phash_distance,
        max_leak_rate=max_leak_rate,
        detector=detector,
        embedder=embedder,
        tta=tta,
        workers=workers,
        index=index,
        sheet_pairs=sheet_pairs,
        hash_images=not no_hash,
        image_root=str(image_root) if image_root else None,
    )
    summary = audit_sets(named, out, config)

    from rich.table import Table

    table = Table(title="leakage between sets", title_justify="left")
    # Short headers so the table fits an 80-column terminal.
    for col in ("pair", "imgs a", "imgs b", "leak a", "leak b", "rate", "ids", "exact", "near", "same"):
        table.add_column(col, justify="right")
    for key, p in summary["pairs"].items():
        a, b = p["sets"]
        k = p["pairs_by_kind"]
        table.add_row(
            key,
            str(p["images"][a]),
            str(p["images"][b]),
            str(p["leaked_images"][a]),
            str(p["leaked_images"][b]),
            f"{p['leak_rate']:.3g}",
            str(p["leaked_identities"]),
            str(k["exact"]),
            str(k["near_duplicate"]),
            str(k["same_identity"]),
        )
    console.print(table)
    th = summary["thresholds"]
    print_summary(
        "refface audit",
        {
            "embedder": f"{summary['model']['model']} ({str(summary['model']['fingerprint'])[:12]})",
            "identity rule": (
                f"{th['cluster_method']} clustering, cosine cut {th['cluster_cosine_distance']:.4g}"
                if th["identity_rule"] == "cluster"
                else f"pairs with {th['metric']} distance < {th['identity_distance']:.4g}"
            ),
            "near-duplicate bar": f"phash <= {th['phash_distance']} and distance < {th['near_duplicate_distance']:.4g}",
            "cross-split references": summary["references"]["cross_split_references"],
            "errors": sum(s["errors"] for s in summary["sets"].values()),
            "worst leak rate": summary["worst_leak_rate"],
            "result": "PASSED" if summary["passed"] else f"FAILED (max leak rate {max_leak_rate:g})",
            "report": str(out / "report.html"),
        },
    )
    if not summary["passed"]:
        raise typer.Exit(1)
