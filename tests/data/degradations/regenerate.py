"""Regenerate the degradation goldens: ``.venv/bin/python tests/data/degradations/regenerate.py``.

Writes ``input.png`` (a deterministic synthetic face-like image), one LQ PNG per case and
``goldens.json`` (cases with their recorded params). Review the diff before committing.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from refface.degradations import Degrader, get_preset
from refface.manifests.io import write_png

HERE = Path(__file__).resolve().parent
CASES = [
    {"preset": "refldm-severe", "overrides": {"out_size": 128}, "seed": 0, "key": "face-0"},
    {"preset": "refldm-moderate", "overrides": {"out_size": 128}, "seed": 0, "key": "face-0"},
    {
        "preset": "gfpgan-train",
        "overrides": {"out_size": 128, "color_jitter_prob": 1.0},
        "seed": 1,
        "key": "face-1",
    },
    {
        "preset": "difface-test",
        "overrides": {
            "out_size": 128,
            "grid": {
                "sigma_x": [4],
                "sigma_y": [8],
                "theta": [0.7853981633974483],
                "scale": [4, 8],
                "noise": [5],
                "jpeg": [40],
            },
        },
        "seed": 2,
        "key": "face-2",
    },
]


def synthetic_input(size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(7 * xx + c) * np.cos(6 * yy - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    img = (img + 1) * 90 + 30
    cv2.circle(img, (size // 2, size // 2), size // 4, (230, 180, 150), -1)
    cv2.line(img, (10, 100), (110, 20), (20, 40, 60), 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def main() -> None:
    img = synthetic_input()
    write_png(HERE / "input.png", img)
    cases = []
    for i, case in enumerate(CASES):
        cfg = get_preset(case["preset"], **case["overrides"])
        lq, params = Degrader(cfg, seed=case["seed"]).degrade(img, case["key"])
        name = f"lq_{i}_{case['preset']}.png"
        write_png(HERE / name, lq)
        cases.append({**case, "output": name, "params": json.loads(json.dumps(params))})
    (HERE / "goldens.json").write_text(
        json.dumps({"input": "input.png", "cases": cases}, indent=2, sort_keys=True) + "\n"
    )
    print(f"wrote {len(cases)} goldens to {HERE}")


if __name__ == "__main__":
    main()
