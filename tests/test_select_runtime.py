"""scripts/select_runtime.sh leaves exactly one onnxruntime and one FAISS build, and the shared module
folder intact, whichever mix it starts from. Runs pip for real in a scratch venv, on stand-in wheels
(same distribution names, same ``onnxruntime`` / ``faiss`` module folders) so nothing is downloaded."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _wheel(folder: Path, dist: str, version: str, module: str) -> Path:
    """A minimal pure-Python wheel ``dist`` that installs ``module/__init__.py`` naming its build."""
    name = dist.replace("-", "_")
    files = {
        f"{module}/__init__.py": f"BUILD = {dist!r}\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("select_runtime")
    wheels = root / "wheels"
    wheels.mkdir()
    for dist, module in [
        ("onnxruntime", "onnxruntime"),
        ("onnxruntime-gpu", "onnxruntime"),
        ("faiss-cpu", "faiss"),
        ("faiss-gpu", "faiss"),
    ]:
        _wheel(wheels, dist, "1.0.0", module)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    env = {
        **os.environ,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_CONSTRAINT": "",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    return root / "venv" / "bin" / "python", env


def _pip(py, env, *args):
    subprocess.run([str(py), "-m", "pip", *args], check=True, env=env, capture_output=True, text=True)


def _state(py, env) -> tuple[set[str], str, str]:
    code = (
        "from importlib import metadata\n"
        "names = {'onnxruntime', 'onnxruntime-gpu', 'faiss-cpu', 'faiss-gpu'}\n"
        "have = sorted(d.metadata['Name'] for d in metadata.distributions() if d.metadata['Name'] in names)\n"
        "import onnxruntime, faiss\n"
        "print(','.join(have)); print(onnxruntime.BUILD); print(faiss.BUILD)\n"
    )
    out = subprocess.run([str(py), "-c", code], check=True, env=env, capture_output=True, text=True).stdout
    have, ort, faiss = out.strip().splitlines()
    return set(have.split(",")), ort, faiss


def _select(py, env, runtime: str) -> str:
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "select_runtime.sh"), str(py), runtime],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gpu_replaces_both_cpu_builds_and_keeps_the_module_folder(venv):
    py, env = venv
    # What `pip install -e .[gpu]` on top of an old CPU install leaves: both builds of each.
    _pip(py, env, "install", "-q", "onnxruntime==1.0.0", "faiss-cpu==1.0.0")
    _pip(py, env, "install", "-q", "onnxruntime-gpu==1.0.0", "faiss-gpu==1.0.0")
    _pip(py, env, "install", "-q", "--force-reinstall", "onnxruntime==1.0.0")  # the CPU one wins
    assert _state(py, env)[1] == "onnxruntime"
    out = _select(py, env, "gpu")
    assert "runtime: onnxruntime-gpu 1.0.0 (removed: onnxruntime)" in out
    assert "runtime: faiss-gpu 1.0.0 (removed: faiss-cpu)" in out
    assert _state(py, env) == ({"onnxruntime-gpu", "faiss-gpu"}, "onnxruntime-gpu", "faiss-gpu")
    # Already right: nothing is touched.
    assert _select(py, env, "gpu").splitlines() == [
        "runtime: onnxruntime-gpu 1.0.0",
        "runtime: faiss-gpu 1.0.0",
    ]


def test_cpu_switches_back(venv):
    py, env = venv
    _select(py, env, "cpu")
    assert _state(py, env) == ({"onnxruntime", "faiss-cpu"}, "onnxruntime", "faiss-cpu")


def test_unknown_runtime_is_refused(venv):
    py, _ = venv
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "select_runtime.sh"), str(py), "tpu"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage" in done.stderr
