"""Experiment trackers for the training loop: which to use, how to start them, where images go.

``loop.report_to`` is passed through to accelerate: ``tensorboard``, ``wandb``, ``mlflow`` (or any
other tracker accelerate knows), several separated by commas, ``all`` (every installed one) or
``none``. Validation grids go to every tracker that takes images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# accelerate's tracker names, and the pip package that brings each one.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow-skinny",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
PROJECT = "train"


def parse_report_to(report_to: str | list[str] | None) -> list[str]:
    """The tracker names in ``report_to`` (``"none"`` and empty give []); unknown names raise."""
    if report_to is None:
        return []
    names = report_to if isinstance(report_to, list | tuple) else str(report_to).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKER_PACKAGES and n != "all"]
    if unknown:
        raise ValueError(
            f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKER_PACKAGES)}, all or none"
        )
    return names


def installed_trackers() -> list[str]:
    """The trackers whose packages are installed (what ``all`` means)."""
    from accelerate.tracking import get_available_trackers

    return sorted(str(getattr(t, "value", t)) for t in get_available_trackers())


def resolve_trackers(report_to: str | list[str] | None) -> list[str]:
    """Tracker names to hand accelerate: ``all`` expands to the installed ones; a requested tracker
    that is not installed raises with the pip command that installs it."""
    names = parse_report_to(report_to)
    if not names:
        return []
    available = installed_trackers()
    if "all" in names:
        return available
    missing = [n for n in names if n not in available]
    if missing:
        pkgs = " ".join(TRACKER_PACKAGES[n] for n in missing)
        raise ValueError(f"report_to names {missing} but it is not installed: pip install {pkgs}")
    return list(dict.fromkeys(names))


def init_kwargs(trackers: list[str], output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Per-tracker start options that keep a run's files beside its outputs unless the user's
    environment (``WANDB_DIR``, ``MLFLOW_TRACKING_URI``) says otherwise."""
    out = Path(output_dir).resolve()
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in trackers:
        kwargs["wandb"] = {"dir": os.environ.get("WANDB_DIR", str(out)), "name": out.name}
    if "mlflow" in trackers:
        kwargs["mlflow"] = {"run_name": out.name}
    return kwargs


def prepare_environment(trackers: list[str], output_dir: str | os.PathLike) -> None:
    """Point MLflow at a file store in ``<output_dir>/mlruns`` when no tracking URI is configured
    (MLflow 3 accepts a file store only with ``MLFLOW_ALLOW_FILE_STORE``; a server or database URI
    in ``MLFLOW_TRACKING_URI`` is used as it is)."""
    if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((Path(output_dir).resolve() / "mlruns").as_uri())


def log_image(accelerator, name: str, image, step: int) -> list[str]:
    """Send a uint8 ``(H, W, 3)`` image to every tracker that takes images; returns their names."""
    sent = []
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, image, step, dataformats="HWC")
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(image, artifact_file=f"{name}/step_{step:06d}.png")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [image]}, step=step)
        else:
            logger.debug("tracker %s takes no images; %s not sent", tracker.name, name)
            continue
        sent.append(tracker.name)
    return sent
