"""DDIM sampling with classifier-free guidance toward the references (null = zero reference latents)."""

from __future__ import annotations

import torch

from refface.train.refldm.cachekv import RefCache
from refface.train.refldm.model import NoiseConfig, RefLDMUNet, make_ddim_scheduler


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
) -> torch.Tensor:
    """Sample restored latents ``(B, C, h, w)``.

    Args:
        unet: the denoiser.
        lq_latents: ``(B, C, h, w)`` latents of the LQ inputs.
        ref_latents: ``(B, K, C, h, w)`` reference latents, or None / K = 0 for the LQ-only model.
        ref_mask: ``(B, K)`` bool presence of each reference.
        noise: the training schedule (defaults to the paper's).
        steps: DDIM steps (100 in the paper).
        eta: DDIM η (0: deterministic given the initial noise).
        guidance_scale: CFG scale toward the references; 1 disables the null branch.
        generator: seeds the initial noise (and η > 0 noise).
        init_noise: the initial noise itself ``(B, C, h, w)`` (e.g. drawn per image from its own seed).
        rebuild_cache_every_step: recompute the reference K/V at every step instead of once; gives the
            same result and exists to check exactly that.
    """
    scheduler = make_ddim_scheduler(noise or NoiseConfig())
    scheduler.set_timesteps(steps, device=lq_latents.device)
    b = lq_latents.shape[0]
    has_refs = ref_latents is not None and ref_latents.shape[1] > 0
    use_cfg = has_refs and guidance_scale != 1.0

    def make_cache() -> RefCache | None:
        if not has_refs:
            return None
        cond = unet.build_cache(ref_latents, ref_mask)
        if not use_cfg:
            return cond
        null = unet.build_cache(torch.zeros_like(ref_latents), ref_mask)
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
        x_in = torch.cat([latents, latents]) if use_cfg else latents
        ts = torch.full((x_in.shape[0],), int(t), device=x_in.device, dtype=torch.long)
        eps = unet(x_in.to(dtype), lq_in, ts, cache=step_cache).float()
        if use_cfg:
            eps_cond, eps_null = eps[:b], eps[b:]
            eps = eps_null + guidance_scale * (eps_cond - eps_null)
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
    **sample_kwargs,
) -> torch.Tensor:
    """Restore LQ faces ``(B, 3, H, W)`` in [-1, 1] given references ``(B, K, 3, H, W)``; returns [-1, 1] images."""
    from refface.train.refldm.vqgan import decode, encode

    dtype = next(vq.parameters()).dtype
    lq_latents = encode(vq, lq_images.to(dtype))
    ref_latents = None
    if ref_images is not None and ref_images.shape[1] > 0:
        b, k = ref_images.shape[:2]
        flat = encode(vq, ref_images.flatten(0, 1).to(dtype))
        ref_latents = flat.view(b, k, *flat.shape[1:])
    latents = ddim_sample(unet, lq_latents, ref_latents, ref_mask, **sample_kwargs)
    return decode(vq, latents.to(dtype), quantize=quantize).float().clamp(-1, 1)
