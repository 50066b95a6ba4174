"""What a training run shows and records about itself: the progress bar (loss, it/s, ETA) on the main
process, or a status line in non-interactive logs, and the devices it trains on."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

# The console module, not its console: looked up per bar, as tests and redirected output swap it.
from refface import console as terminal
from refface.devices import runtime_devices

# Status lines belong to the training loop's log (a batch job filters on refface.train.loop).
logger = logging.getLogger("refface.train.loop")


def run_devices(accelerator) -> dict[str, Any]:
    """What the run trains on (recorded in ``config.json``)."""

    return {
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        **runtime_devices(),
    }


class TrainProgress:
    """A progress bar with loss, it/s and ETA on the main process (REFFACE_PROGRESS=0 hides it);
    where the console is not a terminal (a batch job's log file) a status line every ``log_every``."""

    def __init__(self, accelerator, start: int, total: int) -> None:
        self.main = accelerator.is_main_process
        self.start, self.total = start, total
        self.t0 = time.perf_counter()
        self.bar = None
        self.interactive = terminal.console.is_terminal and terminal.progress_enabled()
        if self.main and self.interactive and start < total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} it/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=terminal.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", rate="-")
            self.bar.start()

    def rate(self, step: int) -> float:
        return (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, step: int, loss: float, log_line: bool) -> None:
        if not self.main:
            return
        rate = self.rate(step)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.2f}")
        elif log_line and terminal.progress_enabled():
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            logger.info("step %d/%d  loss %.4f  %.2f it/s  ETA %s", step, self.total, loss, rate, hms(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
