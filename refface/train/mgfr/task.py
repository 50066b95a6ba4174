"""The MGFR task on the shared loop (frozen SD-1.5 + trainable adapters: LCA in stage 1, RCA, RLF,
identity tokens and links added in stage 2) and the adapters it trains, built new or from a stage-1
checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from refface.mining.embed import check_embedding_dim
from refface.train.checkpoints import find_checkpoint
from refface.train.mgfr.config import MGFRConfig
from refface.train.mgfr.model import (
    GuidanceConfig,
    MGFRAdapters,
    encode_images,
    encode_prompts,
    predict,
    sample,
)

logger = logging.getLogger(__name__)


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
