"""Named degradation presets (typed configs) from the papers, and custom presets from YAML."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from refface.degradations.kernels import KERNEL_TYPES

PI = math.pi


@dataclass(frozen=True)
class PresetConfig:
    """One degradation distribution, in BasicSR / GFPGAN order: blur → downsample → noise → JPEG → upsample.

    Ranges are ``[low, high]`` for uniform draws; ``None`` switches a step off. Noise σ is in
    0-255 units. ``grid`` (DifFace-style test grids) replaces the ranges by lists of values drawn
    uniformly per image.
    """

    name: str
    description: str = ""
    label: str | None = None  # prefix of the set folder name (default: the name)
    kernel_size: int = 41
    kernel_list: tuple[str, ...] = ("iso", "aniso")
    kernel_prob: tuple[float, ...] = (0.5, 0.5)
    blur_sigma: tuple[float, float] | None = (0.1, 10.0)
    rotation_range: tuple[float, float] = (-PI, PI)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    downsample_range: tuple[float, float] = (1.0, 1.0)
    noise_range: tuple[float, float] | None = None  # Gaussian σ, 0-255 units
    gray_noise_prob: float = 0.0
    poisson_scale_range: tuple[float, float] | None = None
    gaussian_noise_prob: float = 1.0  # Gaussian vs Poisson when both are configured
    jpeg_range: tuple[float, float] | None = None
    color_jitter_prob: float = 0.0
    color_jitter_shift: float = 20.0  # 0-255 units, per channel
    gray_prob: float = 0.0
    out_size: int | None = 512
    grid: dict[str, tuple[float, ...]] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def set_name(self) -> str:
        """Folder name of an LQ set, as ReF-LDM names them: ``severe_b8-16_r8-32_n0-20_j30-100``."""
        label = self.label or self.name
        if self.grid is not None:
            return f"{label}_grid"
        parts = [label]
        for letter, rng in (
            ("b", self.blur_sigma),
            ("r", self.downsample_range),
            ("n", self.noise_range),
            ("j", self.jpeg_range),
        ):
            if rng is not None:
                parts.append(f"{letter}{_num(rng[0])}-{_num(rng[1])}")
        return "_".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        return asdict(self)

    def max_downsample(self) -> float:
        if self.grid is not None and "scale" in self.grid:
            return float(max(self.grid["scale"]))
        return float(self.downsample_range[1])


def _num(x: float) -> str:
    return f"{x:g}"


def _check_range(name: str, rng, low: float | None = None) -> None:
    if rng is None:
        return
    if len(rng) != 2 or not all(isinstance(v, (int, float)) for v in rng):
        raise ValueError(f"{name} must be two numbers [low, high], got {rng!r}")
    if rng[0] > rng[1]:
        raise ValueError(f"{name} must have low <= high, got {list(rng)}")
    if low is not None and rng[0] < low:
        raise ValueError(f"{name} must be >= {low}, got {list(rng)}")


def validate(cfg: PresetConfig) -> None:
    """Raise ``ValueError`` with an actionable message when the preset cannot be sampled."""
    if cfg.kernel_size % 2 != 1 or cfg.kernel_size < 1:
        raise ValueError(
            f"preset {cfg.name}: kernel_size must be a positive odd number, got {cfg.kernel_size}"
        )
    unknown = [k for k in cfg.kernel_list if k not in KERNEL_TYPES]
    if unknown:
        raise ValueError(
            f"preset {cfg.name}: unknown kernel types {unknown}; choose from {list(KERNEL_TYPES)}"
        )
    if len(cfg.kernel_list) != len(cfg.kernel_prob) or sum(cfg.kernel_prob) <= 0:
        raise ValueError(f"preset {cfg.name}: kernel_prob needs one positive weight per kernel_list entry")
    _check_range(f"preset {cfg.name}: blur_sigma", cfg.blur_sigma, 0.0)
    _check_range(f"preset {cfg.name}: downsample_range", cfg.downsample_range, 0.1)
    _check_range(f"preset {cfg.name}: noise_range", cfg.noise_range, 0.0)
    _check_range(f"preset {cfg.name}: poisson_scale_range", cfg.poisson_scale_range, 0.0)
    _check_range(f"preset {cfg.name}: jpeg_range", cfg.jpeg_range, 0.0)
    if cfg.jpeg_range is not None and cfg.jpeg_range[1] > 100:
        raise ValueError(f"preset {cfg.name}: jpeg_range must lie in [0, 100], got {list(cfg.jpeg_range)}")
    for pname in ("gray_noise_prob", "gaussian_noise_prob", "color_jitter_prob", "gray_prob"):
        value = getattr(cfg, pname)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"preset {cfg.name}: {pname} must be a probability in [0, 1], got {value}")
    if cfg.out_size is not None and cfg.out_size < 1:
        raise ValueError(f"preset {cfg.name}: out_size must be positive or null, got {cfg.out_size}")
    if cfg.grid is not None:
        missing = {"sigma_x", "sigma_y", "theta", "scale", "noise", "jpeg"} - set(cfg.grid)
        if missing:
            raise ValueError(f"preset {cfg.name}: grid needs value lists for {sorted(missing)}")
        if any(len(v) == 0 for v in cfg.grid.values()):
            raise ValueError(f"preset {cfg.name}: every grid entry needs at least one value")


def _preset(**kw) -> PresetConfig:
    return PresetConfig(**kw)


# Numbers: ReF-LDM (Eq. 4 and its released test sets), GFPGAN train_gfpgan_v1.yml, CodeFormer
# options/CodeFormer_stage{2,3}.yml, DifFace make_testing_data.py (journal grid).
# CodeFormer's stage II degradation, reused unchanged as its stage III "large" setting.
_CODEFORMER_LARGE = {
    "blur_sigma": (1.0, 15.0),
    "downsample_range": (4.0, 30.0),
    "noise_range": (0.0, 20.0),
    "jpeg_range": (30.0, 80.0),
}

PRESETS: dict[str, PresetConfig] = {
    p.name: p
    for p in (
        _preset(
            name="refldm-train",
            description="ReF-LDM training degradation (on the fly)",
            label="train",
            blur_sigma=(0.0, 16.0),
            downsample_range=(1.0, 32.0),
            noise_range=(0.0, 20.0),
            jpeg_range=(30.0, 100.0),
        ),
        _preset(
            name="refldm-moderate",
            description="ReF-LDM moderate test set (FFHQ-Ref moderate)",
            label="moderate",
            blur_sigma=(0.0, 8.0),
            downsample_range=(1.0, 8.0),
            noise_range=(0.0, 15.0),
            jpeg_range=(60.0, 100.0),
        ),
        _preset(
            name="refldm-severe",
            description="ReF-LDM severe test set (FFHQ-Ref severe, CelebA-Test-Ref)",
            label="severe",
            blur_sigma=(8.0, 16.0),
            downsample_range=(8.0, 32.0),
            noise_range=(0.0, 20.0),
            jpeg_range=(30.0, 100.0),
        ),
        _preset(
            name="gfpgan-train",
            description="GFPGAN v1 training degradation with colour jitter and grayscale",
            blur_sigma=(0.1, 10.0),
            downsample_range=(0.8, 8.0),
            noise_range=(0.0, 20.0),
            jpeg_range=(60.0, 100.0),
            color_jitter_prob=0.3,
            color_jitter_shift=20.0,
            gray_prob=0.01,
        ),
        _preset(
            name="codeformer-stage2",
            description="CodeFormer stage II (large degradation)",
            **_CODEFORMER_LARGE,
        ),
        _preset(
            name="codeformer-stage3-small",
            description="CodeFormer stage III small degradation",
            blur_sigma=(0.1, 10.0),
            downsample_range=(1.0, 12.0),
            noise_range=(0.0, 15.0),
            jpeg_range=(60.0, 100.0),
        ),
        _preset(
            name="codeformer-stage3-large",
            description="CodeFormer stage III large degradation (as stage II)",
            **_CODEFORMER_LARGE,
        ),
        _preset(
            name="difface-test",
            description="DifFace synthetic test grid: aniso Gaussian σ, θ, scale, noise, JPEG from fixed lists",
            kernel_list=("aniso",),
            kernel_prob=(1.0,),
            blur_sigma=None,
            grid={
                "sigma_x": (4.0, 8.0, 12.0, 16.0),
                "sigma_y": (4.0, 8.0, 12.0, 16.0),
                "theta": (0.0, 0.25 * PI, 0.5 * PI, 0.75 * PI),
                "scale": (4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 36.0, 40.0),
                "noise": (1.0, 5.0, 10.0, 15.0, 20.0),
                "jpeg": (30.0, 40.0, 50.0, 60.0, 70.0),
            },
        ),
    )
}


def list_presets() -> list[str]:
    """Names of the built-in presets plus any registered custom ones."""
    return sorted(PRESETS)


def get_preset(name: str | PresetConfig, **overrides: Any) -> PresetConfig:
    """A preset by name (or a config passed through), with field overrides applied.

    Raises:
        ValueError: unknown name or invalid override; the message lists what is available.
    """
    cfg = name if isinstance(name, PresetConfig) else PRESETS.get(name)
    if cfg is None:
        raise ValueError(f"unknown degradation preset {name!r}; available: {', '.join(list_presets())}")
    if overrides:
        cfg = replace(cfg, **_coerce(overrides))
    return cfg


_TUPLE_FIELDS = {f.name for f in fields(PresetConfig) if "tuple" in str(f.type)}


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(PresetConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown preset fields {unknown}; valid fields: {sorted(known)}")
    out = {}
    for key, value in values.items():
        if key in _TUPLE_FIELDS and isinstance(value, list):
            value = tuple(value)
        if key == "grid" and value is not None:
            value = {k: tuple(float(x) for x in v) for k, v in value.items()}
        out[key] = value
    return out


def load_presets_file(path: str | Path, register: bool = True) -> dict[str, PresetConfig]:
    """Custom presets from YAML: a mapping ``name -> fields``; ``base: <preset>`` inherits and overrides.

    Example::

        presets:
          my-severe:
            base: refldm-severe
            label: mysevere
            noise_range: [5, 25]

    Raises:
        ValueError: unreadable file, unknown base or field, or invalid values (the message says which).
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read presets file {path}: {e}") from e
    entries = doc.get("presets", doc) if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path}: expected a mapping 'presets: {{name: {{fields}}}}'")
    loaded: dict[str, PresetConfig] = {}
    for name, spec in entries.items():
        spec = dict(spec or {})
        base = spec.pop("base", None)
        if base is not None:
            parent = loaded.get(base) or PRESETS.get(base)
            if parent is None:
                raise ValueError(f"{path}: preset {name!r} has unknown base {base!r}")
            cfg = replace(parent, name=str(name), **_coerce(spec))
        else:
            cfg = PresetConfig(name=str(name), **_coerce(spec))
        loaded[cfg.name] = cfg
    if register:
        PRESETS.update(loaded)
    return loaded
