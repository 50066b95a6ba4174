"""The official ReF-LDM release (CompVis/Lightning ``refldm.ckpt`` + ``vqgan.ckpt``) <-> refface's models:
reading the release files, inferring the architecture from them, converting to refface weights (and
back), checked against the official noise schedule. The tensor names and layouts map through
:mod:`refface.train.refldm.official_keys`.

Official code read: ChiWeiHsiao/ref-ldm at :data:`OFFICIAL_COMMIT`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from refface.manifests.atomic import write_json
from refface.train.refldm.config import DataConfig, RefLDMConfig, TaskConfig
from refface.train.refldm.model import NoiseConfig, RefLDMUNet, UNetConfig, make_train_scheduler
from refface.train.refldm.official_keys import (
    KeyMismatchError,
    Rule,
    load_strict,
    to_official,
    to_refface,
    unet_rules,
    vqgan_rules,
)
from refface.train.refldm.vqgan import VQGANConfig, build_vqgan

OFFICIAL_COMMIT = "af6690c19fdc6421802fd7996510bcfef259bfd1"
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
FIRST_STAGE_PREFIX = "first_stage_model."
# The official UNet and VQGAN normalise with GroupNorm(32) everywhere.
OFFICIAL_GROUPS = 32


# ----------------------------------------------------------------------------------------------------
# reading the release files


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """The tensors of a Lightning/CompVis checkpoint (its ``state_dict``, or the file itself).

    Loads with ``weights_only=True``; a file that needs arbitrary unpickling is refused unless ``trust``.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path}. Download refldm.ckpt and vqgan.ckpt from the official "
            "ReF-LDM release and pass their paths."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects beyond tensors and was not loaded ({str(e).splitlines()[0]}); "
            "rerun with --trust-checkpoint if the file comes from a source you trust"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a state dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if hasattr(v, "shape")}


def prefix_counts(state: dict, depth: int = 1) -> dict[str, int]:
    """How many tensors sit under each dotted prefix of ``depth`` components."""
    return dict(sorted(Counter(".".join(k.split(".")[:depth]) for k in state).items()))


def has_ema(state: dict) -> bool:
    return any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def unet_tensors(state: dict, rules: list[Rule], use_ema: bool = True) -> tuple[dict, str]:
    """The official UNet tensors (names without prefix) and which copy they came from (``ema``/``model``).

    EMA names are the parameter names with dots removed; they are matched back through ``rules``.
    """
    if use_ema and has_ema(state):
        by_flat: dict[str, str] = {}
        for r in rules:
            flat = ("diffusion_model." + r.official).replace(".", "")
            if flat in by_flat:
                raise ValueError(f"EMA names collide: {r.official} and {by_flat[flat]}")
            by_flat[flat] = r.official
        ema = _strip(state, EMA_PREFIX)
        ema = {k: v for k, v in ema.items() if k.startswith("diffusion_model")}
        out = {by_flat[k]: v for k, v in ema.items() if k in by_flat}
        unmapped = [EMA_PREFIX + k for k in ema if k not in by_flat]
        if unmapped:
            raise KeyMismatchError("ReF-LDM UNet (EMA)", (), unmapped)
        return out, "ema"
    out = _strip(state, UNET_PREFIX)
    if not out:
        raise ValueError(
            f"no UNet weights: expected keys starting with {UNET_PREFIX!r} or {EMA_PREFIX!r} "
            "(is this the refldm.ckpt of the official release?)"
        )
    return out, "model"


def vqgan_tensors(state: dict) -> dict:
    """The VQGAN tensors of ``vqgan.ckpt`` (``loss.*`` dropped) or of ``first_stage_model.*``."""
    sub = _strip(state, FIRST_STAGE_PREFIX)
    if not sub:
        sub = {k: v for k, v in state.items() if not k.startswith("loss.")}
    if "encoder.conv_in.weight" not in sub:
        raise ValueError(
            "no VQGAN weights: expected encoder.*/decoder.* (vqgan.ckpt) or first_stage_model.* keys"
        )
    return sub


