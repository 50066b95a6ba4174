"""A build killed with SIGKILL at several points resumes to byte-identical outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from common.outputs import dataset_files

REPO = Path(__file__).resolve().parents[1]
# Small subset of the shared photos: three LFW people, two singletons and one web-photo person.
SUBSET = {
    "lfw/Alejandro_Toledo": 6,
    "lfw/Alvaro_Uribe": 6,
    "lfw/Amelie_Mauresmo": 6,
    "face_recognition/biden": 3,
    "lfw_distractors/Adrian_Fernandez": 1,
    "lfw_distractors/Alain_Ducasse": 1,
}


def make_subset(faces_dir: Path, dest: Path) -> Path:
    for folder, n in SUBSET.items():
        files = sorted((faces_dir / folder).iterdir())[:n]
        (dest / folder).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, dest / folder / f.name)
    return dest


def command(images: Path, out: Path, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "refface.cli", "build", "ffhq-ref", str(images), "--out", str(out),
        "--detector", "dlib", "--workers", str(workers), "--chunk-size", "4",
    ]  # fmt: skip


def run(cmd: list[str]) -> None:
    env = {**os.environ, "REFFACE_PROGRESS": "0"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)


def kill_at(cmd: list[str], marker, timeout: float = 300) -> bool:
    """Start the build, SIGKILL its whole process group as soon as ``marker()`` is true.

    Returns True when the kill happened before the build finished on its own.
    """
    env = {**os.environ, "REFFACE_PROGRESS": "0"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if marker():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return False


def build_json_without_timings(root: Path) -> dict:
    info = json.loads((root / "build.json").read_text())
    info.pop("timings")
    info.pop("this_run_seconds")
    info["config"].pop("workers")
    return info


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_byte_identical(faces_dir, tmp_path):
    images = make_subset(faces_dir, tmp_path / "images")
    reference = tmp_path / "reference"
    run(command(images, reference, workers=1))

    killed = tmp_path / "killed"
    markers = [
        ("first mining part", lambda: any((killed / ".parts").rglob("chunk-*.pkl"))),
        ("mining done", lambda: (killed / ".stages" / "mine.json").exists()),
        ("identities done", lambda: (killed / ".stages" / "identities.json").exists()),
        ("splits done", lambda: (killed / ".stages" / "splits.json").exists()),
        ("references written", lambda: (killed / "test_references.csv").exists()),
    ]
    kills = 0
    for _name, marker in markers:
        kills += kill_at(command(images, killed, workers=2), marker)
    assert kills >= 3  # most kill points landed mid-build
    run(command(images, killed, workers=2))

    assert dataset_files(killed) == dataset_files(reference)
    assert build_json_without_timings(killed) == build_json_without_timings(reference)
    assert not list(killed.rglob(".*.tmp"))
