"""bench/gpu_check.py without a GPU: every part that needs CUDA says so and is skipped; the report
collects whatever parts wrote. (`bash bench/gpu_check.sh --dry-run` runs every part at toy sizes.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def gpu_check(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "cuda", lambda: False)
    return module


def test_gpu_parts_are_skipped_with_a_message_without_cuda(gpu_check, capsys, monkeypatch):
    import refface.mining.neighbors as neighbors

    monkeypatch.setattr(neighbors, "gpu_available", lambda: False)
    assert gpu_check.part_refldm(dry=False) == {"skipped": "no CUDA device"}
    assert gpu_check.part_mgfr(dry=False) == {"skipped": "no CUDA device"}
    assert gpu_check.part_faiss(dry=False) == {"skipped": "FAISS sees no GPU"}
    out = capsys.readouterr().out
    assert "refldm: no CUDA device; skipped" in out and "faiss: this FAISS build sees no GPU" in out


def test_report_names_the_device_and_every_part(gpu_check, tmp_path):
    gpu_check.write("refldm", {"skipped": "no CUDA device"}, dry=False)
    gpu_check.write("arcface", {"providers": {"CPUExecutionProvider": {"faces_per_s": 10.0}}}, dry=False)
    gpu_check.part_report(dry=False)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"].startswith("CPU only")
    assert set(report["parts"]) == set(gpu_check.PARTS)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "skipped: no CUDA device" in md and "faces_per_s" in md and "not measured" in md
