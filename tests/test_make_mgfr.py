"""From a fresh output folder: `make build-ffhq-ref` then `make train-mgfr` (both stages) with the
defaults, the tiny config and a tiny random SD: the commands the Makefile runs, on a few real faces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _make(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # -o install: the environment running the tests is the installed one (VENV= points at it).
    cmd = ["make", "--no-print-directory", "-o", "install", f"VENV={sys.prefix}", *args]
    env = {**os.environ, "REFFACE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture()
def ffhq_like(faces_dir: Path, tmp_path: Path) -> Path:
    """FFHQ-aligned 512 crops: one person five times (refldm_demo) and four other people."""
    demo = faces_dir.parent / "refldm_demo"
    if not demo.is_dir():
        pytest.skip(f"{demo} not found")
    out = tmp_path / "ffhq"
    out.mkdir()
    for name in ("gt.png", "ref0.png", "ref1.png", "ref2.png", "ref3.png"):
        shutil.copy(demo / name, out / f"demo_{name}")
    for src in sorted((faces_dir / "gfpgan_inputs" / "unlabeled").glob("cropped_faces__*")):
        shutil.copy(src, out / src.name)
    return out


@pytest.mark.slow
@pytest.mark.faces
def test_make_build_then_train_with_defaults(ffhq_like: Path, tmp_path: Path):
    from refface.train.mgfr.tiny_sd import save_tiny_sd

    if shutil.which("make") is None or not (Path(sys.prefix) / "bin" / "accelerate").exists():
        pytest.skip("make or the environment's accelerate launcher is missing")
    out = tmp_path / "out"
    sd = save_tiny_sd(tmp_path / "sd")

    build = _make("build-ffhq-ref", f"FFHQ={ffhq_like}", f"OUT={out}")
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    meta = json.loads((out / "ffhq-ref" / "embeddings.json").read_text())
    # No ArcFace weights on an offline machine: the default embedder falls back to dlib.
    assert meta["dim"] == 128 and meta["model"].startswith("dlib")

    for stage in (1, 2):
        args = ["train-mgfr", f"SD={sd}", "CONFIG=configs/mgfr_tiny.yaml", f"STAGE={stage}", "MAX_STEPS=2"]
        run = _make(*args, f"OUT={out}")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        state = out / "mgfr" / f"stage{stage}" / "checkpoints" / "step_000002" / "state.json"
        assert state.is_file()
    task = json.loads(state.read_text())["task"]
    assert task["mgfr"]["id_dim"] == 128 and task["adapters"]["id_dim"] == 128


def test_make_usage_names_the_options():
    res = _make("build-ffhq-ref")
    assert res.returncode != 0 and "EMBEDDER=auto|arcface|dlib" in res.stdout and "MODEL=" in res.stdout
    res = _make("train-mgfr")
    assert res.returncode != 0 and "CONFIG=" in res.stdout and "SD=" in res.stdout


def test_auto_embedder_is_arcface_when_its_weights_are_found(tmp_path, monkeypatch):
    from refface.mining.embed import check_embedding_dim, resolve_embedder_name

    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    assert resolve_embedder_name("auto") == "dlib"  # offline fallback
    onnx = tmp_path / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    onnx.parent.mkdir(parents=True)
    onnx.write_bytes(b"weights")
    assert resolve_embedder_name("auto") == "arcface"
    assert resolve_embedder_name("auto", tmp_path / "dlib_face_recognition_resnet_model_v1.dat") == "dlib"
    assert resolve_embedder_name("auto", tmp_path / "my_arcface.onnx") == "arcface"
    assert resolve_embedder_name("dlib") == "dlib"
    with pytest.raises(
        ValueError, match=r"^identity embedding size mismatch: a gives 128-d .* b expects 512-d; fix$"
    ):
        check_embedding_dim(128, "a", 512, "b", "fix")
    check_embedding_dim(512, "a", 512, "b", "fix")
