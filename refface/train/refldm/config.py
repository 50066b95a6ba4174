"""A ReF-LDM run's configuration: the stages, the task settings (dropouts, CFG, identity loss), the data
section, the architecture sections, read from YAML with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refface.train.overrides import apply_overrides
from refface.train.refldm.model import NoiseConfig, UNetConfig
from refface.train.refldm.vqgan import (
    VQGANConfig,
)

STAGES = ("vqgan", "ldm", "refldm")


REF_ENCODINGS = ("separate", "joint")


@dataclass
class TaskConfig:
    """What the ReF-LDM tasks need beyond the architecture.

    Attributes:
        stage: ``vqgan`` (A), ``ldm`` (B, LQ only) or ``refldm`` (C, with references and identity loss).
        lq_dropout: probability of zeroing the LQ latent of a sample (CFG-style condition dropout).
        ref_dropout: probability of replacing a sample's reference latents by zeros (the CFG null).
        identity_weight: weight of the timestep-scaled identity loss (stage C; 0 disables).
        arcface: local ArcFace file (insightface ``.onnx`` or iresnet ``.pth``), needed when
            ``identity_weight > 0``.
        arcface_arch: iresnet depth of a ``.pth`` ArcFace.
        arcface_widths: iresnet stage widths of a ``.pth`` ArcFace (the standard ones unless testing).
        init_from: stage C starts from this stage B model (``<output>/ldm/model/unet`` or a checkpoint
            folder); default: ``<output>/ldm/model/unet`` when it exists.
        lpips_backbone: torchvision VGG16 weights for stage A's perceptual loss.
        lpips_head: the lpips v0.1 ``vgg.pth`` head for stage A's perceptual loss.
        val_steps: DDIM steps of the validation grids.
        guidance_scale: CFG scale toward the references at validation and restore time.
        val_samples: rows in a validation grid.
        ref_encoding: ``separate`` (each reference through the VQGAN encoder alone) or ``joint`` (the
            official model's: the K references side by side in one image, one encoder pass, the latent
            split back into K pieces); used in training and at restore time.
        sampling_preset: the restore default, ``refface`` or ``official`` (see
            :data:`refface.train.refldm.sampling.PRESETS`).
        identity_resize: how the identity loss resizes the face crop to 112: ``area`` (the official
            loss) or ``bilinear``.
        frozen_fp32: keep the frozen VQGAN and ArcFace in fp32 under fp16/bf16 mixed precision (the
            official setting); False casts them to the mixed-precision dtype.
    """

    stage: str = "refldm"
    lq_dropout: float = 0.1
    ref_dropout: float = 0.1
    identity_weight: float = 0.1
    arcface: str | None = None
    arcface_arch: str = "r50"
    arcface_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    init_from: str | None = None
    lpips_backbone: str | None = None
    lpips_head: str | None = None
    val_steps: int = 50
    guidance_scale: float = 1.5
    val_samples: int = 4
    ref_encoding: str = "separate"
    sampling_preset: str = "refface"
    identity_resize: str = "area"
    frozen_fp32: bool = True

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("lq_dropout", "ref_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"task.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.identity_weight < 0:
            raise ValueError("task.identity_weight must be >= 0")
        if self.ref_encoding not in REF_ENCODINGS:
            raise ValueError(f"task.ref_encoding must be one of {REF_ENCODINGS}, got {self.ref_encoding!r}")


@dataclass
class DataConfig:
    """Arguments of ``refface.train.loaders.make_refldm_dataloader`` (dataset root given on the command line)."""

    resolution: int = 512
    batch_size: int = 8
    num_refs: int = 5
    num_workers: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefLDMConfig:
    """The whole resolved configuration of one run (saved in ``config.json`` and every checkpoint)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefLDMConfig:
        """Build from a mapping; unknown sections or keys raise ``ValueError`` naming them."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = {"unet": UNetConfig, "vqgan": VQGANConfig, "noise": NoiseConfig, "task": TaskConfig}
        kinds["data"] = DataConfig
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; known: {sorted(sections)}")
        built = {}
        for name, kind in kinds.items():
            values = dict(d.get(name) or {})
            known = {f.name for f in dataclasses.fields(kind)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"unknown keys in '{name}': {sorted(bad)}; known: {sorted(known)}")
            built[name] = kind(**values)
        cfg = cls(**built)
        cfg.unet.validate()
        cfg.task.validate()
        return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RefLDMConfig, dict[str, Any]]:
    """Read a YAML config: the model sections and the raw ``loop:`` section.

    ``overrides``: ``key=value`` strings applied on top (``loop.max_steps=100``, ``task.cfg_scale=2``).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides)
    loop = dict(raw.pop("loop", {}) or {})
    return RefLDMConfig.from_dict(raw), loop
