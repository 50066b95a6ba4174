"""What the user watches: a rich console, progress bars and the end-of-run summary table."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)
T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("REFFACE_PROGRESS", "1") != "0"


def make_progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not progress_enabled(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (disabled with REFFACE_PROGRESS=0)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def summary_table(title: str, rows: Mapping[str, object] | Iterable[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    items = rows.items() if isinstance(rows, Mapping) else rows
    for key, value in items:
        table.add_row(str(key), f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def print_summary(title: str, rows: Mapping[str, object] | Iterable[tuple[str, object]]) -> None:
    console.print(summary_table(title, rows))


def setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    if not verbose:
        # accelerate logs every file of every checkpoint at INFO; refface logs one line per checkpoint.
        for name in ("accelerate.checkpointing", "accelerate.accelerator"):
            logging.getLogger(name).setLevel(logging.WARNING)
