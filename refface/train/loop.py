"""The one shared accelerate training loop for every refface model (ReF-LDM, MGFR).

A model plugs in as a :class:`TrainTask`; the loop owns devices, precision, optimizer, schedule,
gradient accumulation, EMA, checkpoints, exact resume, experiment trackers (TensorBoard, W&B, MLflow,
... through accelerate), validation grids and a progress bar (loss, it/s, ETA) on the main process.

Output layout (``config.output_dir``)::

    config.json                      resolved LoopConfig + the task's own config
    logs/                            TensorBoard event files (mlruns/ for MLflow, wandb/ for W&B)
    validation/step_000100.png       rows LQ | reference | output | GT (the task draws them)
    checkpoints/step_000100/
        trainable/<name>.safetensors live (fp32) weights of each trainable module
        ema/<name>.safetensors       EMA weights (when ema_decay is set) + ema.json
        accelerate/                  optimizer, scheduler, RNG and accelerate state (save_state)
        state.json                   step, epoch, batch position, config; written LAST (done-marker)

Exact resume: every micro-batch's noise comes from a ``torch.Generator`` seeded from
``(seed, step, micro-batch, process)``, the data order is a function of ``(seed, epoch)`` and the
checkpoint records how many batches of the current epoch were consumed, so a resumed run produces the
uninterrupted run's next losses bit for bit (same device, same kernels).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refface.manifests.atomic import atomic_path, write_json
from refface.seeding import item_seed
from refface.train import tracking
from refface.train.checkpoints import LoopState, find_checkpoint, load_checkpoint, save_checkpoint
from refface.train.ema import EMA
from refface.train.loop_config import LoopConfig, TrainTask
from refface.train.progress import TrainProgress, run_devices

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """The 63-bit seed of one micro-batch's generator, from ``(seed, step, micro-batch, process)``."""
    return item_seed(seed, f"step={step}/micro={micro}/proc={process}") & ((1 << 63) - 1)


def train(
    task: TrainTask,
    dataloader,
    config: LoopConfig,
    accelerator=None,
    validation_batch: dict | None = None,
) -> list[dict[str, float]]:
    """Train ``task`` on ``dataloader`` until ``config.max_steps`` optimizer steps are done.

    Works the same on CPU, one GPU, and multi-GPU / multi-node under ``accelerate launch``.

    Args:
        task: the model (see :class:`TrainTask`).
        dataloader: a ``torch.utils.data.DataLoader`` of batch dicts, re-iterated for as many epochs as
            needed. Map-style datasets are sharded across processes by accelerate; iterable (streaming)
            datasets must split their data by rank themselves (WebDataset ``split_by_node``) and are
            only moved to the device.
        config: the loop configuration.
        accelerator: an ``accelerate.Accelerator`` to use; by default one is built from ``config``
            (its gradient accumulation and mixed precision then come from ``config``).
        validation_batch: the batch drawn in validation grids; default: the first training batch this
            call sees (on this process).

    Returns:
        One dict per optimizer step run in this call: ``step``, ``loss`` (mean over micro-batches and
        processes), ``lr``, ``grad_norm``, ``step_time_s`` (wall time of the step on this process, data
        loading of later micro-batches included) and the task's extra logs.
    """
    run = _setup(task, dataloader, config, accelerator)
    state = _resume(run, config)
    _start_logging(run, task, config)
    run.progress = TrainProgress(run.accelerator, state.step, config.max_steps)
    task.bind(run.modules, run.weight_dtype, run.accelerator.device)

    logs: list[dict[str, float]] = []
    acc = _Accumulation()
    done = state.step >= config.max_steps
    while not done:
        _set_epoch(run.dataloader, state.epoch)
        epoch_iter = (
            run.accelerator.skip_first_batches(run.dataloader, state.batch_in_epoch)
            if state.batch_in_epoch
            else run.dataloader
        )
        # A checkpoint written on an epoch's last batch resumes with nothing left to skip into.
        resumed_at_end = state.batch_in_epoch > 0
        seen = 0
        for batch in epoch_iter:
            seen += 1
            state.batch_in_epoch += 1
            if acc.micro == 0:
                acc.start = time.perf_counter()
            if run.streaming:
                batch = _to_device(batch, run.accelerator.device)
            if validation_batch is None:
                # Taken from the stream rather than by iterating the loader again, which would move
                # the data position and break exact resume.
                validation_batch = batch
            if not _micro_step(run, task, config, state, acc, batch):
                continue
            logs.append(_finish_step(run, config, state, acc))
            done = state.step >= config.max_steps
            _end_of_step(run, task, config, state, done, validation_batch)
            if done:
                break
        else:
            if seen == 0 and not resumed_at_end:
                raise ValueError(f"the dataloader yielded no batch in epoch {state.epoch}")
            state.epoch += 1
            state.batch_in_epoch = 0

    run.progress.close()
    if run.trackers:
        run.accelerator.end_training()
    run.accelerator.wait_for_everyone()
    return logs


