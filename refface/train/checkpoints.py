"""Training checkpoints on disk: write (atomically, ``state.json`` last), find, list, resume and load
weights for inference or a later stage.

Layout of ``<output_dir>/checkpoints/step_000100/``::

    trainable/<name>.safetensors live (fp32) weights of each trainable module
    ema/<name>.safetensors       EMA weights (when ema_decay is set) + ema.json
    accelerate/                  optimizer, scheduler, RNG and accelerate state (save_state)
    state.json                   step, epoch, batch position, config; written LAST (done-marker)"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refface.manifests.atomic import atomic_path, write_json
from refface.train.ema import unwrap_model

STATE_VERSION = 1


logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where training stands: optimizer steps done and the data position within the epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def find_checkpoint(output_dir: str | Path, which: str | None = "latest") -> Path | None:
    """Resolve ``which`` to a complete checkpoint folder (one with ``state.json``).

    Args:
        output_dir: the run's output folder.
        which: ``"latest"`` (newest complete checkpoint or ``None`` when there is none), a
            checkpoint folder path, or ``None`` (never resume).

    Raises:
        FileNotFoundError: ``which`` names a folder that is not a complete checkpoint.
    """
    if which is None or which == "":
        return None
    if which == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(which)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json inside)")
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``<output_dir>/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def load_trainable_weights(checkpoint: str | Path, modules: dict[str, Any], use_ema: bool = True) -> str:
    """Load a checkpoint's weights into ``modules`` (name -> module) for inference or a later stage.

    Args:
        checkpoint: a checkpoint folder (``.../checkpoints/step_N``).
        modules: the modules to fill, keyed like the task's ``trainable_modules()``.
        use_ema: prefer the EMA weights when the checkpoint has them.

    Returns:
        ``"ema"`` or ``"trainable"``: which weights were loaded.
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    kind = "ema" if use_ema and (checkpoint / "ema" / "ema.json").is_file() else "trainable"
    for name, module in modules.items():
        f = checkpoint / kind / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} has no weights for module {name!r} ({f})")
        unwrap_model(module).load_state_dict(load_file(str(f)), strict=True)
    return kind


def save_checkpoint(out: Path, state: LoopState, config, task, accelerator, modules, ema) -> None:
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"step_{state.step:06d}"
    tmp = root / f".step_{state.step:06d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Every process writes its own RNG state; the main process writes models and optimizer.
    accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
    # Every rank's RNG file must be in place before the folder is renamed into its final name.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainable").mkdir()
        for name, module in modules.items():
            sd = {
                k: v.detach().cpu().contiguous()
                for k, v in accelerator.unwrap_model(module).state_dict().items()
            }
            with atomic_path(tmp / "trainable" / f"{name}.safetensors") as t:
                save_file(sd, str(t))
        if ema is not None:
            ema.save(tmp / "ema", {n: accelerator.unwrap_model(m) for n, m in modules.items()})
        write_json(
            tmp / "state.json",
            {
                "version": STATE_VERSION,
                "step": state.step,
                "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch,
                "loop": config.to_dict(),
                "task": task.config_dict(),
            },
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if config.checkpoints_total_limit > 0:
            for old in list_checkpoints(out)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)
    accelerator.wait_for_everyone()


def load_checkpoint(ckpt: Path, accelerator, ema) -> LoopState:
    meta = json.loads((ckpt / "state.json").read_text())
    if meta.get("version") != STATE_VERSION:
        raise ValueError(
            f"{ckpt}/state.json has version {meta.get('version')}, this loop reads {STATE_VERSION}"
        )
    accelerator.load_state(str(ckpt / "accelerate"))
    if ema is not None:
        if (ckpt / "ema" / "ema.json").is_file():
            ema.load(ckpt / "ema")
        else:
            logger.warning("%s has no EMA weights; the EMA restarts from the current weights", ckpt)
    return LoopState(
        step=int(meta["step"]), epoch=int(meta["epoch"]), batch_in_epoch=int(meta["batch_in_epoch"])
    )
