"""Watching a run: report_to passed through to accelerate, validation grids to every tracker that
takes images, the progress bar / status lines, and key=value config overrides."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from common.tiny_refldm import _fresh_accelerate_state  # noqa: E402, F401  (autouse fixture)
from test_train_loop import ToyTask, _cfg, _loader  # noqa: E402

from refface.train import tracking  # noqa: E402
from refface.train.loop import train  # noqa: E402
from refface.train.loop_config import LoopConfig  # noqa: E402
from refface.train.overrides import apply_overrides, parse_override  # noqa: E402

INSTALLED = tracking.installed_trackers()


# ------------------------------------------------------------------------------------------ report_to


def test_report_to_names_are_checked_when_the_config_is_built(tmp_path):
    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to("") == []
    assert tracking.parse_report_to("wandb, tensorboard") == ["wandb", "tensorboard"]
    assert tracking.parse_report_to(["mlflow"]) == ["mlflow"]
    with pytest.raises(ValueError, match="unknown tracker"):
        _cfg(tmp_path, report_to="tensorbored")
    assert _cfg(tmp_path, report_to=["tensorboard", "mlflow"]).report_to == "tensorboard,mlflow"


def test_a_tracker_that_is_not_installed_names_its_package(monkeypatch):
    monkeypatch.setattr(tracking, "installed_trackers", lambda: ["tensorboard"])
    with pytest.raises(ValueError, match="pip install wandb"):
        tracking.resolve_trackers("tensorboard,wandb")
    assert tracking.resolve_trackers("all") == ["tensorboard"]
    assert tracking.resolve_trackers("tensorboard,tensorboard") == ["tensorboard"]


def test_all_means_every_installed_tracker():
    assert tracking.resolve_trackers("all") == INSTALLED
    assert "tensorboard" in INSTALLED  # comes with the [train] extra


def _tensorboard_tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.mark.slow  # W&B's offline service takes most of a minute to start and stop
def test_every_installed_tracker_gets_scalars_and_validation_grids(tmp_path, monkeypatch):
    """report_to=all on the toy task: TensorBoard, and W&B (offline) and MLflow (local files) where installed."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sent = []
    real = tracking.log_image
    monkeypatch.setattr(tracking, "log_image", lambda *a, **k: sent.append(real(*a, **k)) or sent[-1])
    logs = train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=4, validate_every=2, report_to="all"))
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert sent == [[t for t in INSTALLED if t in ("tensorboard", "wandb", "mlflow")]] * 2

    scalars, images = _tensorboard_tags(tmp_path / "logs")
    assert {"loss", "lr"} <= scalars and "validation" in images

    if "mlflow" in INSTALLED:
        pngs = sorted(p.name for p in (tmp_path / "mlruns").rglob("validation/step_*.png"))
        assert pngs == ["step_000002.png", "step_000004.png"]
        assert list((tmp_path / "mlruns").rglob("metrics/loss"))
    if "wandb" in INSTALLED:
        media = list((tmp_path / "wandb").rglob("media/images/validation_*.png"))
        assert len(media) == 2
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["devices"]["device"] == "cpu" and saved["devices"]["processes"] == 1


def test_report_to_none_starts_no_tracker(tmp_path):
    train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=2, validate_every=2, report_to="none"))
    assert not (tmp_path / "logs").exists() and not (tmp_path / "mlruns").exists()
    assert (tmp_path / "validation" / "step_000002.png").is_file()


# ------------------------------------------------------------------------------------------- progress


def test_progress_bar_shows_loss_rate_and_eta(tmp_path, monkeypatch):
    from rich.console import Console

    import refface.console

    buf = io.StringIO()
    monkeypatch.setattr(refface.console, "console", Console(file=buf, force_terminal=True, width=160))
    monkeypatch.setenv("REFFACE_PROGRESS", "1")
    train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=6, validate_every=0))
    out = buf.getvalue()
    assert "6/6" in out and re.search(r"loss \d+\.\d{4}", out), out
    assert re.search(r"\d+\.\d\d it/s", out) and "ETA" in out, out


