"""Stage A: the f=8, 8-channel VQGAN autoencoder (diffusers VQModel), its discriminator and losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANConfig:
    """Autoencoder: 512x512x3 -> 64x64x8 (f = 2 ** (levels - 1) = 8); the latent is used unquantized."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 128, 256, 512])
    layers_per_block: int = 2
    latent_channels: int = 8
    num_vq_embeddings: int = 8192
    norm_num_groups: int = 32
    # The LDM works on the pre-quantization latent; the decoder quantizes it (straight-through).
    quantize_on_decode: bool = True
    # A saved diffusers VQModel folder (stage A output or an existing autoencoder); None = build new.
    pretrained: str | None = None
    # Stage A losses (the official vqgan.yaml: taming's VQLPIPSWithDiscriminator).
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    # Adversarial weight: with adaptive_disc_weight, taming's ‖∇_last L_rec‖ / ‖∇_last L_adv‖ (last =
    # the decoder's output conv) times disc_weight; else disc_weight alone.
    disc_weight: float = 0.8
    adaptive_disc_weight: bool = True
    disc_start: int = 30001
    disc_channels: int = 64
    disc_layers: int = 3

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def build_vqgan(cfg: VQGANConfig):
    """A new VQModel, or the saved one named by ``cfg.pretrained`` (clear error when missing)."""
    from diffusers import VQModel

    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"autoencoder not found: {path} has no config.json. Point vqgan.pretrained at a folder "
                "written by VQModel.save_pretrained (the stage A output 'vqgan/' folder)."
            )
        return VQModel.from_pretrained(path)
    n = len(cfg.block_out_channels)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        num_vq_embeddings=cfg.num_vq_embeddings,
        vq_embed_dim=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
    )


def encode(vq, images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] -> unquantized latents ``(B, C, H/f, W/f)`` (scale 1.0)."""
    return vq.encode(images).latents


def encode_references(vq, refs: torch.Tensor, mask: torch.Tensor | None = None, joint: bool = False):
    """Reference images ``(B, K, 3, H, W)`` -> latents ``(B, K, C, H/f, W/f)``.

    ``joint=False``: each reference through the encoder alone. ``joint=True`` (the official model's
    encoding): a sample's references side by side in one ``H x K·W`` image, one encoder pass, the latent
    split back into K pieces of ``W/f`` columns; the encoder's convolutions and mid-block attention see
    all K at once, so every piece differs from the reference encoded alone. With ``mask`` (``(B, K)``,
    False = padding), only a sample's present references are placed side by side; missing ones get
    zero latents.
    """
    b, k = refs.shape[:2]
    if not joint:
        flat = encode(vq, refs.flatten(0, 1))
        return flat.view(b, k, *flat.shape[1:])
    if mask is None or bool(mask.all()):
        z = encode(vq, torch.cat(list(refs.unbind(1)), dim=-1))  # (B, C, h, K*w)
        return torch.stack(z.chunk(k, dim=-1), dim=1)
    out = None
    for i in range(b):
        present = mask[i].nonzero().flatten().tolist()
        if not present:
            continue
        z = encode(vq, torch.cat([refs[i, j] for j in present], dim=-1)[None])[0]
        if out is None:
            out = z.new_zeros(b, k, z.shape[0], z.shape[1], z.shape[2] // len(present))
        for piece, j in zip(z.chunk(len(present), dim=-1), present, strict=True):
            out[i, j] = piece
    if out is None:  # no reference at all: shapes from one encoder pass
        z = encode(vq, refs[:1, 0])
        out = z.new_zeros(b, k, *z.shape[1:])
    return out


def decode(vq, latents: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Latents -> images in [-1, 1] (not clamped, so gradients stay informative)."""
    return vq.decode(latents, force_not_quantize=not quantize).sample


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix NLayer) with GroupNorm, so it has no running statistics."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.GroupNorm(min(32, nxt), nxt)]
            seq.append(nn.LeakyReLU(0.2))
            width = nxt
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def adaptive_disc_weight(vq, rec_loss: torch.Tensor, g_adv: torch.Tensor, scale: float) -> torch.Tensor:
    """taming's adaptive adversarial weight: ``‖∇ rec‖ / (‖∇ adv‖ + 1e-4)`` at the decoder's last conv,
    clamped to [0, 1e4], detached, times ``scale``."""
    last = vq.decoder.conv_out.weight
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_gen = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_gen.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


def vqgan_losses(
    vq,
    disc: nn.Module,
    perceptual: nn.Module | None,
    gt: torch.Tensor,
    step: int,
    cfg: VQGANConfig,
) -> dict[str, torch.Tensor]:
    """Generator and discriminator losses of one batch, summed into ``loss`` for a single optimizer.

    Each network is called once through its (possibly DDP-wrapped) forward. The generator's adversarial
    term sees the discriminator through detached parameters, and the discriminator's hinge loss sees
    detached reconstructions, so one backward pass gives each network only its own gradients. Before
    ``cfg.disc_start`` both adversarial terms are weighted 0 (computed anyway, so every parameter takes
    part in every step, as DDP expects).
    """
    out = vq(gt)
    rec, commit = out.sample, out.commit_loss
    parts: dict[str, torch.Tensor] = {}
    parts["l1"] = (rec - gt).abs().mean()
    parts["codebook"] = commit.mean()
    loss = cfg.l1_weight * parts["l1"] + cfg.codebook_weight * parts["codebook"]
    if perceptual is not None and cfg.perceptual_weight > 0:
        parts["perceptual"] = perceptual(rec, gt).mean()
        loss = loss + cfg.perceptual_weight * parts["perceptual"]
    factor = 1.0 if step >= cfg.disc_start else 0.0
    bare = getattr(disc, "module", disc)
    frozen = {k: v.detach() for k, v in bare.named_parameters()}
    parts["g_adv"] = -torch.func.functional_call(bare, frozen, (rec,)).mean()
    logits = disc(torch.cat([gt, rec.detach()]))
    real, fake = logits.chunk(2)
    parts["d_hinge"] = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    weight = torch.tensor(cfg.disc_weight, device=gt.device)
    if cfg.adaptive_disc_weight and factor > 0 and torch.is_grad_enabled():
        rec_loss = cfg.l1_weight * parts["l1"]
        if "perceptual" in parts:
            rec_loss = rec_loss + cfg.perceptual_weight * parts["perceptual"]
        weight = adaptive_disc_weight(getattr(vq, "module", vq), rec_loss, parts["g_adv"], cfg.disc_weight)
    parts["disc_weight"] = weight
    loss = loss + factor * (weight * parts["g_adv"] + parts["d_hinge"])
    parts["loss"] = loss
    return parts
