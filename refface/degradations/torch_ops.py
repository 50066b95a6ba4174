"""The degradation pipeline on torch batches (CPU or GPU) for on-the-fly training.

Parameters come from the same per-(seed, key) sampler as the CPU degrader, so both paths share
their distributions exactly; the noise field is the same realization too. On an accelerator the
blur is an FFT correlation with reflect-101 borders and resizes are ``F.interpolate`` bilinear
without antialias (OpenCV INTER_LINEAR's sampling); on the CPU the numpy path's fused
blur+downsample is used. JPEG round-trips the small LQ through OpenCV on the CPU (libjpeg; the
LQ is at most a few hundred pixels a side, so the transfer is cheap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refface.degradations import ops
from refface.degradations.degrader import Degrader
from refface.degradations.kernels import make_kernel
from refface.degradations.presets import PresetConfig


def _blur_fft(x, kernels):
    """Correlate each image (B, C, H, W) with its own kernel (B, K, K), reflect-101 borders."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    ks = kernels.shape[-1]
    pad = ks // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # torch "reflect" is OpenCV's REFLECT_101
    hp, wp = xp.shape[-2:]
    kp = torch.zeros((b, 1, hp, wp), dtype=x.dtype, device=x.device)
    kp[:, 0, :ks, :ks] = torch.flip(kernels, dims=(-2, -1))
    y = torch.fft.irfft2(torch.fft.rfft2(xp) * torch.fft.rfft2(kp), s=(hp, wp))
    return y[..., ks - 1 : ks - 1 + h, ks - 1 : ks - 1 + w]


def degrade_batch(
    images,
    keys: Sequence[str],
    preset: str | PresetConfig,
    seed: int = 0,
    params: Sequence[dict] | None = None,
    blur: str | None = None,
):
    """Degrade a batch on its own device.

    Args:
        images: (B, 3, H, W) float tensor in [0, 1], RGB.
        keys: one stable key per image (the per-item seed comes from ``(seed, key)``).
        preset: preset name or config.
        seed: preset seed.
        params: optional pre-drawn parameters (``Degrader.sample``) to replay.
        blur: ``"fft"`` (tensor FFT + ``F.interpolate``, the accelerator route) or ``"fused"``
            (the numpy fused blur+downsample, CPU tensors only); default: fused on CPU, else fft.

    Returns:
        (LQ (B, 3, H, W) float tensor in [0, 1] on the input's device, list of params dicts).
    """
    import torch
    import torch.nn.functional as F

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(keys) != images.shape[0]:
        raise ValueError(f"got {len(keys)} keys for a batch of {images.shape[0]}")
    degrader = Degrader(preset, seed)
    b, _, h, w = images.shape
    plist = [dict(p) for p in params] if params is not None else [degrader.sample(k) for k in keys]
    x = images.to(torch.float32).clamp(0, 1)
    has_blur = [p.get("kernel_type") is not None for p in plist]
    route = blur or ("fused" if x.device.type == "cpu" else "fft")
    if route not in ("fft", "fused") or (route == "fused" and x.device.type != "cpu"):
        raise ValueError(f"blur must be 'fft' or 'fused' (fused needs CPU tensors), got {blur!r}")
    on_cpu = route == "fused"
    if any(has_blur) and not on_cpu:
        idx = [i for i, hb in enumerate(has_blur) if hb]
        kern = np.stack([make_kernel(plist[i], plist[i]["kernel_size"]) for i in idx])
        blurred = _blur_fft(x[idx], torch.from_numpy(kern).to(x))
        x = x.clone()
        x[idx] = blurred
    out = torch.empty_like(x)
    for i, p in enumerate(plist):
        lw, lh = ops.lq_size(w, h, p["scale"])
        p.update(lq_width=lw, lq_height=lh, width=w, height=h, input_notes="")
        if on_cpu and has_blur[i]:
            # On the CPU the numpy path's fused blur+downsample is the fastest there is.
            arr = x[i].permute(1, 2, 0).numpy() * 255.0
            fused = ops.blur_downsample(arr, make_kernel(p, p["kernel_size"]), (lw, lh))
            small = torch.from_numpy(np.ascontiguousarray(fused.transpose(2, 0, 1)))[None]
        else:
            small = F.interpolate(
                x[i : i + 1], size=(lh, lw), mode="bilinear", align_corners=False, antialias=False
            )
        noise_rng = ops.noise_rng(p["noise_seed"])
        if p["noise_type"] == "gaussian":
            field = ops.gaussian_noise((lh, lw, 3), p["noise_sigma"], p["noise_gray"], noise_rng)
            noise = torch.from_numpy(np.ascontiguousarray(field[:, :, ::-1].transpose(2, 0, 1))).to(small)
            small = (small + noise[None]).clamp(0, 1)
        elif p["noise_type"] == "poisson":
            bgr = small[0].permute(1, 2, 0).flip(-1).cpu().numpy()
            field = ops.poisson_noise(bgr, p["poisson_scale"], p["noise_gray"], noise_rng)
            chw = np.ascontiguousarray(field[:, :, ::-1].transpose(2, 0, 1)).astype(np.float32)
            small = (small + torch.from_numpy(chw).to(small)[None]).clamp(0, 1)
        if p["jpeg_quality"] is not None:
            bgr = np.ascontiguousarray(small[0].permute(1, 2, 0).flip(-1).cpu().numpy())
            dec = ops.jpeg(bgr, p["jpeg_quality"])
            small = torch.from_numpy(np.ascontiguousarray(dec[:, :, ::-1].transpose(2, 0, 1))).to(x)[None]
        up = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False, antialias=False)[0]
        if p.get("color_jitter") is not None:
            shift = torch.tensor(p["color_jitter"][::-1], dtype=up.dtype, device=up.device)
            up = (up + shift[:, None, None]).clamp(0, 1)
        if p.get("gray"):
            gray = 0.299 * up[0] + 0.587 * up[1] + 0.114 * up[2]  # OpenCV's BGR2GRAY weights
            up = gray[None].expand(3, -1, -1)
        out[i] = torch.round(up * 255.0).clamp(0, 255) / 255.0
    return out, plist
