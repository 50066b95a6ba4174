"""Shared setup for the tiny ReF-LDM and training-loop tests: thread limits, accelerate state, tiny config.

Use in a test module (after its ``pytest.importorskip`` lines)::

    from common.tiny_refldm import _one_thread  # noqa: F401  (autouse fixture)
    from common.tiny_refldm import _fresh_accelerate_state  # noqa: F401  (autouse fixture)
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[2] / "configs" / "refldm_tiny.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tiny models gain nothing from intra-op threads, and on a busy machine idle threads spin.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # accelerate keeps process-wide singletons; each run builds its own Accelerator with its own precision.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
