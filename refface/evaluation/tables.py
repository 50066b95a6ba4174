"""An evaluation's result and its tables: the columns per protocol, ``metrics.csv`` / ``metrics.md``
(ReF-LDM Table 7 layout), ``per_image.csv`` and ``errors.csv``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refface.manifests.atomic import write_text

# Table columns per protocol (ReF-LDM Table 7 order); arrows say which way is better. Under the refface
# protocol without a parsing model the face-region LPIPS is a fixed-box average, named for what it is.
COLUMNS = {
    "refldm": [("ids", "IDS↑"), ("lpips", "LPIPS↓"), ("flpips", "fLPIPS↓"), ("niqe", "NIQE↓")]
    + [("musiq", "MUSIQ↑"), ("fid", "FID↓"), ("psnr", "PSNR↑"), ("ssim", "SSIM↑")],
    "refface": [("ids", "IDS↑"), ("lpips", "LPIPS↓"), ("lpips_box", "LPIPS-box↓"), ("niqe", "NIQE↓")]
    + [("fid", "FID↓"), ("psnr", "PSNR↑"), ("ssim", "SSIM↑")],
}


TABLE_COLUMNS = COLUMNS["refldm"]


@dataclass
class EvalResult:
    """Mean metrics (``nan`` = unavailable), per-image rows, reasons for unavailable metrics, errors."""

    name: str
    metrics: dict[str, float]
    per_image: list[dict[str, Any]]
    unavailable: dict[str, str]
    errors: Any
    outputs: dict[str, str] = field(default_factory=dict)
    protocol: str = "refldm"
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[tuple[str, str]]:
        return COLUMNS[self.protocol]


PROTOCOL_NOTES = {
    "refldm": "ReF-LDM scripts/eval.py: flat <stem>.png pairs, PIL resize to 512, pyiqa metric definitions",
    "refface": "relative-path pairs at stored size, BasicSR-form PSNR/SSIM/NIQE",
}


def _fmt(col: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}" if col in ("fid", "psnr", "niqe", "musiq") else f"{value:.3f}"


def markdown_table(results: list[EvalResult]) -> str:
    """Results in ReF-LDM Table 7 layout, one row per method, with the protocol and FID reference noted."""
    columns = results[0].columns if results else TABLE_COLUMNS
    head = "| Method | " + " | ".join(label for _, label in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for r in results:
        lines.append(
            f"| {r.name} | " + " | ".join(_fmt(c, r.metrics.get(c, math.nan)) for c, _ in columns) + " |"
        )
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    reasons = sorted({f"{k}: {v}" for r in results for k, v in r.unavailable.items()})
    if reasons:
        lines += ["", "n/a = unavailable:"] + [f"- {n}" for n in reasons]
    return "\n".join(lines) + "\n"


def write_tables(result: EvalResult, out: Path) -> dict[str, str]:
    """Write ``metrics.csv`` / ``metrics.md`` (Table 7 layout), ``per_image.csv`` and ``errors.csv``."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": result.name, "protocol": result.protocol, "images": len(result.per_image)}
    summary.update({c: result.metrics.get(c, math.nan) for c, _ in result.columns})
    files = {
        "metrics.csv": pd.DataFrame([summary]).to_csv(index=False),
        "metrics.md": markdown_table([result]),
        "per_image.csv": pd.DataFrame(result.per_image).to_csv(index=False),
        "errors.csv": result.errors.to_frame().to_csv(index=False),
    }
    for fname, text in files.items():
        write_text(out / fname, text)
    return {k: str(out / k) for k in files}
