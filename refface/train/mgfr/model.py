"""MGFR adapters on a frozen Stable Diffusion: LCA, RCA, RLF, identity tokens and their links.

Exact forms (the paper gives only a figure; docs/train_mgfr.md repeats this with the reasons):
- LCA (LQ Control Adapter): a copy of the UNet encoder (``conv_in``, time embedding, down blocks, mid
  block) initialised from the frozen UNet, fed ``z_t + z_lq`` (noisy latent plus the VAE latent of the
  LQ image, both scaled by the VAE scaling factor) and the attribute-prompt tokens. Every encoder skip
  feature and the mid feature go through a zero-initialised 1x1 conv and are added to the frozen UNet's
  skip connections (which feed the decoder / up blocks) and mid output — ControlNet's wiring.
- RLF (Reference Latent Fusion): ``ResBlock(E(ref)) + Conv3x3(z_lq)``, ``E`` = the frozen VAE encoder.
- RCA (Reference Control Adapter): a second encoder copy fed ``z_t + RLF`` with the prompt tokens
  concatenated with ``num_id_tokens`` identity tokens (``LayerNorm(Linear(id_embedding))``) as its
  cross-attention context; its skip and mid features go through their own zero convs and are added on
  top of LCA's.
- Links: after every down block (every scale) and after the mid block, the two branches exchange their
  hidden states through zero-initialised 1x1 convs, simultaneously:
  ``h_lca' = h_lca + Z_r2l(h_rca)`` and ``h_rca' = h_rca + Z_l2r(h_lca)``.
- Stage 1 builds only LCA. Stage 2 adds RCA, RLF, the identity projection and the links, all of whose
  outputs into the UNet or into LCA are zero at initialisation, so stage 2 starts exactly at stage 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from refface.mining.attributes import NEGATIVE_QUALITY_PROMPT

logger = logging.getLogger(__name__)

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 conv whose weight and bias start at exactly zero (its output is 0 until trained)."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    assert conv.bias is not None  # built with bias=True
    nn.init.zeros_(conv.bias)
    return conv


def plain_unet_config(config: Any) -> dict[str, Any]:
    """A JSON-able copy of a UNet config without diffusers' private keys."""
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


