"""MGFR training entry point: ``accelerate launch -m refface.train.mgfr.train --config ... --stage 1|2``.

Stage 1 trains LCA (text + LQ); stage 2 loads stage 1's LCA, adds RCA/RLF/identity tokens/links (all
zero-initialised towards the UNet and LCA) and trains both. The loop is the shared one
(:mod:`refface.train.loop`); this file only defines the MGFR task and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refface.mining.embed import check_embedding_dim
from refface.train.checkpoints import find_checkpoint
from refface.train.loaders import make_mgfr_dataloader
from refface.train.loop import train
from refface.train.loop_config import LoopConfig, config_from_dict
from refface.train.mgfr.model import (
    GuidanceConfig,
    MGFRAdapters,
    encode_images,
    encode_prompts,
    load_frozen_sd,
    predict,
    sample,
)
from refface.train.overrides import apply_overrides
from refface.train.sources import infer_embedding_dim

logger = logging.getLogger(__name__)

STAGES = (1, 2)


@dataclass
class MGFRConfig:
    """MGFR model and data settings (the ``mgfr:`` section of the YAML config).

    Attributes:
        stage: 1 (text + LQ, LCA only) or 2 (adds reference, identity, RCA).
        resolution: training image size (512 for SD 1.x/2.x base).
        batch_size: per-process batch size.
        num_workers: dataloader workers per process.
        id_dim: identity embedding size D (512 ArcFace, 128 dlib). ``None`` (the default): read from
            the dataset (``embeddings.json`` of a root, the first shard sample otherwise); a value set
            here must equal the dataset's.
        num_id_tokens: identity tokens appended to RCA's cross-attention context.
        rlf_channels: hidden channels of RLF's ResBlock.
        negative_quality_fraction: share of negative-quality samples the input pipeline makes.
        negative_attribute_fraction: share of negative-attribute samples (degraded target + the
            sample's negative-attribute prompt); with ``negative_quality_fraction`` at most 1.
        prompt_dropout: probability of replacing a prompt with "" (keeps unconditional guidance usable).
        train_lca_in_stage2: keep training LCA in stage 2 (else it is frozen at stage 1's weights).
        init_use_ema: stage 2 starts from stage 1's EMA weights when the checkpoint has them.
        validation_steps: DDIM steps for validation grids.
        validation_samples: rows in each validation grid.
    """

    stage: int = 1
    resolution: int = 512
    batch_size: int = 4
    num_workers: int = 4
    id_dim: int | None = None
    num_id_tokens: int = 4
    rlf_channels: int = 64
    negative_quality_fraction: float = 0.1
    negative_attribute_fraction: float = 0.1
    prompt_dropout: float = 0.05
    train_lca_in_stage2: bool = True
    init_use_ema: bool = True
    validation_steps: int = 20
    validation_samples: int = 4

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.resolution % 8 or self.resolution < 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError("prompt_dropout must be within [0, 1]")
        if self.batch_size < 1 or (self.id_dim is not None and self.id_dim < 1) or self.num_id_tokens < 1:
            raise ValueError("batch_size, id_dim and num_id_tokens must be >= 1")
        shares = (self.negative_quality_fraction, self.negative_attribute_fraction)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(
                "negative_quality_fraction and negative_attribute_fraction must be >= 0 and sum to at most 1, "
                f"got {shares[0]} and {shares[1]}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MGFRConfig:
        return config_from_dict(cls, d, "mgfr")


class MGFRTask:
    """The MGFR :class:`refface.train.loop_config.TrainTask`: frozen SD + trainable :class:`MGFRAdapters`."""

    def __init__(self, sd, adapters, config: MGFRConfig) -> None:
        self.sd = sd
        self.adapters = adapters
        self.config = config
        self._adapters = adapters
        self.weight_dtype = None
        self.device = None
        if config.stage == 2 and not config.train_lca_in_stage2:
            adapters.lca.requires_grad_(False)

    def trainable_modules(self) -> dict[str, Any]:
        return {"adapters": self.adapters}

    def frozen_modules(self) -> dict[str, Any]:
        return {"unet": self.sd.unet, "vae": self.sd.vae, "text_encoder": self.sd.text_encoder}

    def bind(self, modules, weight_dtype, device) -> None:
        self._adapters = modules["adapters"]
        self.weight_dtype = weight_dtype
        self.device = device

    def config_dict(self) -> dict[str, Any]:
        return {
            "mgfr": dataclasses.asdict(self.config),
            "sd": self.sd.path,
            "adapters": dict(self.adapters.config),
        }

    def _conditions(self, batch: dict, generator=None):
        """Scaled latents of GT (posterior sample) / LQ / reference (modes), text tokens, id embedding."""
        import torch

        wd = self.weight_dtype
        with torch.no_grad():
            z0 = encode_images(self.sd, batch["gt"].to(self.device, wd), generator).float()
            z_lq = encode_images(self.sd, batch["lq"].to(self.device, wd)).float()
            z_ref, emb = None, None
            if self.config.stage == 2:
                z_ref = encode_images(self.sd, batch["ref"].to(self.device, wd)).float()
                emb = batch["id_embedding"].to(self.device, torch.float32)
                if self.config.id_dim is None:
                    raise ValueError(
                        "mgfr.id_dim is unset: resolve it from the dataset first (resolve_id_dim)"
                    )
                check_embedding_dim(
                    emb.shape[-1],
                    "this batch's id_embedding",
                    self.config.id_dim,
                    "the model (mgfr.id_dim)",
                    "leave id_dim unset so it is read from the dataset",
                )
        return z0, z_lq, z_ref, emb

    def compute_loss(self, batch: dict, generator):
        import torch
        import torch.nn.functional as F

        z0, z_lq, z_ref, emb = self._conditions(batch, generator)
        b = z0.shape[0]
        prompts = list(batch["prompt"])
        drop = torch.rand(b, generator=generator, device=generator.device) < self.config.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        with torch.no_grad():
            text = encode_prompts(self.sd, prompts, self.device)
        scheduler = self._noise_scheduler()
        noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=generator.device
        ).to(z0.device)
        z_t = scheduler.add_noise(z0, noise, t)
        pred = predict(self.sd, self._adapters, z_t, t, text, z_lq, z_ref, emb).float()
        target = {"epsilon": lambda: noise, "v_prediction": lambda: scheduler.get_velocity(z0, noise, t)}
        if self.sd.prediction_type not in target:
            raise ValueError(
                f"unsupported prediction_type {self.sd.prediction_type!r} (epsilon or v_prediction)"
            )
        loss = F.mse_loss(pred, target[self.sd.prediction_type]().float())
        extra = {}
        for name in ("negative_quality", "negative_attribute"):
            flags = batch.get(name)
            extra[f"{name}_share"] = float(flags.float().mean()) if flags is not None else 0.0
        return loss, extra

    def _noise_scheduler(self):
        from diffusers import DDPMScheduler

        if getattr(self, "_scheduler", None) is None:
            self._scheduler = DDPMScheduler.from_config(self.sd.scheduler_config)
        return self._scheduler

    def validation_grid(self, batch: dict, generator):
        import numpy as np
        import torch

        n = min(self.config.validation_samples, len(batch["prompt"]))
        sub = {k: v[:n] for k, v in batch.items()}
        stage2 = self.config.stage == 2
        out = sample(
            self.sd,
            self._adapters,
            sub["lq"].to(self.device, self.weight_dtype),
            list(sub["prompt"]),
            GuidanceConfig(steps=self.config.validation_steps),
            generator,
            ref=sub["ref"].to(self.device, self.weight_dtype) if stage2 else None,
            id_embedding=sub["id_embedding"].to(self.device, torch.float32) if stage2 else None,
        )
        cols = [sub["lq"], sub["ref"], out, sub["gt"]]
        h, w = sub["gt"].shape[-2:]
        cols = [torch.nn.functional.interpolate(c.float().cpu(), size=(h, w), mode="bilinear") for c in cols]
        grid = torch.cat([torch.cat(cols, dim=3)[i] for i in range(n)], dim=1)  # (3, n*H, 4*W)
        return (
            ((grid.clamp(-1, 1) + 1) * 127.5)
            .round()
            .to(torch.uint8)
            .permute(1, 2, 0)
            .numpy()
            .astype(np.uint8)
        )


# ----------------------------------------------------------------------------------------------------
# building


def build_adapters(sd, config: MGFRConfig, init_from: str | Path | None = None, seed: int = 0):
    """The trainable adapters for ``config.stage``; stage 2 copies LCA from a stage-1 checkpoint.

    Args:
        sd: the frozen Stable Diffusion (:class:`FrozenSD`).
        config: MGFR settings.
        init_from: stage 2 only: a stage-1 checkpoint folder or stage-1 output folder (its latest
            checkpoint). ``None`` in stage 2 keeps LCA at its ControlNet initialisation (logged).
        seed: seeds the random initialisation of the new layers (RLF, identity projection), so two
            runs with one seed start from identical weights.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapters = MGFRAdapters.from_unet(
            sd.unet,
            use_rca=config.stage == 2,
            id_dim=config.id_dim,
            num_id_tokens=config.num_id_tokens,
            rlf_channels=config.rlf_channels,
            latent_channels=int(sd.vae.config.latent_channels),
        )
    if config.stage == 2:
        if init_from is None:
            logger.warning("stage 2 without a stage-1 checkpoint: LCA starts from the UNet encoder copy")
        else:
            load_stage1_lca(adapters, init_from, use_ema=config.init_use_ema)
    return adapters


def load_stage1_lca(adapters, source: str | Path, use_ema: bool = True) -> Path:
    """Copy stage 1's LCA weights into stage-2 ``adapters``; returns the checkpoint used.

    Raises:
        FileNotFoundError: no complete checkpoint at ``source``.
        ValueError: the checkpoint's LCA does not match (different SD or config).
    """
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(source)
    kind = "ema" if use_ema and (ckpt / "ema" / "adapters.safetensors").is_file() else "trainable"
    state = load_file(str(ckpt / kind / "adapters.safetensors"))
    lca = {k[len("lca.") :]: v for k, v in state.items() if k.startswith("lca.")}
    if not lca:
        raise ValueError(f"{ckpt} holds no LCA weights (is it an MGFR checkpoint?)")
    try:
        adapters.lca.load_state_dict(lca, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"stage-1 LCA in {ckpt} does not fit this UNet/config: {exc}") from exc
    logger.info("stage 2: LCA loaded from %s (%s weights)", ckpt, kind)
    return ckpt


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint folder, or a run's output folder (-> its latest complete checkpoint)."""
    source = Path(source)
    if (source / "state.json").is_file():
        return source
    ckpt = find_checkpoint(source, "latest")
    if ckpt is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {source} (expected {source}/checkpoints/step_*/state.json); "
            "train stage 1 first or pass --init-from with a checkpoint folder"
        )
    return ckpt


def load_yaml_config(
    path: str | Path, stage: int, overrides: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(loop section, mgfr section)`` of a YAML config with the ``stage<N>:`` overrides applied,
    then the command line's ``key=value`` ``overrides`` (``loop.max_steps=100``, ``mgfr.batch_size=2``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"loop", "mgfr", "stage1", "stage2"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (loop, mgfr, stage1, stage2)")
    loop = dict(raw.get("loop") or {})
    mgfr = dict(raw.get("mgfr") or {})
    override = raw.get(f"stage{stage}") or {}
    bad = set(override) - {"loop", "mgfr"}
    if bad:
        raise ValueError(f"{path}: stage{stage} may override only loop and mgfr, got {sorted(bad)}")
    loop.update(override.get("loop") or {})
    mgfr.update(override.get("mgfr") or {})
    if overrides:
        merged = apply_overrides({"loop": loop, "mgfr": mgfr}, overrides, sections=("loop", "mgfr"))
        loop, mgfr = merged["loop"], merged["mgfr"]
    mgfr["stage"] = stage
    return loop, mgfr


# ----------------------------------------------------------------------------------------------------
# command line


@dataclass(frozen=True)
class MGFRRun:
    """One training stage: the flags of ``python -m refface.train.mgfr.train`` and ``refface train mgfr``."""

    config: str
    sd: str
    output: str
    dataset: str | None = None
    stage: int = 1
    init_from: str | None = None
    max_steps: int | None = None
    resume: str | None = None
    mixed_precision: str | None = None
    overrides: tuple[str, ...] = ()


def parse_args(argv: list[str] | None = None) -> MGFRRun:
    p = argparse.ArgumentParser(
        prog="python -m refface.train.mgfr.train",
        description="Train MGFR (LCA/RCA adapters on a frozen Stable Diffusion). Launch with "
        "`accelerate launch -m refface.train.mgfr.train ...` for multi-GPU / multi-node.",
    )
    p.add_argument(
        "--config", required=True, help="YAML config (configs/mgfr_sd15.yaml, configs/mgfr_tiny.yaml)"
    )
    p.add_argument("--dataset", help="dataset root or shard folder/pattern (refface.train.loaders)")
    p.add_argument("--sd", required=True, help="local diffusers Stable Diffusion 1.x/2.x folder")
    p.add_argument(
        "--stage", type=int, choices=STAGES, default=1, help="1: text + LQ; 2: adds reference/identity"
    )
    p.add_argument("--output", required=True, help="run folder; stage N writes <output>/stage<N>")
    p.add_argument(
        "--init-from",
        default=None,
        help="stage 2: stage-1 checkpoint or run folder (default <output>/stage1)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="override loop.max_steps")
    p.add_argument(
        "--resume", default=None, help="'latest' (default in configs), a checkpoint folder, or 'none'"
    )
    p.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="override the config"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override any config field, e.g. loop.max_steps=100 loop.report_to=wandb mgfr.batch_size=2",
    )
    return MGFRRun(**vars(p.parse_args(argv)))


def main(args: MGFRRun, dataloader=None) -> list[dict[str, float]]:
    """Run one stage as ``args`` say; returns the per-step logs.

    Args:
        args: parsed by :func:`parse_args` (never modified).
        dataloader: a ready dataloader of MGFR batches (programmatic use and tests); by default
            ``refface.train.loaders.make_mgfr_dataloader(args.dataset, ...)``.
    """
    loop_raw, mgfr_raw = load_yaml_config(args.config, args.stage, getattr(args, "overrides", None))
    out_dir = Path(args.output) / f"stage{args.stage}"
    loop_raw["output_dir"] = str(out_dir)
    if args.max_steps is not None:
        loop_raw["max_steps"] = args.max_steps
    if args.resume is not None:
        loop_raw["resume"] = None if args.resume.lower() == "none" else args.resume
    if args.mixed_precision is not None:
        loop_raw["mixed_precision"] = args.mixed_precision
    loop_cfg = LoopConfig.from_dict(loop_raw)
    cfg = MGFRConfig.from_dict(mgfr_raw)
    cfg = resolve_id_dim(cfg, args.dataset, dataloader, args.config)
    check_resume_id_dim(cfg, out_dir, loop_cfg.resume)

    sd = load_frozen_sd(args.sd)
    init_from = None
    if cfg.stage == 2:
        init_from = Path(args.init_from) if args.init_from else Path(args.output) / "stage1"
        init_from = resolve_checkpoint(init_from)
    adapters = build_adapters(sd, cfg, init_from, seed=loop_cfg.seed)
    if dataloader is None:
        dataloader = make_dataloader(args.dataset, cfg, loop_cfg.seed)
    task = MGFRTask(sd, adapters, cfg)
    return train(task, dataloader, loop_cfg)


def dataset_id_dim(dataset: str) -> tuple[int | None, str]:
    """``(D, description)`` of a dataset's identity embeddings; D is None when it holds none."""
    import json

    meta = Path(dataset) / "embeddings.json"
    what = f"dataset {dataset}"
    if meta.is_file():
        what += f" ({json.loads(meta.read_text()).get('model', 'unknown model')}, embeddings.json)"
    return infer_embedding_dim(dataset, default=None), what


def _peek_id_dim(dataloader) -> int | None:
    """D of ``id_embedding`` in a dataloader's first batch (global RNG state left as it was)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        batch = next(iter(dataloader))
    emb = batch.get("id_embedding") if isinstance(batch, dict) else None
    return int(emb.shape[-1]) if emb is not None else None


def resolve_id_dim(cfg: MGFRConfig, dataset: str | None, dataloader=None, config_path=None) -> MGFRConfig:
    """``cfg`` with ``id_dim`` read from the data when the config leaves it unset.

    The data's size comes from the dataset (``embeddings.json`` of a root, the first shard sample),
    else, in stage 2, from a given dataloader's first batch. A size set in the config that differs
    from the data's raises one ``ValueError`` naming both.
    """
    found, what = None, "the data"
    if dataset:
        found, what = dataset_id_dim(dataset)
    elif dataloader is not None and cfg.stage == 2:
        found, what = _peek_id_dim(dataloader), "the dataloader's first batch"
    if cfg.id_dim is None:
        if found is None and cfg.stage == 2:
            raise ValueError(
                f"stage 2 needs identity embeddings but {what} holds none; build the dataset with "
                "embeddings (`refface build ffhq-ref` writes them) or set mgfr.id_dim"
            )
        return dataclasses.replace(cfg, id_dim=found)
    if found is not None:
        check_embedding_dim(
            found,
            what,
            cfg.id_dim,
            f"mgfr.id_dim in {config_path or 'the config'}",
            "remove id_dim from the config (it is then read from the dataset) or rebuild the dataset with "
            "the embedder that gives that size (--embedder arcface: 512, dlib: 128)",
        )
    return cfg


def check_resume_id_dim(cfg: MGFRConfig, out_dir: Path, resume: str | None) -> None:
    """A stage-2 run resumed from a checkpoint built for another identity size: one clear error."""
    import json

    if cfg.stage != 2 or cfg.id_dim is None:
        return
    ckpt = find_checkpoint(out_dir, resume) if resume else None
    if ckpt is None:
        return
    saved = (json.loads((ckpt / "state.json").read_text()).get("task") or {}).get("mgfr") or {}
    if saved.get("id_dim") is not None:
        check_embedding_dim(
            cfg.id_dim,
            "this run's data",
            saved["id_dim"],
            f"the checkpoint it resumes ({ckpt})",
            "resume with the dataset that run was trained on, or start a new --output (or --resume none)",
        )


def make_dataloader(dataset: str | None, cfg: MGFRConfig, seed: int):
    """MGFR batches from the shared input pipeline (``refface.train.loaders.make_mgfr_dataloader``)."""
    if not dataset:
        raise ValueError("--dataset is required: a dataset root or a shard folder/pattern")
    return make_mgfr_dataloader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        resolution=cfg.resolution,
        negative_quality_fraction=cfg.negative_quality_fraction,
        negative_attribute_fraction=cfg.negative_attribute_fraction,
        seed=seed,
        embedding_dim=cfg.id_dim,
    )


if __name__ == "__main__":
    from refface.console import setup_logging

    setup_logging(False)
    main(parse_args())
