"""The ReF-LDM training tasks on the shared loop: VQGAN (stage A) and LDM (stages B and C, with the
references and the identity loss), built from a run config, and the ``save_pretrained`` export of a
finished stage; the weight loading they share with restore and the bench."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from refface.manifests.atomic import write_json
from refface.train.checkpoints import find_checkpoint
from refface.train.ema import unwrap_model
from refface.train.refldm.config import RefLDMConfig
from refface.train.refldm.identity import identity_loss, load_arcface
from refface.train.refldm.lpips import LPIPS
from refface.train.refldm.model import RefLDMUNet, make_train_scheduler
from refface.train.refldm.sampling import ddim_sample
from refface.train.refldm.vqgan import (
    PatchDiscriminator,
    build_vqgan,
    decode,
    encode,
    encode_references,
    vqgan_losses,
)

logger = logging.getLogger(__name__)


MODEL_DIR = "model"


# ----------------------------------------------------------------------------------------------------
# model loading shared by the tasks, restore and the bench


def load_module_weights(source: str | Path, name: str, module, use_ema: bool = True) -> str:
    """Fill ``module`` from a ``save_pretrained`` folder or a loop checkpoint's ``<name>`` weights.

    A checkpoint's live weights load first (they include buffers) and the EMA parameters on top.

    Returns:
        What was loaded: ``pretrained``, ``ema`` or ``trainable``.
    """
    from safetensors.torch import load_file

    source = Path(source)
    if (source / "config.json").is_file() and not (source / "state.json").is_file():
        from diffusers.models.model_loading_utils import load_state_dict

        files = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"{source} has a config.json but no weights file")
        module.load_state_dict(load_state_dict(str(files[0])), strict=True)
        return "pretrained"
    live = source / "trainable" / f"{name}.safetensors"
    if not live.is_file():
        raise FileNotFoundError(
            f"no weights for {name!r} in {source}: expected a save_pretrained folder or a checkpoint "
            f"folder with trainable/{name}.safetensors"
        )
    module.load_state_dict(load_file(str(live)), strict=True)
    ema = source / "ema" / f"{name}.safetensors"
    if use_ema and ema.is_file():
        module.load_state_dict(load_file(str(ema)), strict=False)
        return "ema"
    return "trainable"


def build_vqgan_for(cfg: RefLDMConfig):
    """The autoencoder of a run: new (stage A), a saved folder, or a stage A checkpoint."""
    pretrained = cfg.vqgan.pretrained
    if pretrained and (Path(pretrained) / "state.json").is_file():
        vq = build_vqgan(dataclasses.replace(cfg.vqgan, pretrained=None))
        load_module_weights(pretrained, "vqgan", vq)
        return vq
    return build_vqgan(cfg.vqgan)


def _to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return arr.permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# tasks


class LDMTask:
    """Stages B and C: ε-prediction loss (+ timestep-scaled identity loss in stage C).

    Args:
        cfg: the run configuration (``cfg.task.stage`` is ``ldm`` or ``refldm``).
        unet: the denoiser (new, or stage B weights for stage C).
        vq: the trained autoencoder (frozen).
        arcface: the frozen ArcFace for the identity loss, or None.
    """

    def __init__(self, cfg: RefLDMConfig, unet, vq, arcface=None):
        self.cfg = cfg
        self.unet = unet
        self.vq = vq
        self.arcface = arcface
        self.scheduler = make_train_scheduler(cfg.noise)
        self.use_refs = cfg.task.stage == "refldm"
        self.modules: dict[str, Any] = {}
        self.weight_dtype = None
        self.device = None

    def trainable_modules(self) -> dict[str, Any]:
        return {"unet": self.unet}

    def frozen_modules(self) -> dict[str, Any]:
        frozen = {"vqgan": self.vq}
        if self.arcface is not None:
            frozen["arcface"] = self.arcface
        return frozen

    def fp32_frozen_modules(self) -> set[str]:
        """Frozen modules the loop keeps in fp32 under mixed precision (``task.frozen_fp32``)."""
        return {"vqgan", "arcface"} if self.cfg.task.frozen_fp32 else set()

    def bind(self, modules: dict[str, Any], weight_dtype, device) -> None:
        self.modules, self.weight_dtype, self.device = modules, weight_dtype, device

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def _latents(self, batch: dict):
        """Encode GT, LQ and references with the frozen autoencoder (no gradients)."""
        import torch

        dev, dt = self.device, next(self.vq.parameters()).dtype
        with torch.no_grad():
            z0 = encode(self.vq, batch["gt"].to(dev, dt)).float()
            zlq = encode(self.vq, batch["lq"].to(dev, dt)).float()
            zref, mask = None, None
            if self.use_refs and "refs" in batch and batch["refs"].shape[1] > 0:
                refs = batch["refs"].to(dev, dt)
                mask = batch.get("ref_mask")
                mask = None if mask is None else mask.to(dev).bool()
                joint = self.cfg.task.ref_encoding == "joint"
                zref = encode_references(self.vq, refs, mask, joint=joint).float()
        return z0, zlq, zref, mask

    def compute_loss(self, batch: dict, generator) -> tuple[Any, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        z0, zlq, zref, mask = self._latents(batch)
        b, dev = z0.shape[0], z0.device
        noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(dev)
        t = torch.randint(
            0, self.cfg.noise.num_train_timesteps, (b,), generator=generator, device=generator.device
        ).to(dev)
        # Condition dropout, drawn per sample from the loop's generator so a resume replays it exactly.
        keep_lq = (
            torch.rand(b, generator=generator, device=generator.device).to(dev) >= self.cfg.task.lq_dropout
        )
        keep_ref = (
            torch.rand(b, generator=generator, device=generator.device).to(dev) >= self.cfg.task.ref_dropout
        )
        zlq = zlq * keep_lq.view(b, 1, 1, 1)
        if zref is not None:
            zref = zref * keep_ref.view(b, 1, 1, 1, 1)
        acp = self.scheduler.alphas_cumprod.to(dev)[t]  # (B,)
        a = acp.view(b, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        eps = self.modules["unet"](zt, zlq, t, ref_latents=zref, ref_mask=mask).float()
        ldm = F.mse_loss(eps, noise)
        loss = ldm
        logs = {"ldm": float(ldm.detach())}
        if self.use_refs and self.arcface is not None and self.cfg.task.identity_weight > 0:
            x0_hat = (zt - (1 - a).sqrt() * eps) / a.sqrt()
            quant = self.cfg.vqgan.quantize_on_decode
            vq_dtype = next(self.vq.parameters()).dtype
            pred = decode(self.vq, x0_hat.to(vq_dtype), quantize=quant).float()
            with torch.no_grad():
                target = decode(self.vq, z0.to(vq_dtype), quantize=quant).float()
            ident = identity_loss(
                self.arcface, pred, target, acp, self.cfg.task.identity_weight, self.cfg.task.identity_resize
            ).mean()
            loss = loss + ident
            logs["identity"] = float(ident.detach())
        return loss, logs

    def validation_grid(self, batch: dict, generator) -> np.ndarray:
        """Rows, one per sample: LQ | first reference | restored | GT."""
        import torch

        n = min(self.cfg.task.val_samples, batch["gt"].shape[0])
        sub = {k: v[:n] for k, v in batch.items()}
        z0, zlq, zref, mask = self._latents(sub)
        latents = ddim_sample(
            self.modules["unet"],
            zlq,
            zref,
            mask,
            noise=self.cfg.noise,
            steps=self.cfg.task.val_steps,
            guidance_scale=self.cfg.task.guidance_scale,
            generator=generator,
        )
        vq_dtype = next(self.vq.parameters()).dtype
        out = decode(self.vq, latents.to(vq_dtype), quantize=self.cfg.vqgan.quantize_on_decode)
        refs = sub["refs"][:, 0] if "refs" in sub and sub["refs"].shape[1] else torch.zeros_like(sub["gt"])
        cols = [sub["lq"], refs, out.float().cpu(), sub["gt"]]
        rows = [np.concatenate([_to_uint8(c.cpu())[i] for c in cols], axis=1) for i in range(n)]
        return np.concatenate(rows, axis=0)


class VQGANTask:
    """Stage A: L1 + perceptual + codebook losses, hinge GAN after ``vqgan.disc_start`` steps."""

    def __init__(self, cfg: RefLDMConfig, vq, disc, perceptual=None, gradient_accumulation_steps: int = 1):
        self.cfg = cfg
        self.vq = vq
        self.disc = disc
        self.perceptual = perceptual
        self.accum = gradient_accumulation_steps
        self.modules: dict[str, Any] = {}
        self.weight_dtype = None
        self.device = None

    def trainable_modules(self) -> dict[str, Any]:
        return {"vqgan": self.vq, "disc": self.disc}

    def frozen_modules(self) -> dict[str, Any]:
        return {"lpips": self.perceptual} if self.perceptual is not None else {}

    def bind(self, modules: dict[str, Any], weight_dtype, device) -> None:
        self.modules, self.weight_dtype, self.device = modules, weight_dtype, device

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def compute_loss(self, batch: dict, generator) -> tuple[Any, dict[str, float]]:
        import torch

        disc = unwrap_model(self.modules["disc"])
        # The discriminator counts the micro-batches it has seen in a buffer, so the start step survives
        # checkpoints and resumes without the loop passing its step.
        step = int(disc.seen_batches) // self.accum
        gt = batch["gt"].to(self.device)
        parts = vqgan_losses(
            self.modules["vqgan"], self.modules["disc"], self.perceptual, gt, step, self.cfg.vqgan
        )
        with torch.no_grad():
            disc.seen_batches += 1
        return parts["loss"], {k: float(v.detach()) for k, v in parts.items() if k != "loss"}

    def validation_grid(self, batch: dict, generator) -> np.ndarray:
        """Rows, one per sample: GT | reconstruction."""
        n = min(self.cfg.task.val_samples, batch["gt"].shape[0])
        gt = batch["gt"][:n].to(self.device)
        vq = self.modules["vqgan"]
        vq = getattr(vq, "module", vq)
        rec = decode(vq, encode(vq, gt), quantize=True)
        rows = [np.concatenate([_to_uint8(gt)[i], _to_uint8(rec)[i]], axis=1) for i in range(n)]
        return np.concatenate(rows, axis=0)


def build_task(cfg: RefLDMConfig, output: str | Path, gradient_accumulation_steps: int = 1):
    """The task of ``cfg.task.stage`` with its modules built and, for later stages, loaded.

    Raises:
        FileNotFoundError: a needed earlier-stage model or weights file is missing (message names it).
    """
    import torch

    stage = cfg.task.stage
    output = Path(output)
    if stage == "vqgan":
        vq = build_vqgan_for(cfg)
        disc = PatchDiscriminator(cfg.vqgan.disc_channels, cfg.vqgan.disc_layers)
        disc.register_buffer("seen_batches", torch.zeros((), dtype=torch.long))
        perceptual = None
        if cfg.vqgan.perceptual_weight > 0:
            if not (cfg.task.lpips_backbone and cfg.task.lpips_head):
                raise FileNotFoundError(
                    "stage A's perceptual loss needs task.lpips_backbone (torchvision 'vgg16-397923af.pth') "
                    "and task.lpips_head (lpips 'vgg.pth'); set them or vqgan.perceptual_weight: 0"
                )
            perceptual = LPIPS.from_files(cfg.task.lpips_backbone, cfg.task.lpips_head)
        return VQGANTask(cfg, vq, disc, perceptual, gradient_accumulation_steps)

    if not cfg.vqgan.pretrained:
        default = output.parent / "vqgan" / MODEL_DIR / "vqgan"
        if not (default / "config.json").is_file():
            raise FileNotFoundError(
                f"stage {stage} needs a trained autoencoder: set vqgan.pretrained or run --stage vqgan "
                f"first (expected {default})"
            )
        cfg = dataclasses.replace(cfg, vqgan=dataclasses.replace(cfg.vqgan, pretrained=str(default)))
    vq = build_vqgan_for(cfg)
    unet = RefLDMUNet.from_unet_config(cfg.unet)
    init = cfg.task.init_from
    if (
        stage == "refldm"
        and init is None
        and (output.parent / "ldm" / MODEL_DIR / "unet" / "config.json").is_file()
    ):
        init = str(output.parent / "ldm" / MODEL_DIR / "unet")
    if init is not None:
        kind = load_module_weights(init, "unet", unet)
        logger.info("stage %s starts from %s (%s weights)", stage, init, kind)
    elif stage == "refldm":
        logger.warning("stage C starts from random weights: no stage B model found (task.init_from)")
    arcface = None
    if stage == "refldm" and cfg.task.identity_weight > 0:
        if not cfg.task.arcface:
            raise FileNotFoundError(
                "the identity loss needs ArcFace weights: set task.arcface to insightface's 'w600k_r50.onnx' "
                "(or an iresnet .pth), or task.identity_weight: 0"
            )
        arcface = load_arcface(cfg.task.arcface, cfg.task.arcface_arch, tuple(cfg.task.arcface_widths))
    return LDMTask(cfg, unet, vq, arcface)


def export_model(task, stage_dir: str | Path) -> Path:
    """Write the final (EMA) weights as ``save_pretrained`` folders under ``<stage_dir>/model``."""
    stage_dir = Path(stage_dir)
    ckpt = find_checkpoint(stage_dir, "latest")
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {stage_dir} to export")
    out = stage_dir / MODEL_DIR
    if isinstance(task, VQGANTask):
        load_module_weights(ckpt, "vqgan", task.vq)
        task.vq.save_pretrained(out / "vqgan")
    else:
        load_module_weights(ckpt, "unet", task.unet)
        task.unet.save_pretrained(out / "unet")
        task.vq.save_pretrained(out / "vqgan")
    write_json(out / "refldm.json", {"checkpoint": str(ckpt), "config": task.cfg.to_dict()})
    return out
