"""Degradations: BasicSR-semantics ops, named presets and the deterministic per-image degrader."""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use so that importing the package (e.g. by the CLI) stays light.
_EXPORTS = {
    "Degrader": "refface.degradations.degrader",
    "apply_params": "refface.degradations.degrader",
    "prepare_input": "refface.degradations.degrader",
    "make_degrader": "refface.degradations.degrader",
    "sample_params": "refface.degradations.degrader",
    "PRESETS": "refface.degradations.presets",
    "PresetConfig": "refface.degradations.presets",
    "get_preset": "refface.degradations.presets",
    "list_presets": "refface.degradations.presets",
    "load_presets_file": "refface.degradations.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refface.degradations' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