def infer_unet_config(official: dict, attention_head_dim: int = 32, sample_size: int = 64) -> UNetConfig:
    """Architecture from official UNet tensor shapes (the head width is not stored: given)."""
    conv_in = official["input_blocks.0.0.weight"]
    base, in_ch = int(conv_in.shape[0]), int(conv_in.shape[1])
    latent = int(official["out.2.weight"].shape[0])
    if in_ch != 2 * latent:
        raise ValueError(f"UNet input has {in_ch} channels, expected 2 x {latent} (noisy ‖ LQ latent)")
    blocks = sorted({int(k.split(".")[1]) for k in official if k.startswith("input_blocks.")})
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in official]
    levels = len(downs) + 1
    n = (len(blocks) - 1 - len(downs)) // levels
    mult, attn = [], []
    for level in range(levels):
        first = 1 + level * (n + 1)
        mult.append(int(official[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0]) // base)
        attn.append(f"input_blocks.{first}.1.qkv.weight" in official)
    cfg = UNetConfig(
        latent_channels=latent,
        sample_size=sample_size,
        base_channels=base,
        channel_mult=mult,
        layers_per_block=n,
        attention_levels=attn,
        attention_head_dim=attention_head_dim,
        norm_num_groups=OFFICIAL_GROUPS,
    )
    cfg.validate()
    return cfg


def infer_vqgan_config(official: dict) -> VQGANConfig:
    """Autoencoder architecture from official VQGAN tensor shapes."""
    ch = int(official["encoder.conv_in.weight"].shape[0])
    levels = len({k.split(".")[2] for k in official if k.startswith("encoder.down.")})
    n = len({k.split(".")[4] for k in official if k.startswith("encoder.down.0.block.")})
    widths = [int(official[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    z = int(official["encoder.conv_out.weight"].shape[0])
    embed = official["quantize.embedding.weight"]
    if int(embed.shape[1]) != z:
        raise ValueError(f"VQGAN z_channels {z} differ from embed_dim {embed.shape[1]}; not supported")
    del ch
    return VQGANConfig(
        block_out_channels=widths,
        layers_per_block=n,
        latent_channels=z,
        num_vq_embeddings=int(embed.shape[0]),
        norm_num_groups=OFFICIAL_GROUPS,
    )


def configs_from_official(unet: dict, vq: dict) -> tuple[UNetConfig, VQGANConfig]:
    """refface configs from the official YAML's ``unet_config.params`` and first-stage ``params``."""
    mult = list(unet["channel_mult"])
    levels = [2**level in set(unet["attention_resolutions"]) for level in range(len(mult))]
    ucfg = UNetConfig(
        latent_channels=int(unet["out_channels"]),
        sample_size=int(unet["image_size"]),
        base_channels=int(unet["model_channels"]),
        channel_mult=mult,
        layers_per_block=int(unet["num_res_blocks"]),
        attention_levels=levels,
        attention_head_dim=int(unet["num_head_channels"]),
        norm_num_groups=OFFICIAL_GROUPS,
    )
    dd = vq["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ValueError("VQGANs with attention outside the mid-block are not supported")
    vcfg = VQGANConfig(
        block_out_channels=[int(dd["ch"]) * m for m in dd["ch_mult"]],
        layers_per_block=int(dd["num_res_blocks"]),
        latent_channels=int(vq["embed_dim"]),
        num_vq_embeddings=int(vq["n_embed"]),
        norm_num_groups=OFFICIAL_GROUPS,
    )
    return ucfg, vcfg


def check_schedule(state: dict, noise) -> None:
    """The checkpoint's stored β schedule (``betas``) must be refface's :class:`NoiseConfig` one."""
    if "betas" not in state:
        return
    import torch

    ours = make_train_scheduler(noise).betas.double()
    theirs = state["betas"].double()
    if theirs.shape != ours.shape or float((theirs - ours).abs().max()) > 1e-6:
        raise ValueError(
            "the checkpoint's noise schedule (betas) differs from refface's: "
            f"{theirs.numel()} steps, β {float(theirs[0]):.6g}→{float(theirs[-1]):.6g}"
        )
    del torch


# ----------------------------------------------------------------------------------------------------
# convert: release files -> refface model folder


def inspect_release(ckpt: str | Path, vqgan: str | Path | None = None, trust: bool = False) -> dict[str, Any]:
    """A summary of the release files' keys: prefixes, counts, EMA present, inferred architecture."""
    state = read_checkpoint(ckpt, trust)
    info: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "tensors": len(state),
        "prefixes": prefix_counts(state),
        "ema_present": has_ema(state),
        "unet_tensors": sum(k.startswith(UNET_PREFIX) for k in state),
        "ema_tensors": sum(k.startswith(EMA_PREFIX + "diffusion_model") for k in state),
        "first_stage_tensors": sum(k.startswith(FIRST_STAGE_PREFIX) for k in state),
    }
    if info["unet_tensors"]:
        info["unet"] = dataclasses.asdict(infer_unet_config(_strip(state, UNET_PREFIX)))
    if vqgan is not None:
        vstate = read_checkpoint(vqgan, trust)
        info["vqgan_checkpoint"] = str(vqgan)
        info["vqgan_tensors"] = len(vstate)
        info["vqgan_prefixes"] = prefix_counts(vstate)
        info["vqgan_loss_tensors"] = sum(k.startswith("loss.") for k in vstate)
        info["vqgan"] = dataclasses.asdict(infer_vqgan_config(vqgan_tensors(vstate)))
    return info


def convert_release(
    ckpt: str | Path,
    out: str | Path,
    vqgan: str | Path | None = None,
    *,
    use_ema: bool = True,
    attention_head_dim: int = 32,
    resolution: int = 512,
    trust: bool = False,
) -> dict[str, Any]:
    """Write ``out/unet``, ``out/vqgan`` and ``out/refldm.json`` from the official release files.

    The folder loads with ``refface restore --model refldm`` (default preset ``official``) and
    ``refface train refldm --init``.

    Returns:
        A summary: which UNet copy was read, tensor counts, parameter counts.
    """
    state = read_checkpoint(ckpt, trust)
    noise = NoiseConfig()
    check_schedule(state, noise)
    vstate = read_checkpoint(vqgan, trust) if vqgan is not None else state
    official_vq = vqgan_tensors(vstate)
    vq_cfg = infer_vqgan_config(official_vq)
    if resolution % vq_cfg.factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VQGAN factor {vq_cfg.factor}")
    vq = build_vqgan(vq_cfg)
    vrules = vqgan_rules(vq_cfg)
    load_strict(vq, to_refface(official_vq, vrules, "ReF-LDM VQGAN"), "ReF-LDM VQGAN")

    plain = _strip(state, UNET_PREFIX)
    if not plain:
        raise ValueError(
            f"{ckpt}: no {UNET_PREFIX}* keys; the UNet architecture is read from them "
            "(is this the refldm.ckpt of the official release?)"
        )
    unet_cfg = infer_unet_config(plain, attention_head_dim, resolution // vq_cfg.factor)
    if unet_cfg.latent_channels != vq_cfg.latent_channels:
        raise ValueError(
            f"UNet latent channels {unet_cfg.latent_channels} != VQGAN latent channels {vq_cfg.latent_channels}"
        )
    rules = unet_rules(unet_cfg)
    official_unet, source = unet_tensors(state, rules, use_ema)
    unet = RefLDMUNet.from_unet_config(unet_cfg)
    load_strict(unet, to_refface(official_unet, rules, "ReF-LDM UNet"), "ReF-LDM UNet")

    out = Path(out)
    unet.save_pretrained(out / "unet")
    vq.save_pretrained(out / "vqgan")
    task = TaskConfig(ref_encoding="joint", sampling_preset="official")
    cfg = RefLDMConfig(
        unet=unet_cfg, vqgan=vq_cfg, noise=noise, task=task, data=DataConfig(resolution=resolution)
    )
    summary = {
        "unet_weights": source,
        "unet_tensors": len(official_unet),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "vqgan_tensors": len(official_vq),
        "vqgan_parameters": sum(p.numel() for p in vq.parameters()),
        "vqgan_from": str(vqgan) if vqgan is not None else f"{ckpt} ({FIRST_STAGE_PREFIX}*)",
    }
    write_json(
        out / "refldm.json",
        {
            "source": {"format": "ReF-LDM official release", "checkpoint": str(ckpt), **summary},
            "official_commit": OFFICIAL_COMMIT,
            "config": cfg.to_dict(),
        },
    )
    return {"output": str(out), **summary}


def export_official(unet, vq, unet_cfg: UNetConfig, vq_cfg: VQGANConfig) -> tuple[dict, dict]:
    """refface models -> official-layout ``(model.diffusion_model.* dict, vqgan state_dict)``."""
    u = to_official(unet.state_dict(), unet_rules(unet_cfg), "ReF-LDM UNet")
    v = to_official(vq.state_dict(), vqgan_rules(vq_cfg), "ReF-LDM VQGAN")
    return {UNET_PREFIX + k: t for k, t in u.items()}, v