def test_a_log_file_gets_status_lines_instead(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("REFFACE_PROGRESS", "1")
    with caplog.at_level(logging.INFO, logger="refface.train.loop"):
        train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=4, log_every=2, validate_every=0))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all("loss" in line and "it/s" in line and "ETA" in line for line in lines)


# ------------------------------------------------------------------------------------------ overrides


def test_overrides_parse_values_as_yaml():
    assert parse_override("loop.max_steps=100") == (["loop", "max_steps"], 100)
    assert parse_override("loop.learning_rate=1e-4") == (["loop", "learning_rate"], 1e-4)
    assert parse_override("loop.ema_decay=null") == (["loop", "ema_decay"], None)
    assert parse_override("loop.adam_betas=[0.9, 0.99]") == (["loop", "adam_betas"], [0.9, 0.99])
    assert parse_override("loop.report_to=wandb,tensorboard")[1] == "wandb,tensorboard"
    for bad in ("loop.max_steps", "=3", "loop..x=1"):
        with pytest.raises(ValueError, match="section.key=value"):
            parse_override(bad)


def test_overrides_nest_and_refuse_bad_paths():
    cfg = {"loop": {"max_steps": 10}, "unet": {"channels": [1, 2]}}
    out = apply_overrides(cfg, ["loop.max_steps=3", "data.batch_size=2", "unet.channels=[4]"])
    assert out == {"loop": {"max_steps": 3}, "unet": {"channels": [4]}, "data": {"batch_size": 2}}
    assert cfg["loop"]["max_steps"] == 10  # the input is not modified
    with pytest.raises(ValueError, match="is a value, not a section"):
        apply_overrides(cfg, ["loop.max_steps.x=1"])
    with pytest.raises(ValueError, match="unknown section 'model'"):
        apply_overrides(cfg, ["model.x=1"], sections=("loop", "mgfr"))


def test_refldm_config_overrides(tmp_path):
    from refface.train.refldm.config import load_config
    from refface.train.refldm.train import parse_args

    args = parse_args(
        ["--config", "configs/refldm_tiny.yaml", "--dataset", "d", "--output", "o", "loop.max_steps=7"]
    )
    assert args.overrides == ["loop.max_steps=7"]
    cfg, loop = load_config(args.config, [*args.overrides, "data.batch_size=3", "loop.report_to=all"])
    assert loop["max_steps"] == 7 and loop["report_to"] == "all" and cfg.data.batch_size == 3
    assert LoopConfig.from_dict({**loop, "output_dir": str(tmp_path)}).max_steps == 7
    with pytest.raises(ValueError, match="unknown loop config keys"):
        LoopConfig.from_dict({**load_config(args.config, ["loop.max_stepz=1"])[1], "output_dir": "x"})


def test_mgfr_config_overrides():
    from refface.train.mgfr.config import MGFRConfig, load_yaml_config
    from refface.train.mgfr.train import parse_args

    args = parse_args(["--config", "configs/mgfr_tiny.yaml", "--sd", "sd", "--output", "o", "--stage", "2"])
    assert args.overrides == []
    loop, mgfr = load_yaml_config(args.config, 2, ["loop.max_steps=9", "mgfr.batch_size=1"])
    assert loop["max_steps"] == 9 and mgfr["batch_size"] == 1 and mgfr["stage"] == 2
    assert MGFRConfig.from_dict(mgfr).batch_size == 1
    with pytest.raises(ValueError, match="unknown section"):
        load_yaml_config(args.config, 1, ["stage2.loop.max_steps=1"])


def test_cli_passes_overrides_and_reports_bad_ones(tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    result = CliRunner().invoke(
        app,
        ["train", "refldm", "--dataset", str(tmp_path), "--config", "configs/refldm_tiny.yaml",
         "--output", str(tmp_path / "run"), "loop.max_stepz=3"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "max_stepz" in result.output
    help_text = CliRunner().invoke(app, ["train", "mgfr", "--help"]).output
    assert "KEY=VALUE" in help_text
