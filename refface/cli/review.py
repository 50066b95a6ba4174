"""``refface review ROOT``: the identity review page of a built dataset root."""

from __future__ import annotations

from pathlib import Path

import typer

from refface.cli.errors import exits_on_error


def register(app: typer.Typer) -> None:
    app.command("review")(review)


@exits_on_error()
def review(
    root: Path = typer.Argument(..., help="Built dataset root (identities.parquet + embeddings)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Page folder (default ROOT/review)."),
    near_ratio: float = typer.Option(
        1.25, help="Show cluster pairs and singletons with average distance under this x threshold."
    ),
    max_pairs: int = typer.Option(3, help="Most 'possible same person' partners listed per identity."),
    thumb_size: int = typer.Option(96, help="Thumbnail side in pixels (JPEGs written once)."),
    workers: int = typer.Option(2, help="Processes writing thumbnails."),
    labels: Path | None = typer.Option(
        None,
        help="Known labels CSV (path, identity): identities holding several labels are shown, and "
        "ROOT/review/corrections_from_labels.csv gives every identity one label.",
    ),
) -> None:
    """Write ROOT/review/index.html: one row per identity, faces ordered by distance to the medoid,
    outliers flagged, possible same-person pairs side by side, singletons near a cluster, reference
    lists; keyboard review whose decisions export as corrections.csv for `refface build --corrections`.

    Open the page from disk in any browser; decisions stay in the browser until exported.
    """
    from refface.console import print_summary
    from refface.review.data import ReviewConfig
    from refface.review.page import write_review

    config = ReviewConfig(
        near_ratio=near_ratio,
        max_pairs=max_pairs,
        thumb_size=thumb_size,
        workers=workers,
        labels=str(labels) if labels else None,
    )
    summary = write_review(root, config, out)
    print_summary("refface review", summary)
