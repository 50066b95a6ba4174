"""What a training run is configured with and what a model provides to the shared loop:
:class:`LoopConfig` (saved beside the outputs and inside every checkpoint) and the :class:`TrainTask`
protocol; ``config_from_dict`` builds any config section and names unknown keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from refface.train import tracking

MIXED_PRECISIONS = ("no", "fp16", "bf16")


LR_SCHEDULES = ("constant", "cosine", "linear")


def config_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """Build dataclass ``cls`` from a mapping; keys it does not declare raise ``ValueError`` naming them.

    Args:
        cls: the config dataclass.
        d: its values (e.g. one section of a YAML config).
        what: the section's name in the error message (``unknown <what> config keys ...``).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} config keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


@dataclass
class LoopConfig:
    """Everything the shared loop needs; saved beside the outputs and inside every checkpoint.

    Attributes:
        output_dir: folder for checkpoints, logs, validation grids and ``config.json``.
        max_steps: number of optimizer steps (a resumed run continues up to this count).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping norm (0 disables clipping).
        mixed_precision: ``no``, ``fp16`` or ``bf16``; frozen modules are cast to it, trainable stay fp32.
        gradient_checkpointing: call ``enable_gradient_checkpointing()`` on every module that has it.
        ema_decay: EMA decay of the trainable weights; ``None`` disables EMA.
        checkpoint_every: optimizer steps between checkpoints (a final one is always written).
        checkpoints_total_limit: keep at most this many checkpoints (oldest deleted); 0 keeps all.
        validate_every: optimizer steps between validation grids (0 disables).
        log_every: optimizer steps between TensorBoard scalar writes.
        seed: base seed for data order, noise and initialisation.
        lr_warmup_steps: linear warmup length in optimizer steps.
        lr_schedule: ``constant``, ``cosine`` or ``linear`` decay after warmup.
        resume: ``"latest"`` (resume if a checkpoint exists), a checkpoint folder, or ``None``.
        report_to: experiment trackers, passed through to accelerate: ``tensorboard``, ``wandb``,
            ``mlflow`` (or another tracker accelerate knows), several separated by commas, ``all``
            (every installed one) or ``none``.
    """

    output_dir: str
    max_steps: int
    learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = 0.9999
    checkpoint_every: int = 1000
    checkpoints_total_limit: int = 3
    validate_every: int = 1000
    log_every: int = 10
    seed: int = 0
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    resume: str | None = "latest"
    report_to: str = "tensorboard"

    def __post_init__(self) -> None:
        betas = [float(b) for b in self.adam_betas]
        if len(betas) != 2:
            raise ValueError(f"adam_betas needs two values (beta1, beta2), got {self.adam_betas}")
        self.adam_betas = (betas[0], betas[1])
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1 (a final checkpoint is always written)")
        if isinstance(self.report_to, list | tuple):
            self.report_to = ",".join(str(n) for n in self.report_to)
        tracking.parse_report_to(self.report_to)  # unknown tracker names raise here, before any work
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or null, got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopConfig:
        """Build from a mapping (e.g. the ``loop:`` section of a YAML config); unknown keys raise."""
        return config_from_dict(cls, d, "loop")


@runtime_checkable
class TrainTask(Protocol):
    """What a model provides to the shared loop.

    The loop calls, in order: ``trainable_modules()`` / ``frozen_modules()`` (once, before
    ``accelerator.prepare``), ``bind(...)`` (after prepare, again around validation), then
    ``compute_loss`` per micro-batch and ``validation_grid`` every ``validate_every`` steps.
    Optional: ``fp32_frozen_modules()`` -> names of frozen modules kept in fp32 under mixed precision.
    """

    def trainable_modules(self) -> dict[str, Any]:
        """name -> ``torch.nn.Module`` updated by the optimizer (kept in fp32, wrapped by DDP)."""
        ...

    def frozen_modules(self) -> dict[str, Any]:
        """name -> ``torch.nn.Module`` never updated (``requires_grad_(False)``, cast to the compute dtype)."""
        ...

    def bind(self, modules: dict[str, Any], weight_dtype: Any, device: Any) -> None:
        """Receive the modules to call in ``compute_loss`` (DDP-wrapped during training, bare during
        validation), the compute dtype of the frozen modules and the device."""
        ...

    def compute_loss(self, batch: dict, generator: Any) -> tuple[Any, dict[str, float]]:
        """Return ``(scalar loss tensor, extra float logs)``; draw all randomness from ``generator``."""
        ...

    def validation_grid(self, batch: dict, generator: Any) -> Any:
        """Return a uint8 ``(H, W, 3)`` array whose rows are LQ | reference | output | GT."""
        ...

    def config_dict(self) -> dict[str, Any]:
        """The task's resolved configuration (saved in ``config.json`` and checkpoints)."""
        ...