class EncoderBranch(nn.Module):
    """A ControlNet-style copy of the UNet encoder plus zero convs on every skip feature and the mid."""

    def __init__(self, unet_config: dict[str, Any]) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(unet_config)
        if unet.config.addition_embed_type is not None or unet.config.class_embed_type is not None:
            raise ValueError("MGFR supports SD 1.x/2.x UNets (no class or added embeddings, i.e. not SDXL)")
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        if self.mid_block is None:
            raise ValueError("the UNet has no mid block; MGFR adds a residual there")
        skip_channels = [self.conv_in.out_channels]
        for block in self.down_blocks:
            skip_channels += [r.out_channels for r in block.resnets]
            if block.downsamplers is not None:
                skip_channels += [d.out_channels for d in block.downsamplers]
        self.skip_channels = skip_channels
        # Channels of the hidden state after each down block, then after the mid block (link points).
        self.scale_channels = [block.resnets[-1].out_channels for block in self.down_blocks]
        self.scale_channels.append(self.scale_channels[-1])
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in skip_channels)
        self.mid_zero_conv = zero_conv(self.scale_channels[-1])

    def load_from_unet(self, unet: nn.Module) -> None:
        """Copy the frozen UNet's encoder weights (ControlNet's initialisation)."""
        for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
            getattr(self, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)

    def embed_time(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embedding(self.time_proj(timesteps).to(dtype=dtype))

    def run_down(self, i: int, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor):
        block = self.down_blocks[i]
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=temb, encoder_hidden_states=context)
        return block(hidden_states=h, temb=temb)

    def run_mid(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if getattr(self.mid_block, "has_cross_attention", False):
            return self.mid_block(h, temb, encoder_hidden_states=context)
        return self.mid_block(h, temb)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3 twice with an identity skip."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        groups = min(groups, channels)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ReferenceLatentFusion(nn.Module):
    """RLF: ``ResBlock(E(ref)) + Conv3x3(z_lq)`` in latent space (latent channels in and out)."""

    def __init__(self, latent_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.ref_in = nn.Conv2d(latent_channels, hidden_channels, 3, padding=1)
        self.ref_block = ResBlock(hidden_channels)
        self.ref_out = nn.Conv2d(hidden_channels, latent_channels, 3, padding=1)
        self.lq_conv = nn.Conv2d(latent_channels, latent_channels, 3, padding=1)

    def forward(self, ref_latents: torch.Tensor, lq_latents: torch.Tensor) -> torch.Tensor:
        return self.ref_out(self.ref_block(self.ref_in(ref_latents))) + self.lq_conv(lq_latents)


class IdentityTokens(nn.Module):
    """Project a frozen face-recognition embedding (B, D) to ``num_tokens`` context tokens (B, N, C)."""

    def __init__(self, id_dim: int, num_tokens: int, context_dim: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.context_dim = context_dim
        self.proj = nn.Linear(id_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, id_embedding: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(id_embedding).view(-1, self.num_tokens, self.context_dim)  # (B, N, C)
        return self.norm(tokens)


class MGFRAdapters(ModelMixin, ConfigMixin):
    """All trainable MGFR parts in one module (one DDP wrapper, one ``forward``).

    ``forward`` returns the residuals to pass to the frozen UNet as ``down_block_additional_residuals``
    and ``mid_block_additional_residual``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        use_rca: bool = False,
        id_dim: int = 512,
        num_id_tokens: int = 4,
        rlf_channels: int = 64,
        latent_channels: int = 4,
    ) -> None:
        super().__init__()
        self.lca = EncoderBranch(unet_config)
        self.use_rca = use_rca
        if use_rca:
            self.rca = EncoderBranch(unet_config)
            self.rlf = ReferenceLatentFusion(latent_channels, rlf_channels)
            self.id_tokens = IdentityTokens(id_dim, num_id_tokens, unet_config["cross_attention_dim"])
            self.r2l = nn.ModuleList(zero_conv(c) for c in self.lca.scale_channels)
            self.l2r = nn.ModuleList(zero_conv(c) for c in self.lca.scale_channels)

    @classmethod
    def from_unet(cls, unet: nn.Module, **kwargs: Any) -> MGFRAdapters:
        """Build the adapters for ``unet`` with both branches initialised from its encoder."""
        model = cls(plain_unet_config(unet.config), **kwargs)
        model.lca.load_from_unet(unet)
        if model.use_rca:
            model.rca.load_from_unet(unet)
        return model

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeds: torch.Tensor,
        lq_latents: torch.Tensor,
        ref_latents: torch.Tensor | None = None,
        id_embedding: torch.Tensor | None = None,
        rca_scale: float = 1.0,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the frozen UNet.

        Args:
            noisy_latents: ``z_t`` (B, 4, h, w).
            timesteps: (B,) integer timesteps.
            text_embeds: prompt tokens (B, T, C) from the frozen text encoder.
            lq_latents: scaled VAE latent of the LQ image (B, 4, h, w).
            ref_latents: scaled VAE latent of the reference (stage 2 only).
            id_embedding: (B, D) identity embedding of the reference (stage 2 only).
            rca_scale: multiplies RCA's residuals (1 in training).

        Returns:
            ``(down residuals, mid residual)``.
        """
        use_rca = self.use_rca and ref_latents is not None
        if self.use_rca and (ref_latents is None or id_embedding is None):
            raise ValueError("stage-2 adapters need ref_latents and id_embedding")
        lca = self.lca
        temb_l = lca.embed_time(timesteps, noisy_latents.dtype)
        h_l = lca.conv_in(noisy_latents + lq_latents)
        skips_l = [h_l]
        if use_rca:
            rca = self.rca
            temb_r = rca.embed_time(timesteps, noisy_latents.dtype)
            ctx_r = torch.cat(
                [text_embeds, self.id_tokens(id_embedding).to(text_embeds.dtype)], dim=1
            )  # (B, T+N, C)
            h_r = rca.conv_in(noisy_latents + self.rlf(ref_latents, lq_latents))
            skips_r = [h_r]
        for i in range(len(lca.down_blocks)):
            h_l, res = lca.run_down(i, h_l, temb_l, text_embeds)
            skips_l += list(res)
            if use_rca:
                h_r, res = rca.run_down(i, h_r, temb_r, ctx_r)
                skips_r += list(res)
                h_l, h_r = h_l + self.r2l[i](h_r), h_r + self.l2r[i](h_l)
        h_l = lca.run_mid(h_l, temb_l, text_embeds)
        if use_rca:
            h_r = rca.run_mid(h_r, temb_r, ctx_r)
            h_l, h_r = h_l + self.r2l[-1](h_r), h_r + self.l2r[-1](h_l)
        down = [zc(s) for zc, s in zip(lca.zero_convs, skips_l, strict=True)]
        mid = lca.mid_zero_conv(h_l)
        if use_rca:
            down = [d + rca_scale * zc(s) for d, zc, s in zip(down, rca.zero_convs, skips_r, strict=True)]
            mid = mid + rca_scale * rca.mid_zero_conv(h_r)
        return tuple(down), mid


# ----------------------------------------------------------------------------------------------------
# frozen Stable Diffusion


@dataclass
class FrozenSD:
    """The frozen Stable Diffusion parts MGFR builds on."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    path: str = ""

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))


def check_sd_folder(folder: str | Path) -> Path:
    """Raise ``FileNotFoundError`` naming what is missing from a local diffusers SD folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Stable Diffusion folder {folder} does not exist; pass --sd with a local diffusers folder "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. a saved SD 1.5 or 2.1 base. "
            "Nothing is downloaded."
        )
    missing = [s for s in SD_SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Stable Diffusion folder {folder} lacks {', '.join(s + '/' for s in missing)}; "
            f"a diffusers SD 1.x/2.x folder has {', '.join(s + '/' for s in SD_SUBFOLDERS)}"
        )
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json")):
        if not (folder / sub / name).is_file():
            raise FileNotFoundError(f"{folder / sub / name} is missing (incomplete diffusers folder)")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{folder / 'scheduler' / 'scheduler_config.json'} is missing")
    return folder


def load_frozen_sd(folder: str | Path) -> FrozenSD:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config from a local diffusers folder."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = check_sd_folder(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    return FrozenSD(unet, vae, text_encoder, tokenizer, scheduler_config, str(folder))


def encode_prompts(sd: FrozenSD, prompts: list[str], device: Any) -> torch.Tensor:
    """Prompt tokens (B, T, C) from the frozen text encoder (padded to the tokenizer's max length)."""
    ids = sd.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=sd.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return sd.text_encoder(ids)[0]


def encode_images(
    sd: FrozenSD, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1]: a posterior sample with ``generator``, else its mode."""
    dist = sd.vae.encode(images.to(sd.vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if generator is not None else dist.mode()
    return z * sd.scaling_factor


def decode_latents(sd: FrozenSD, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents."""
    return sd.vae.decode((latents / sd.scaling_factor).to(sd.vae.dtype)).sample.clamp(-1, 1)


def predict(
    sd: FrozenSD,
    adapters: nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeds: torch.Tensor,
    lq_latents: torch.Tensor,
    ref_latents: torch.Tensor | None = None,
    id_embedding: torch.Tensor | None = None,
    rca_scale: float = 1.0,
) -> torch.Tensor:
    """The frozen UNet's prediction (epsilon or v) with the adapters' residuals added."""
    # The adapters stay fp32 while the frozen parts may be fp16/bf16: feed each its own dtype
    # (under autocast the matmuls still run in the compute dtype).
    adtype = next(adapters.parameters()).dtype

    def cast(x):
        return None if x is None else x.to(adtype)

    down, mid = adapters(
        cast(noisy_latents),
        timesteps,
        cast(text_embeds),
        cast(lq_latents),
        cast(ref_latents),
        cast(id_embedding),
        rca_scale=rca_scale,
    )
    dtype = sd.unet.dtype
    return sd.unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=text_embeds.to(dtype),
        down_block_additional_residuals=[d.to(dtype) for d in down],
        mid_block_additional_residual=mid.to(dtype),
    ).sample


@dataclass
class GuidanceConfig:
    """Classifier-free guidance for restoration.

    ``eps = eps(p) + w_quality * (eps(p) - eps(q)) + w_attribute * (eps(p) - eps(a))`` where ``p`` is the
    attribute prompt, ``q`` the negative-quality prompt (the text negative-quality samples are trained
    with; default: the input pipeline's ``NEGATIVE_QUALITY_PROMPT``) and ``a`` the negative-attribute
    prompt (attributes to steer away from; empty = plain unconditional guidance). A weight of 0 skips
    that pass.
    """

    steps: int = 50
    w_quality: float = 1.5
    w_attribute: float = 1.0
    negative_quality_prompt: str | None = None
    negative_attribute_prompt: str = ""
    rca_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.w_quality < 0 or self.w_attribute < 0:
            raise ValueError("guidance weights must be >= 0")


def default_negative_quality_prompt() -> str:
    """The prompt the input pipeline gives negative-quality samples."""
    return NEGATIVE_QUALITY_PROMPT


@torch.no_grad()
def sample(
    sd: FrozenSD,
    adapters: nn.Module,
    lq: torch.Tensor,
    prompts: list[str],
    guidance: GuidanceConfig,
    generator: torch.Generator | list[torch.Generator],
    ref: torch.Tensor | None = None,
    id_embedding: torch.Tensor | None = None,
    negative_attribute_prompts: list[str] | None = None,
) -> torch.Tensor:
    """Restore ``lq`` (B, 3, H, W) in [-1, 1] with DDIM (eta 0) and the guidance above; returns [-1, 1].

    ``prompts`` are per image; ``negative_attribute_prompts`` (per image) replace the guidance's one
    negative-attribute prompt when given.
    """
    from diffusers import DDIMScheduler

    device = lq.device
    scheduler = DDIMScheduler.from_config(sd.scheduler_config)
    scheduler.set_timesteps(guidance.steps, device=device)
    b = lq.shape[0]
    z_lq = encode_images(sd, lq).float()
    z_ref = encode_images(sd, ref).float() if ref is not None else None
    texts = list(prompts)
    if len(texts) != b:
        raise ValueError(f"got {len(texts)} prompts for {b} images")
    if negative_attribute_prompts is None:
        negative_attribute_prompts = [guidance.negative_attribute_prompt] * b
    elif len(negative_attribute_prompts) != b:
        raise ValueError(f"got {len(negative_attribute_prompts)} negative-attribute prompts for {b} images")
    passes = 1
    if guidance.w_quality > 0:
        texts += [guidance.negative_quality_prompt or default_negative_quality_prompt()] * b
        passes += 1
    if guidance.w_attribute > 0:
        texts += list(negative_attribute_prompts)
        passes += 1
    ctx = encode_prompts(sd, texts, device)
    if isinstance(generator, list | tuple):
        # One generator per image: an image's starting noise does not depend on its batch.
        if len(generator) != b:
            raise ValueError(f"got {len(generator)} generators for {b} images")
        latents = torch.cat(
            [torch.randn((1, *z_lq.shape[1:]), generator=g, device=g.device).to(device) for g in generator]
        )
    else:
        latents = torch.randn(z_lq.shape, generator=generator, device=generator.device).to(device)

    def rep(x):
        return None if x is None else torch.cat([x] * passes)

    for t in scheduler.timesteps:
        z_in = scheduler.scale_model_input(torch.cat([latents] * passes), t)
        ts = torch.full((b * passes,), int(t), device=device, dtype=torch.long)
        out = predict(
            sd,
            adapters,
            z_in,
            ts,
            ctx,
            rep(z_lq),
            rep(z_ref),
            rep(id_embedding),
            rca_scale=guidance.rca_scale,
        ).float()
        parts = out.chunk(passes)
        guided = parts[0]
        k = 1
        if guidance.w_quality > 0:
            guided = guided + guidance.w_quality * (parts[0] - parts[k])
            k += 1
        if guidance.w_attribute > 0:
            guided = guided + guidance.w_attribute * (parts[0] - parts[k])
        latents = scheduler.step(guided, t, latents).prev_sample
    return decode_latents(sd, latents).float()