@dataclass
class _Run:
    """What :func:`train` sets up once: the accelerator and the prepared modules, optimizer and data."""

    out: Path
    accelerator: Any
    modules: dict[str, Any]
    params: list
    optimizer: Any
    scheduler: Any
    dataloader: Any
    streaming: bool
    weight_dtype: Any
    ema: Any = None
    trackers: list[str] = field(default_factory=list)
    progress: Any = None


@dataclass
class _Accumulation:
    """Sums over the micro-batches of the optimizer step in progress."""

    micro: int = 0
    loss: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    grad_norm: Any = None
    start: float = 0.0

    def reset(self) -> None:
        self.micro, self.loss, self.extra = 0, 0.0, {}


def weight_dtype(mixed_precision: str):
    """The torch dtype of frozen weights and autocast under accelerate's ``mixed_precision``."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def _setup(task: TrainTask, dataloader, config: LoopConfig, accelerator) -> _Run:
    """Devices and precision of every module, the optimizer and schedule, accelerate's preparation."""
    import torch
    from accelerate.utils import set_seed

    if accelerator is None:
        accelerator = make_accelerator(config)
    set_seed(config.seed)  # model init inside the task already happened; this fixes data-order seeds

    trainable = dict(task.trainable_modules())
    frozen = dict(task.frozen_modules())
    if not trainable:
        raise ValueError("the task has no trainable modules")
    dtype = weight_dtype(accelerator.mixed_precision)
    keep_fp32 = set(task.fp32_frozen_modules()) if hasattr(task, "fp32_frozen_modules") else set()
    for name, module in frozen.items():
        module.requires_grad_(False)
        module.eval()
        _move(module, accelerator.device, torch.float32 if name in keep_fp32 else dtype)
    for module in trainable.values():
        _move(module, accelerator.device, torch.float32)
        module.train()
    if config.gradient_checkpointing:
        for module in [*trainable.values(), *frozen.values()]:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()

    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the trainable modules have no parameter with requires_grad=True")
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))

    names = list(trainable)
    # Iterable (streaming) datasets split their shards by rank themselves (WebDataset's split_by_node);
    # letting accelerate shard or dispatch them as well would drop data and mis-slice string fields.
    # Map-style datasets are sharded by accelerate's batch sampler.
    streaming = isinstance(getattr(dataloader, "dataset", None), torch.utils.data.IterableDataset)
    to_prepare = [*[trainable[n] for n in names], optimizer] + ([] if streaming else [dataloader])
    prepared = accelerator.prepare(*to_prepare)
    prepared_modules = dict(zip(names, prepared[: len(names)], strict=True))
    optimizer = prepared[len(names)]
    if not streaming:
        dataloader = prepared[len(names) + 1]
    # The scheduler is stepped by hand once per optimizer step (not prepared), so its schedule does not
    # depend on the process count; it is checkpointed through accelerate's custom-object hook.
    accelerator.register_for_checkpointing(scheduler)
    ema = EMA(prepared_modules, config.ema_decay) if config.ema_decay is not None else None
    return _Run(
        Path(config.output_dir),
        accelerator,
        prepared_modules,
        params,
        optimizer,
        scheduler,
        dataloader,
        streaming,
        dtype,
        ema,
    )


def _resume(run: _Run, config: LoopConfig) -> LoopState:
    """The state to start from: the checkpoint ``config.resume`` names (loaded), else step 0."""
    ckpt = find_checkpoint(run.out, config.resume)
    if ckpt is None:
        return LoopState()
    state = load_checkpoint(ckpt, run.accelerator, run.ema)
    run.accelerator.print(f"resumed from {ckpt} at step {state.step}")
    return state


def _start_logging(run: _Run, task: TrainTask, config: LoopConfig) -> None:
    """``config.json`` of the run (with its devices) and the experiment trackers."""
    accelerator = run.accelerator
    run.trackers = [str(getattr(t, "value", t)) for t in (accelerator.log_with or [])]
    if accelerator.is_main_process:
        write_json(
            run.out / "config.json",
            {"loop": config.to_dict(), "task": task.config_dict(), "devices": run_devices(accelerator)},
        )
        if "tensorboard" in run.trackers:
            (run.out / "logs").mkdir(parents=True, exist_ok=True)
    if run.trackers:
        tracking.prepare_environment(run.trackers, run.out)
        accelerator.init_trackers(
            tracking.PROJECT,
            config=_flat_hparams(config),
            init_kwargs=tracking.init_kwargs(run.trackers, run.out),
        )


