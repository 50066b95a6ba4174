"""An MGFR run's configuration: the stages, :class:`MGFRConfig` (data, guidance, adapters, losses) and
the YAML reader that applies the ``stage<N>:`` overrides and the command line's ``key=value`` ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refface.train.loop_config import config_from_dict
from refface.train.overrides import apply_overrides

STAGES = (1, 2)


@dataclass
class MGFRConfig:
    """MGFR model and data settings (the ``mgfr:`` section of the YAML config).

    Attributes:
        stage: 1 (text + LQ, LCA only) or 2 (adds reference, identity, RCA).
        resolution: training image size (512 for SD 1.x/2.x base).
        batch_size: per-process batch size.
        num_workers: dataloader workers per process.
        id_dim: identity embedding size D (512 ArcFace, 128 dlib). ``None`` (the default): read from
            the dataset (``embeddings.json`` of a root, the first shard sample otherwise); a value set
            here must equal the dataset's.
        num_id_tokens: identity tokens appended to RCA's cross-attention context.
        rlf_channels: hidden channels of RLF's ResBlock.
        negative_quality_fraction: share of negative-quality samples the input pipeline makes.
        negative_attribute_fraction: share of negative-attribute samples (degraded target + the
            sample's negative-attribute prompt); with ``negative_quality_fraction`` at most 1.
        prompt_dropout: probability of replacing a prompt with "" (keeps unconditional guidance usable).
        train_lca_in_stage2: keep training LCA in stage 2 (else it is frozen at stage 1's weights).
        init_use_ema: stage 2 starts from stage 1's EMA weights when the checkpoint has them.
        validation_steps: DDIM steps for validation grids.
        validation_samples: rows in each validation grid.
    """

    stage: int = 1
    resolution: int = 512
    batch_size: int = 4
    num_workers: int = 4
    id_dim: int | None = None
    num_id_tokens: int = 4
    rlf_channels: int = 64
    negative_quality_fraction: float = 0.1
    negative_attribute_fraction: float = 0.1
    prompt_dropout: float = 0.05
    train_lca_in_stage2: bool = True
    init_use_ema: bool = True
    validation_steps: int = 20
    validation_samples: int = 4

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.resolution % 8 or self.resolution < 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError("prompt_dropout must be within [0, 1]")
        if self.batch_size < 1 or (self.id_dim is not None and self.id_dim < 1) or self.num_id_tokens < 1:
            raise ValueError("batch_size, id_dim and num_id_tokens must be >= 1")
        shares = (self.negative_quality_fraction, self.negative_attribute_fraction)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(
                "negative_quality_fraction and negative_attribute_fraction must be >= 0 and sum to at most 1, "
                f"got {shares[0]} and {shares[1]}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MGFRConfig:
        return config_from_dict(cls, d, "mgfr")


def load_yaml_config(
    path: str | Path, stage: int, overrides: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(loop section, mgfr section)`` of a YAML config with the ``stage<N>:`` overrides applied,
    then the command line's ``key=value`` ``overrides`` (``loop.max_steps=100``, ``mgfr.batch_size=2``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"loop", "mgfr", "stage1", "stage2"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (loop, mgfr, stage1, stage2)")
    loop = dict(raw.get("loop") or {})
    mgfr = dict(raw.get("mgfr") or {})
    override = raw.get(f"stage{stage}") or {}
    bad = set(override) - {"loop", "mgfr"}
    if bad:
        raise ValueError(f"{path}: stage{stage} may override only loop and mgfr, got {sorted(bad)}")
    loop.update(override.get("loop") or {})
    mgfr.update(override.get("mgfr") or {})
    if overrides:
        merged = apply_overrides({"loop": loop, "mgfr": mgfr}, overrides, sections=("loop", "mgfr"))
        loop, mgfr = merged["loop"], merged["mgfr"]
    mgfr["stage"] = stage
    return loop, mgfr
