"""A build killed with SIGKILL at several points resumes to byte-identical outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from common.outputs import dataset_files

REPO = Path(__file__).resolve().parents[1]
KILL_AFTER = REPO / "tests" / "common" / "kill_after.py"
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
    """The ``refface`` arguments of the build."""
    return [
        "build", "ffhq-ref", str(images), "--out", str(out),
        "--detector", "dlib", "--workers", str(workers), "--chunk-size", "4",
    ]  # fmt: skip


def run(cmd: list[str]) -> None:
    env = {**os.environ, "REFFACE_PROGRESS": "0"}
    subprocess.run(
        [sys.executable, "-m", "refface.cli", *cmd],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )


def kill_at(cmd: list[str], out: Path, pattern: str, timeout: float = 600) -> bool:
    """Run the build and SIGKILL its whole process group right after a file matching ``pattern`` lands.

    Returns True when the build was killed there, False when it finished without writing such a file.
    """
    env = {**os.environ, "REFFACE_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, str(KILL_AFTER), str(out), pattern, *cmd],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), err.decode(errors="replace")
    return proc.returncode == -signal.SIGKILL


def build_json_without_timings(root: Path) -> dict:
    info = json.loads((root / "build.json").read_text())
    info.pop("timings")
    info.pop("this_run_seconds")
    info.pop("mining_timings", None)
    # Photos are built on crops inside the root itself.
    assert info["image_root"] == str((root / "aligned").resolve())
    info["image_root"] = "aligned"
    # What each stage ran on depends on what the process had loaded before it, not on the outputs.
    info.pop("devices", None)
    info["config"].pop("workers")
    return info


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_byte_identical(faces_dir, tmp_path):
    images = make_subset(faces_dir, tmp_path / "images")
    reference = tmp_path / "reference"
    run(command(images, reference, workers=1))

    killed = tmp_path / "killed"
    # Each run dies right after one more of these lands, so every stage boundary is crossed by a kill.
    kill_points = [
        "mined/.parts/*chunk-*.pkl",  # the first mining part (photos are mined into mined/)
        "mined/.stages/mine.json",  # mining done
        ".stages/align.json",  # aligned crops written
        ".stages/identities.json",
        ".stages/splits.json",
        "test_references.csv",
    ]
    for pattern in kill_points:
        assert kill_at(command(images, killed, workers=2), killed, pattern), (
            f"the build never wrote {pattern}"
        )
    run(command(images, killed, workers=2))

    assert dataset_files(killed) == dataset_files(reference)
    assert build_json_without_timings(killed) == build_json_without_timings(reference)
    assert not list(killed.rglob(".*.tmp"))
