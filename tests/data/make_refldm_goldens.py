"""Produce the ReF-LDM parity goldens by running the official ReF-LDM modules.

Official code: ChiWeiHsiao/ref-ldm at commit af6690c19fdc6421802fd7996510bcfef259bfd1 (not copied here:
its modules are imported from the folder given on the command line). Needs, besides refface's own
dependencies, ``einops``, ``omegaconf`` and ``taming-transformers-rom1504`` (for ``VectorQuantizer2``);
``pytorch_lightning`` and ``torchvision`` are replaced by import stand-ins when absent (the official
modules use only ``LightningModule`` as a base class, ``rank_zero_only`` and ``make_grid`` from them).

Every weight is derived from its official key name and shape (:func:`refface.train.refldm.official.seeded_tensor`),
so the test rebuilds the same weights on refface's side and no weights are stored.

Usage::

    python tests/data/make_refldm_goldens.py /path/to/ref-ldm [--config small|paper] [--out FILE]

``small`` writes ``tests/data/refldm_parity_small.safetensors`` (read by tests/test_refldm_parity.py);
bench/refldm_parity.py calls :func:`official_outputs` with the paper config.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

OFFICIAL_COMMIT = "af6690c19fdc6421802fd7996510bcfef259bfd1"
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "refldm_parity_small.safetensors"

# Architectures (official names). Small: 32x32 images, f = 2, 16x16x4 latent, two UNet levels.
CONFIGS = {
    "small": {
        "image": 32,
        "unet": dict(image_size=16, in_channels=8, out_channels=4, model_channels=32,
                     attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16),
        "vq": dict(embed_dim=4, n_embed=64, ddconfig=dict(double_z=False, z_channels=4, resolution=32,
                   in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                   dropout=0.0)),
    },
    "paper": {
        "image": 512,
        "unet": dict(image_size=64, in_channels=16, out_channels=8, model_channels=160,
                     attention_resolutions=[2, 4, 8], num_res_blocks=2, channel_mult=[1, 2, 2, 4],
                     num_head_channels=32),
        "vq": dict(embed_dim=8, n_embed=8192, ddconfig=dict(double_z=False, z_channels=8, resolution=512,
                   in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 4], num_res_blocks=2,
                   attn_resolutions=[], dropout=0.0)),
    },
}  # fmt: skip


def _install_stand_ins() -> None:
    """Import stand-ins for the two training-only packages the official modules import."""
    try:
        import pytorch_lightning.utilities.distributed  # noqa: F401
    except ImportError:
        pl = types.ModuleType("pytorch_lightning")

        class LightningModule(torch.nn.Module):
            @property
            def device(self):
                p = next(self.parameters(), None)
                return p.device if p is not None else torch.device("cpu")

        pl.LightningModule = LightningModule
        utilities = types.ModuleType("pytorch_lightning.utilities")
        distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
        distributed.rank_zero_only = lambda fn: fn
        pl.utilities, utilities.distributed = utilities, distributed
        sys.modules.update(
            {
                "pytorch_lightning": pl,
                "pytorch_lightning.utilities": utilities,
                "pytorch_lightning.utilities.distributed": distributed,
            }
        )
    try:
        import torchvision.utils  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv_utils = types.ModuleType("torchvision.utils")
        tv_utils.make_grid = lambda *a, **k: None
        tv.utils = tv_utils
        sys.modules.update({"torchvision": tv, "torchvision.utils": tv_utils})


def build_official(repo: Path, config: str):
    """The official LatentDiffusion (ReF-LDM config, CacheKV on) with seeded weights."""
    from refface.train.refldm.official_keys import seeded_state

    _install_stand_ins()
    sys.path.insert(0, str(repo))
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from omegaconf import OmegaConf

    arch = CONFIGS[config]
    unet = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {**arch["unet"], "use_checkpoint": False, "use_spatial_transformer": False},
    }
    vq = {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {**arch["vq"], "lossconfig": {"target": "torch.nn.Identity"}},
    }
    cond = [
        {"cond_stage_key": "lq_image", "conditioning_key": "concat", "uncond_prob": 0.1,
         "cond_model_config": "__is_first_stage__"},
        {"cond_stage_key": "ref_image", "conditioning_key": "cache_kv", "uncond_prob": 0.1,
         "cond_model_config": "__is_first_stage__"},
    ]  # fmt: skip
    # The condition list stays a plain list: LatentDiffusion tests isinstance(..., list).
    params = dict(linear_start=0.0015, linear_end=0.0155, timesteps=1000, loss_type="l2",
                  image_size=arch["unet"]["image_size"], channels=arch["unet"]["out_channels"],
                  first_stage_key="gt_image", first_stage_config=OmegaConf.create(vq), cond_stage_config=cond,
                  use_cache_kv=True, unet_config=OmegaConf.create(unet), use_ema=False, monitor=None)  # fmt: skip
    model = LatentDiffusion(**params).eval()
    dm = model.model.diffusion_model
    dm.load_state_dict(seeded_state({k: tuple(v.shape) for k, v in dm.state_dict().items()}), strict=True)
    fs = model.first_stage_model
    fs_shapes = {k: tuple(v.shape) for k, v in fs.state_dict().items() if not k.startswith("loss.")}
    fs.load_state_dict(seeded_state(fs_shapes), strict=False)
    return model


def _randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_inputs(config: str) -> dict[str, torch.Tensor]:
    arch = CONFIGS[config]
    c, h, size = arch["unet"]["out_channels"], arch["unet"]["image_size"], arch["image"]
    return {
        "x": _randn(1, 2, c, h, h),
        "lq": _randn(2, 2, c, h, h),
        "t": torch.tensor([37, 912]),
        "refs": _randn(3, 2, 5, c, h, h),
        "images": (_randn(4, 2, 3, size, size) * 0.5).clamp(-1, 1),
        "ref_images": (_randn(5, 1, 2, 3, size, size) * 0.5).clamp(-1, 1),
        "x_T": _randn(6, 1, c, h, h),
    }


@torch.no_grad()
def official_outputs(model, inputs: dict[str, torch.Tensor], sample_steps: int | None = 3) -> dict:
    """Every golden output, computed by the official modules. ``sample_steps=None`` skips the sample."""
    from ldm import cache_kv
    from ldm.models.diffusion.ddim import DDIMSampler

    def fresh() -> None:
        cache_kv.clear_cache()
        cache_kv.mode = None

    out: dict[str, torch.Tensor] = {}
    x, lq, t, refs = inputs["x"], inputs["lq"], inputs["t"], inputs["refs"]
    dm = model.model.diffusion_model
    fresh()
    out["unet_plain"] = dm(torch.cat([x, lq], 1), t)
    for k in (1, 5):
        fresh()
        cache_kv.mode = "save"
        joined = torch.cat(list(refs[:, :k].unbind(1)), dim=-1)  # side by side along the width
        out[f"cachekv_{k}"] = model.apply_model(x, t, {"lq_image": lq, "ref_image": joined})
    # CFG as the DDIM sampler computes it (null = zero reference latents), 2 references, scale 1.5.
    fresh()
    cache_kv.mode = "save"
    joined = torch.cat(list(refs[:, :2].unbind(1)), dim=-1)
    c_in = {"lq_image": torch.cat([lq, lq]), "ref_image": torch.cat([joined * 0, joined])}
    e_u, e_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), c_in).chunk(2)
    out["cfg_eps"] = e_u + 1.5 * (e_c - e_u)
    fresh()
    fs = model.first_stage_model
    z = fs.encode(inputs["images"])
    out["vq_encode"] = z
    out["vq_decode"] = fs.decode(z)
    out["vq_decode_noquant"] = fs.decode(z, force_not_quantize=True)
    ref_img = inputs["ref_images"]
    cond = model.get_learned_conditioning(
        {"lq_image": inputs["images"][:1], "ref_image": torch.cat(list(ref_img.unbind(1)), dim=-1)}
    )
    out["joint_ref_latents"] = cond["ref_image"]
    if sample_steps is not None:
        uc = {k: v.clone() for k, v in cond.items()}
        uc["ref_image"] *= 0
        sampler = DDIMSampler(model, schedule="uniform_trailing")
        shape = list(inputs["x_T"].shape[1:])
        latent, _ = sampler.sample(
            S=sample_steps, batch_size=1, shape=shape, conditioning=cond, unconditional_conditioning=uc,
            unconditional_guidance_scale=1.5, x_T=inputs["x_T"], verbose=False,
        )  # fmt: skip
        fresh()
        out["sample_latent"] = latent
        image = model.decode_first_stage(latent)
        out["sample_image"] = image
        # inference.py: ((x + 1) / 2).clamp(0, 1), then to_pil_image (x * 255 truncated to uint8)
        out["sample_uint8"] = ((image + 1.0) / 2.0).clamp(0.0, 1.0).mul(255).byte()
        out["sample_timesteps"] = torch.from_numpy(sampler.ddim_timesteps.copy())
    return out


def ema_names(model) -> list[str]:
    """The buffer names LitEma gives the UNet parameters (dots removed), as stored under ``model_ema.``."""
    from ldm.modules.ema import LitEma

    return sorted(n for n, _ in LitEma(model.model).named_buffers() if n not in ("decay", "num_updates"))


def main() -> None:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("official", type=Path, help="checkout of ChiWeiHsiao/ref-ldm (the commit above)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build_official(args.official, args.config)
    inputs = make_inputs(args.config)
    outputs = official_outputs(model, inputs)
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors |= {f"out.{k}": v.contiguous() for k, v in outputs.items()}
    meta = {
        "official_commit": OFFICIAL_COMMIT,
        "config": json.dumps(CONFIGS[args.config]),
        "ema_names": json.dumps(ema_names(model)),
    }
    save_file(tensors, str(args.out), metadata=meta)
    print(f"wrote {args.out}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
