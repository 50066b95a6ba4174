"""Per-item randomness: a generator seeded from (seed, key), independent of order and workers."""

from __future__ import annotations

import hashlib

import numpy as np


def item_seed(seed: int, key: str) -> int:
    """A 64-bit seed derived from ``(seed, key)``; stable across runs, platforms and processes."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def item_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng(item_seed(seed, key))
