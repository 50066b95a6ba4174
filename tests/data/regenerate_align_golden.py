"""Regenerate the FFHQ-crop golden file: ``python tests/data/regenerate_align_golden.py``.

Only rerun after an intended change to refface.mining.align; the test compares against these bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def golden_input() -> tuple[np.ndarray, np.ndarray]:
    """A smooth synthetic 200x240 RGB image and 5 landmarks of a tilted, off-centre 'face'."""
    yy, xx = np.mgrid[:200, :240].astype(np.float64)
    img = np.stack(
        [
            127.5 + 120 * np.sin(xx / 17.0) * np.cos(yy / 23.0),
            127.5 + 120 * np.cos((xx + yy) / 31.0),
            127.5 + 120 * np.sin(np.hypot(xx - 120, yy - 90) / 13.0),
        ],
        axis=-1,
    )
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    landmarks = np.array([[101.3, 82.6], [146.8, 88.1], [122.9, 111.4], [104.2, 135.0], [141.7, 139.9]])
    return img, landmarks


def main() -> None:
    from refface.mining.align import ffhq_crop

    img, landmarks = golden_input()
    np.save(HERE / "align_golden_ffhq96.npy", ffhq_crop(img, landmarks, 96))
    print("wrote", HERE / "align_golden_ffhq96.npy")


if __name__ == "__main__":
    main()
