"""The official ReF-LDM release (CompVis/Lightning ``refldm.ckpt`` + ``vqgan.ckpt``) <-> refface's models.

The official UNet (``openaimodel.UNetModel``) and VQGAN (``taming`` VQModel with LDM's Encoder/Decoder)
are the same networks as refface's diffusers-based ones; only names and a few layouts differ:

- UNet blocks are flat lists (``input_blocks.N.M``, ``output_blocks.N.M``) where diffusers nests
  ``down_blocks.L.resnets.R``; the decoder's ``up.L`` counts from the lowest resolution upward while
  diffusers' ``up_blocks`` start at the highest.
- The UNet attention's ``qkv`` is one Conv1d ``(3C, C, 1)`` laid out **per head** as
  ``[q_h | k_h | v_h]`` (the "legacy" order): it is viewed as ``(heads, 3, head_dim, C)`` before it is
  split into ``to_q``/``to_k``/``to_v``.
- Conv1d and 1x1 Conv2d projections become Linear weights (trailing unit dimensions dropped).
- The EMA copy (``model_ema.*``, Lightning's LitEma) stores each parameter under its name with the
  dots removed; the names are recovered through the official parameter list.

Every mapping is built from the architecture config, so conversion is strict both ways: a key that
no rule consumes, or a rule without its key, raises :class:`KeyMismatchError` listing the names.
Official code read: ChiWeiHsiao/ref-ldm at :data:`OFFICIAL_COMMIT`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refface.manifests.atomic import write_json
from refface.train.refldm.model import NoiseConfig, RefLDMUNet, UNetConfig, make_train_scheduler
from refface.train.refldm.train import DataConfig, RefLDMConfig, TaskConfig
from refface.train.refldm.vqgan import VQGANConfig, build_vqgan

OFFICIAL_COMMIT = "af6690c19fdc6421802fd7996510bcfef259bfd1"
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
FIRST_STAGE_PREFIX = "first_stage_model."
# The official UNet and VQGAN normalise with GroupNorm(32) everywhere.
OFFICIAL_GROUPS = 32


class KeyMismatchError(ValueError):
    """Weights and mapping disagree; ``missing`` and ``unmapped`` hold the offending names."""

    def __init__(self, what: str, missing: Iterable[str] = (), unmapped: Iterable[str] = (), shapes=()):
        self.missing, self.unmapped, self.shapes = sorted(missing), sorted(unmapped), list(shapes)
        parts = [f"{what}: the weights do not match the architecture"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): " + ", ".join(self.missing))
        if self.unmapped:
            parts.append(f"{len(self.unmapped)} unmapped key(s): " + ", ".join(self.unmapped))
        if self.shapes:
            parts.append(f"{len(self.shapes)} shape mismatch(es): " + ", ".join(self.shapes))
        super().__init__("; ".join(parts))


@dataclass(frozen=True)
class Rule:
    """One official tensor and the refface tensor(s) it becomes.

    ``kind``: ``copy`` (same layout), ``linear`` (official conv weight with ``unit_dims`` trailing
    1-sized dimensions -> Linear weight) or ``qkv`` (fused per-head q|k|v -> three tensors).
    """

    official: str
    refface: tuple[str, ...]
    kind: str = "copy"
    unit_dims: int = 0
    heads: int = 1


def _module(rules: list[Rule], off: str, ref: str, kind: str = "copy", unit_dims: int = 0) -> None:
    for p in ("weight", "bias"):
        rules.append(Rule(f"{off}.{p}", (f"{ref}.{p}",), kind if p == "weight" else "copy", unit_dims))


def _resnet(rules: list[Rule], off: str, ref: str, shortcut: bool, unet: bool) -> None:
    """A residual block: UNet ``ResBlock`` (with time embedding) or VQGAN ``ResnetBlock``."""
    if unet:
        names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj"}
        names |= {"out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    else:
        names = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
        names["nin_shortcut"] = "conv_shortcut"
    for o, r in names.items():
        if r == "conv_shortcut" and not shortcut:
            continue
        _module(rules, f"{off}.{o}", f"{ref}.{r}")


def _unet_attention(rules: list[Rule], off: str, ref: str, heads: int) -> None:
    _module(rules, f"{off}.norm", f"{ref}.group_norm")
    qkv = tuple(f"{ref}.to_{x}" for x in "qkv")
    for p in ("weight", "bias"):
        rules.append(Rule(f"{off}.qkv.{p}", tuple(f"{n}.{p}" for n in qkv), "qkv", 1, heads))
    _module(rules, f"{off}.proj_out", f"{ref}.to_out.0", "linear", 1)


def _vq_attention(rules: list[Rule], off: str, ref: str) -> None:
    _module(rules, f"{off}.norm", f"{ref}.group_norm")
    for o, r in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        _module(rules, f"{off}.{o}", f"{ref}.{r}", "linear", 2)


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """Official ``UNetModel`` names (no prefix) -> :class:`RefLDMUNet` state-dict names."""
    rules: list[Rule] = []
    base, mult, n = cfg.base_channels, list(cfg.channel_mult), cfg.layers_per_block
    levels = len(mult)

    def heads(ch: int) -> int:
        return ch // cfg.attention_head_dim

    _module(rules, "time_embed.0", "unet.time_embedding.linear_1")
    _module(rules, "time_embed.2", "unet.time_embedding.linear_2")
    _module(rules, "input_blocks.0.0", "unet.conv_in")
    chans, ch, idx = [base], base, 1
    for level, m in enumerate(mult):
        for r in range(n):
            ref = f"unet.down_blocks.{level}"
            _resnet(rules, f"input_blocks.{idx}.0", f"{ref}.resnets.{r}", ch != base * m, unet=True)
            ch = base * m
            if cfg.attention_levels[level]:
                _unet_attention(rules, f"input_blocks.{idx}.1", f"{ref}.attentions.{r}", heads(ch))
            chans.append(ch)
            idx += 1
        if level != levels - 1:
            _module(rules, f"input_blocks.{idx}.0.op", f"unet.down_blocks.{level}.downsamplers.0.conv")
            chans.append(ch)
            idx += 1
    _resnet(rules, "middle_block.0", "unet.mid_block.resnets.0", False, unet=True)
    _unet_attention(rules, "middle_block.1", "unet.mid_block.attentions.0", heads(ch))
    _resnet(rules, "middle_block.2", "unet.mid_block.resnets.1", False, unet=True)
    j = 0
    for u, level in enumerate(reversed(range(levels))):
        for i in range(n + 1):
            skip = chans.pop()
            out = base * mult[level]
            ref = f"unet.up_blocks.{u}"
            _resnet(rules, f"output_blocks.{j}.0", f"{ref}.resnets.{i}", ch + skip != out, unet=True)
            ch = out
            sub = 1
            if cfg.attention_levels[level]:
                _unet_attention(rules, f"output_blocks.{j}.1", f"{ref}.attentions.{i}", heads(ch))
                sub = 2
            if level and i == n:
                _module(rules, f"output_blocks.{j}.{sub}.conv", f"{ref}.upsamplers.0.conv")
            j += 1
    _module(rules, "out.0", "unet.conv_norm_out")
    _module(rules, "out.2", "unet.conv_out")
    return rules


def vqgan_rules(cfg: VQGANConfig) -> list[Rule]:
    """Official VQGAN names (``encoder.*``, ``decoder.*``, ``quantize.*``, convs) -> diffusers ``VQModel``."""
    rules: list[Rule] = []
    widths, n = list(cfg.block_out_channels), cfg.layers_per_block
    levels = len(widths)
    _module(rules, "encoder.conv_in", "encoder.conv_in")
    ch = widths[0]
    for level, w in enumerate(widths):
        for r in range(n):
            ref = f"encoder.down_blocks.{level}.resnets.{r}"
            _resnet(rules, f"encoder.down.{level}.block.{r}", ref, ch != w, unet=False)
            ch = w
        if level != levels - 1:
            _module(
                rules,
                f"encoder.down.{level}.downsample.conv",
                f"encoder.down_blocks.{level}.downsamplers.0.conv",
            )
    for part in ("encoder", "decoder"):
        _resnet(rules, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False, unet=False)
        _vq_attention(rules, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        _resnet(rules, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False, unet=False)
    _module(rules, "encoder.norm_out", "encoder.conv_norm_out")
    _module(rules, "encoder.conv_out", "encoder.conv_out")
    _module(rules, "quant_conv", "quant_conv")
    rules.append(Rule("quantize.embedding.weight", ("quantize.embedding.weight",)))
    _module(rules, "post_quant_conv", "post_quant_conv")
    _module(rules, "decoder.conv_in", "decoder.conv_in")
    ch = widths[-1]
    for u, level in enumerate(reversed(range(levels))):
        for i in range(n + 1):
            ref = f"decoder.up_blocks.{u}.resnets.{i}"
            _resnet(rules, f"decoder.up.{level}.block.{i}", ref, ch != widths[level], unet=False)
            ch = widths[level]
        if level:
            _module(rules, f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
    _module(rules, "decoder.norm_out", "decoder.conv_norm_out")
    _module(rules, "decoder.conv_out", "decoder.conv_out")
    return rules


# ----------------------------------------------------------------------------------------------------
# tensor conversion, both directions


def _to_refface(rule: Rule, t) -> list:
    if rule.kind == "copy":
        return [t]
    if rule.kind == "linear":
        return [t.reshape(t.shape[:2]) if t.ndim > 1 else t]
    # qkv: (3C, C[, 1]) laid out per head as [q|k|v] -> three (C, C) (or (C,) for the bias)
    three_c = t.shape[0]
    c, h = three_c // 3, rule.heads
    if t.ndim == 1:
        v = t.reshape(h, 3, c // h)
        return [v[:, i].reshape(c) for i in range(3)]
    v = t.reshape(h, 3, c // h, -1)
    return [v[:, i].reshape(c, -1) for i in range(3)]


def _to_official(rule: Rule, ts: list):
    import torch

    if rule.kind == "copy":
        return ts[0]
    if rule.kind == "linear":
        t = ts[0]
        return t.reshape(*t.shape, *([1] * rule.unit_dims)) if t.ndim > 1 else t
    h = rule.heads
    c = ts[0].shape[0]
    if ts[0].ndim == 1:
        return torch.stack([t.reshape(h, c // h) for t in ts], dim=1).reshape(3 * c)
    fused = torch.stack([t.reshape(h, c // h, -1) for t in ts], dim=1).reshape(3 * c, -1)
    return fused.reshape(*fused.shape, *([1] * rule.unit_dims))


def to_refface(official: dict, rules: list[Rule], what: str) -> dict:
    """Official-layout tensors -> refface state dict; strict (every key consumed, every rule fed)."""
    missing = [r.official for r in rules if r.official not in official]
    mapped = {r.official for r in rules}
    unmapped = [k for k in official if k not in mapped]
    if missing or unmapped:
        raise KeyMismatchError(what, missing, unmapped)
    out = {}
    for r in rules:
        for name, t in zip(r.refface, _to_refface(r, official[r.official]), strict=True):
            out[name] = t.contiguous()
    return out


def to_official(state: dict, rules: list[Rule], what: str) -> dict:
    """refface state dict -> official-layout tensors; strict like :func:`to_refface`."""
    wanted = [n for r in rules for n in r.refface]
    missing = [n for n in wanted if n not in state]
    unmapped = sorted(set(state) - set(wanted))
    if missing or unmapped:
        raise KeyMismatchError(what, missing, unmapped)
    return {r.official: _to_official(r, [state[n] for n in r.refface]).contiguous() for r in rules}


def load_strict(module, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with shapes checked first, failures listed by name."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unmapped = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unmapped or shapes:
        raise KeyMismatchError(what, missing, unmapped, shapes)
    module.load_state_dict(state, strict=True)


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


# ----------------------------------------------------------------------------------------------------
# deterministic random weights, rebuilt identically from the official names (parity tests)


def seeded_tensor(name: str, shape: tuple[int, ...], salt: int = 0):
    """A random tensor derived only from an official key name and its shape.

    Weights are scaled by 1/sqrt(fan_in); 1-D weights (norms) are 1 + 0.1·N(0, 1); biases 0.05·N(0, 1);
    the codebook N(0, 1).
    """
    import torch

    seed = zlib.crc32(f"{name}|{tuple(shape)}|{salt}".encode())
    t = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if name.endswith("embedding.weight"):
        return t
    if name.endswith(".bias"):
        return 0.05 * t
    if len(shape) == 1:
        return 1.0 + 0.1 * t
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return t / fan_in**0.5


def seeded_state(shapes: dict[str, tuple[int, ...]], salt: int = 0) -> dict:
    """:func:`seeded_tensor` for every ``name -> shape``."""
    return {k: seeded_tensor(k, s, salt) for k, s in shapes.items()}


def official_shapes(module, rules: list[Rule]) -> dict[str, tuple[int, ...]]:
    """The official name -> shape table of a refface module (via :func:`to_official`)."""
    return {k: tuple(v.shape) for k, v in to_official(module.state_dict(), rules, "shapes").items()}