def _micro_step(
    run: _Run, task: TrainTask, config: LoopConfig, state: LoopState, acc: _Accumulation, batch
) -> bool:
    """Forward and backward of one micro-batch; True when it completed an optimizer step."""
    import torch

    accelerator = run.accelerator
    g = torch.Generator(device=accelerator.device)
    g.manual_seed(step_seed(config.seed, state.step, acc.micro, accelerator.process_index))
    with accelerator.accumulate(*run.modules.values()):
        with accelerator.autocast():
            loss, extra = task.compute_loss(batch, g)
        accelerator.backward(loss)
        acc.grad_norm = None
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            acc.grad_norm = accelerator.clip_grad_norm_(run.params, config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    acc.micro += 1
    acc.loss += float(loss.detach())
    for k, v in extra.items():
        acc.extra[k] = acc.extra.get(k, 0.0) + float(v)
    return bool(accelerator.sync_gradients)


def _finish_step(run: _Run, config: LoopConfig, state: LoopState, acc: _Accumulation) -> dict[str, float]:
    """After an optimizer step: schedule, EMA, the step's log record (also to the trackers and the bar)."""
    import torch

    accelerator = run.accelerator
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.modules)
    mean_loss = torch.tensor(acc.loss / acc.micro, device=accelerator.device)
    record = {
        "step": state.step + 1,
        "loss": float(accelerator.reduce(mean_loss, "mean")),
        "lr": float(run.scheduler.get_last_lr()[0]),
        "step_time_s": time.perf_counter() - acc.start,
    }
    if acc.grad_norm is not None:
        record["grad_norm"] = float(acc.grad_norm)
    record.update({k: v / acc.micro for k, v in acc.extra.items()})
    acc.reset()
    state.step += 1
    if run.trackers and (state.step % config.log_every == 0 or state.step == 1):
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
    run.progress.update(state.step, record["loss"], log_line=state.step % config.log_every == 0)
    return record


def _end_of_step(
    run: _Run, task: TrainTask, config: LoopConfig, state: LoopState, done: bool, validation_batch
) -> None:
    """Checkpoint and validation grid when they are due."""
    if done or state.step % config.checkpoint_every == 0:
        save_checkpoint(run.out, state, config, task, run.accelerator, run.modules, run.ema)
    if config.validate_every > 0 and (state.step % config.validate_every == 0 or done):
        if run.accelerator.is_main_process:
            _validate(
                run.out, state.step, task, config, run.accelerator, run.modules, run.ema, validation_batch
            )
        run.accelerator.wait_for_everyone()
        task.bind(run.modules, run.weight_dtype, run.accelerator.device)


def make_accelerator(config: LoopConfig):
    """The Accelerator the loop builds by default: precision and accumulation from ``config``,
    the trackers of ``report_to`` (TensorBoard under ``<output_dir>/logs``), seedable samplers so the data order is a function of
    ``(seed, epoch)``."""
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine without CUDA and every
    # process would train alone; with CUDA present the flag must stay off.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=tracking.resolve_trackers(config.report_to) or None,
        project_config=ProjectConfiguration(
            project_dir=str(config.output_dir), logging_dir=str(Path(config.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
    )


def _lr_lambda(config: LoopConfig):
    warm = max(0, int(config.lr_warmup_steps))
    total = max(1, int(config.max_steps))
    schedule = config.lr_schedule

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return {
            "constant": 1.0,
            "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
            "linear": 1.0 - progress,
        }[schedule]

    return factor


def _move(module, device, dtype) -> None:
    # Cast only when needed: diffusers warns on every dtype ``to()`` even when nothing changes.
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(device, dtype=dtype)
    else:
        module.to(device)


def _to_device(batch, device):
    if hasattr(batch, "to") and callable(batch.to) and hasattr(batch, "device"):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and any(hasattr(v, "device") for v in batch):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _set_epoch(dataloader, epoch: int) -> None:
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    for holder in (getattr(dataloader, "sampler", None), getattr(dataloader, "dataset", None)):
        if holder is not None and hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)


def _flat_hparams(config: LoopConfig) -> dict[str, Any]:
    # TensorBoard hparams accept only scalars and strings.
    return {
        k: (str(v) if not isinstance(v, int | float | str | bool) else v) for k, v in config.to_dict().items()
    }


def _validate(out: Path, step: int, task, config, accelerator, modules, ema, batch) -> None:
    import torch

    bare = {n: accelerator.unwrap_model(m) for n, m in modules.items()}
    task.bind(bare, weight_dtype(accelerator.mixed_precision), accelerator.device)
    was_training = {n: m.training for n, m in bare.items()}
    for m in bare.values():
        m.eval()
    g = torch.Generator(device=accelerator.device)
    g.manual_seed(step_seed(config.seed, 0, 0, 0))  # same noise every time: grids are comparable
    try:
        with torch.no_grad(), accelerator.autocast():
            if ema is not None:
                with ema.swapped_in(bare):
                    grid = task.validation_grid(batch, g)
            else:
                grid = task.validation_grid(batch, g)
    finally:
        for n, m in bare.items():
            m.train(was_training[n])
    grid = np.asarray(grid)
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
        raise ValueError(f"validation_grid must return uint8 (H, W, 3), got {grid.dtype} {grid.shape}")
    import cv2

    target = out / "validation" / f"step_{step:06d}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode the validation grid for step {step}")
    with atomic_path(target) as t:
        t.write_bytes(buf.tobytes())
    tracking.log_image(accelerator, "validation", grid, step)
