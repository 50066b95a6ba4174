"""The papers' model sizes with random weights, built from configs (nothing is downloaded).

ReF-LDM at ``configs/refldm.yaml`` (UNet 117,759,368 and VQGAN 57,183,515 parameters, as the
paper's released checkpoints have) and MGFR on a Stable-Diffusion-1.5-sized UNet / VAE / CLIP text
encoder. Used by the paper-size tests (parameter counts, one forward) and ``bench/gpu_check.py``
(speed and memory at the papers' batch sizes) without any weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refface.train.mgfr.model import MGFRAdapters, plain_unet_config
from refface.train.refldm.config import load_config
from refface.train.refldm.model import RefLDMUNet
from refface.train.refldm.vqgan import build_vqgan

REFLDM_UNET_PARAMS = 117_759_368
REFLDM_VQGAN_PARAMS = 57_183_515
SD15_UNET_PARAMS = 859_520_964
SD15_VAE_PARAMS = 83_653_863
SD15_TEXT_PARAMS = 123_060_480

# Stable Diffusion 1.5's component configs (diffusers' runwayml/stable-diffusion-v1-5 layout).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
REPO = Path(__file__).resolve().parents[2]


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def refldm_config(path: str | Path | None = None):
    """The ReF-LDM config of ``configs/refldm.yaml`` (the paper's), as :class:`RefLDMConfig`."""
    return load_config(path or REPO / "configs" / "refldm.yaml")[0]


def build_refldm(path: str | Path | None = None, vqgan: bool = True) -> tuple[Any, Any]:
    """``(RefLDMUNet, VQModel | None)`` at the paper's configuration, random weights."""
    cfg = refldm_config(path)
    return RefLDMUNet.from_unet_config(cfg.unet), (build_vqgan(cfg.vqgan) if vqgan else None)


def build_sd15_unet():
    """A Stable-Diffusion-1.5-sized ``UNet2DConditionModel`` with random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD15_UNET_CONFIG)


def build_sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD15_VAE_CONFIG)


def build_sd15_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))


def build_mgfr_adapters(unet, stage: int, fast: bool = False, seed: int = 0, **kwargs: Any):
    """MGFR's trainable adapters on ``unet`` (stage 1: LCA; stage 2: LCA + RCA), from its encoder.

    ``fast``: allocate the adapters in ``unet``'s dtype and device without the default random
    initialisation (see :func:`materialize`), then copy the encoder weights as usual.
    """
    if not fast:
        return MGFRAdapters.from_unet(unet, use_rca=stage == 2, **kwargs)
    import torch

    with torch.device("meta"):
        model = MGFRAdapters(plain_unet_config(unet.config), use_rca=stage == 2, **kwargs)
    param = next(unet.parameters())
    model = materialize(model, seed=seed, dtype=param.dtype, device=param.device)
    model.lca.load_from_unet(unet)
    if stage == 2:
        model.rca.load_from_unet(unet)
    return model


def materialize(module, seed: int = 0, dtype=None, device="cpu"):
    """Real weights for a module built on the meta device, filled cheaply and deterministically.

    Matrices and kernels get values of standard deviation 0.02 (the usual transformer init), read
    from one pool of 2^20 random numbers at a different offset per tensor; 1-d weights (norm
    scales) get 1 and biases 0. Filling an SD-sized UNet this way is a memory copy instead of a
    minute of per-layer initialisation, and no fp32 copy is made when ``dtype`` is bf16.
    """
    import torch

    if dtype is not None:
        module = module.to(dtype)
    module = module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    pool_size = 1 << 20
    pool = torch.empty(2 * pool_size, device=device).uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=gen)
    pools: dict = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            if p.ndim < 2:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            src = pools.setdefault(p.dtype, pool.to(p.dtype))
            flat, offset = p.view(-1), (i * 7919) % pool_size
            for start in range(0, flat.numel(), pool_size):
                n = min(pool_size, flat.numel() - start)
                flat[start : start + n].copy_(src[offset : offset + n])
    return module


def build_sd15_unet_fast(seed: int = 0, dtype=None, device="cpu"):
    """:func:`build_sd15_unet` through :func:`materialize` (for memory and speed measurements)."""
    import torch

    with torch.device("meta"):
        unet = build_sd15_unet()
    return materialize(unet, seed=seed, dtype=dtype, device=device)
