"""DDIM sampling with classifier-free guidance toward the references (null = zero reference latents)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refface.train.refldm.cachekv import RefCache
from refface.train.refldm.model import NoiseConfig, RefLDMUNet, make_ddim_scheduler, set_sampling_timesteps
from refface.train.refldm.vqgan import decode, encode, encode_references


@dataclass(frozen=True)
class SamplingPreset:
    """How ``refface restore --model refldm`` samples and reads/writes images.

    Attributes:
        steps: DDIM steps.
        spacing: ``leading`` or ``uniform_trailing`` (see :func:`refface.train.refldm.model.official_timesteps`).
        guidance_scale: CFG scale toward the references; None = the model config's ``task.guidance_scale``.
        ref_encoding: ``joint`` or ``separate`` (see :func:`refface.train.refldm.vqgan.encode_references`);
            None = the model config's ``task.ref_encoding``.
        resize: ``pil`` (PIL ``Image.resize`` with its default filter, as the official script) or ``cv2``
            (bicubic up, area down).
        to_uint8: ``truncate`` (``((x + 1) / 2).clamp(0, 1) * 255`` cast down, as the official script)
            or ``round``.
        noise: ``seed`` (every image's initial noise is the draw of a generator on the sampling device
            seeded with ``seed``, as the official script's ``torch.manual_seed(2024); torch.randn``) or
            ``per_item`` (a CPU draw seeded from ``(seed, image key)``).
        seed: the default seed.
    """

    steps: int
    spacing: str
    guidance_scale: float | None
    ref_encoding: str | None
    resize: str
    to_uint8: str
    noise: str
    seed: int


PRESETS = {
    # The official inference.py: DDIM uniform_trailing, 50 steps, η = 0, CFG 1.5, seed 2024.
    "official": SamplingPreset(50, "uniform_trailing", 1.5, "joint", "pil", "truncate", "seed", 2024),
    # refface's own: 100 leading steps (offset 1), CFG and reference encoding from the model config.
    "refface": SamplingPreset(100, "leading", None, None, "cv2", "round", "per_item", 0),
}


def get_preset(name: str) -> SamplingPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def to_uint8(images: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, 3)``, rounded or truncated (the official way)."""
    if mode == "truncate":
        arr = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).mul(255).byte()
    elif mode == "round":
        arr = ((images.float() + 1) * 127.5).round().clamp(0, 255).byte()
    else:
        raise ValueError(f"to_uint8 mode must be 'round' or 'truncate', got {mode!r}")
    return arr.permute(0, 2, 3, 1)


def guided_eps(
    unet: RefLDMUNet,
    latents: torch.Tensor,
    lq_in: torch.Tensor,
    ts: torch.Tensor,
    cache: RefCache | None,
    guidance_scale: float | None,
) -> torch.Tensor:
    """ε at one step; with ``guidance_scale`` the batch is doubled (conditional ‖ null cache halves)
    and the result is ``ε_null + s·(ε_cond − ε_null)``."""
    dtype = next(unet.parameters()).dtype
    x_in = torch.cat([latents, latents]) if guidance_scale is not None else latents
    eps = unet(x_in.to(dtype), lq_in, ts, cache=cache).float()
    if guidance_scale is None:
        return eps
    b = latents.shape[0]
    eps_cond, eps_null = eps[:b], eps[b:]
    return eps_null + guidance_scale * (eps_cond - eps_null)


@torch.no_grad()
def ddim_sample(
    unet: RefLDMUNet,
    lq_latents: torch.Tensor,
    ref_latents: torch.Tensor | None = None,
    ref_mask: torch.Tensor | None = None,
    *,
    noise: NoiseConfig | None = None,
    steps: int = 100,
    eta: float = 0.0,
    guidance_scale: float = 1.5,
    generator: torch.Generator | None = None,
    init_noise: torch.Tensor | None = None,
    rebuild_cache_every_step: bool = False,
    spacing: str = "leading",
) -> torch.Tensor:
    """Sample restored latents ``(B, C, h, w)``.

    Args:
        unet: the denoiser.
        lq_latents: ``(B, C, h, w)`` latents of the LQ inputs.
        ref_latents: ``(B, K, C, h, w)`` reference latents, or None / K = 0 for the LQ-only model.
        ref_mask: ``(B, K)`` bool presence of each reference.
        noise: the training schedule (defaults to the paper's).
        steps: DDIM steps (the official inference uses 50 with ``uniform_trailing`` spacing).
        eta: DDIM η (0: deterministic given the initial noise).
        guidance_scale: CFG scale toward the references; 1 disables the null branch.
        generator: seeds the initial noise (and η > 0 noise).
        init_noise: the initial noise itself ``(B, C, h, w)`` (e.g. drawn per image from its own seed).
        rebuild_cache_every_step: recompute the reference K/V at every step instead of once; gives the
            same result and exists to check exactly that.
        spacing: ``leading`` (refface) or ``uniform_trailing`` (the official sampler's steps).
    """
    scheduler = make_ddim_scheduler(noise or NoiseConfig(), spacing)
    set_sampling_timesteps(scheduler, steps, spacing, device=lq_latents.device)
    has_refs = ref_latents is not None and ref_latents.shape[1] > 0
    use_cfg = has_refs and guidance_scale != 1.0

    def make_cache() -> RefCache | None:
        if ref_latents is None or not has_refs:
            return None
        cond = unet.build_cache(ref_latents, ref_mask)
        if not use_cfg:
            return cond
        null = unet.build_cache(torch.zeros_like(ref_latents), ref_mask)
        assert cond is not None and null is not None  # K > 0: build_cache returns a cache
        return RefCache.cat([cond, null])

    cache = None if rebuild_cache_every_step else make_cache()
    dtype = next(unet.parameters()).dtype
    if init_noise is not None:
        latents = init_noise.to(lq_latents.device, torch.float32)
    else:
        gen_device = generator.device if generator is not None else lq_latents.device
        latents = torch.randn(lq_latents.shape, generator=generator, device=gen_device).to(lq_latents.device)
    lq = lq_latents.to(dtype)
    lq_in = torch.cat([lq, lq]) if use_cfg else lq
    for t in scheduler.timesteps:
        step_cache = make_cache() if rebuild_cache_every_step else cache
        ts = torch.full((lq_in.shape[0],), int(t), device=lq_in.device, dtype=torch.long)
        eps = guided_eps(unet, latents, lq_in, ts, step_cache, guidance_scale if use_cfg else None)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return latents


@torch.no_grad()
def restore(
    unet: RefLDMUNet,
    vq,
    lq_images: torch.Tensor,
    ref_images: torch.Tensor | None = None,
    ref_mask: torch.Tensor | None = None,
    *,
    quantize: bool = True,
    ref_encoding: str = "separate",
    **sample_kwargs,
) -> torch.Tensor:
    """Restore LQ faces ``(B, 3, H, W)`` in [-1, 1] given references ``(B, K, 3, H, W)``; returns [-1, 1] images.

    ``ref_encoding``: ``separate`` or ``joint`` (see :func:`refface.train.refldm.vqgan.encode_references`).
    """
    dtype = next(vq.parameters()).dtype
    lq_latents = encode(vq, lq_images.to(dtype))
    ref_latents = None
    if ref_images is not None and ref_images.shape[1] > 0:
        ref_latents = encode_references(vq, ref_images.to(dtype), ref_mask, joint=ref_encoding == "joint")
    latents = ddim_sample(unet, lq_latents, ref_latents, ref_mask, **sample_kwargs)
    return decode(vq, latents.to(dtype), quantize=quantize).float().clamp(-1, 1)
