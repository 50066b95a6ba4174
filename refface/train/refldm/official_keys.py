"""Tensor names and layouts of the official ReF-LDM release <-> refface's models, rule by rule.

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
Official code read: ChiWeiHsiao/ref-ldm at :data:`refface.train.refldm.official.OFFICIAL_COMMIT`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from refface.train.refldm.model import UNetConfig
from refface.train.refldm.vqgan import VQGANConfig


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
