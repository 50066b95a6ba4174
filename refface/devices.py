"""Which compute devices refface has and uses: GPUs, onnxruntime providers, FAISS GPUs, torch.

A stage must never fall back to the CPU without a word on a machine that has a GPU: ONNX models
refuse to start when an NVIDIA GPU is present but onnxruntime has no CUDA provider (the classic
cause: the CPU ``onnxruntime`` installed beside ``onnxruntime-gpu``), unless the user allows it
with ``REFFACE_ALLOW_CPU=1``. Every stage manifest records what was used (:func:`runtime_devices`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from importlib import metadata

log = logging.getLogger(__name__)

ALLOW_CPU_ENV = "REFFACE_ALLOW_CPU"
ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
FAISS_PACKAGES = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")
ORT_FIX = (
    "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu[cuda,cudnn]' "
    "(or `make install GPU=1`)"
)
FAISS_FIX = "pip uninstall -y faiss-cpu faiss-gpu && pip install faiss-gpu (or `make install GPU=1`)"

# Devices noted by the code that used them in this process (component -> description).
_USED: dict[str, object] = {}
_FAISS_WARNED = False


class CpuFallbackError(RuntimeError):
    """A GPU is present but a stage would run on the CPU because of how things are installed."""


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """``{distribution: version}`` for those of ``names`` that are installed."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def nvidia_gpus() -> tuple[str, ...]:
    """Names of the NVIDIA GPUs ``nvidia-smi -L`` lists (empty without a driver or a GPU)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.split(" (UUID")[0] for line in out.splitlines() if line.startswith("GPU "))


def gpu_present() -> bool:
    """True when this machine has an NVIDIA GPU (seen by the driver, or by an imported CUDA torch)."""
    if nvidia_gpus():
        return True
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def allow_cpu() -> bool:
    return os.environ.get(ALLOW_CPU_ENV, "") not in ("", "0", "false", "no")


def ort_diagnosis(available: list[str]) -> str:
    """Why onnxruntime lacks the CUDA provider, from what is installed."""
    have = installed_versions(ORT_PACKAGES)
    listed = ", ".join(f"{k} {v}" for k, v in have.items()) or "no onnxruntime distribution"
    if len(have) > 1:
        cause = "both onnxruntime builds are installed and the CPU one shadows the GPU one"
    elif "onnxruntime-gpu" in have:
        cause = "onnxruntime-gpu is installed but its CUDA libraries did not load (CUDA/cuDNN versions)"
    else:
        cause = "only the CPU build of onnxruntime is installed"
    return f"{cause} (installed: {listed}; providers: {', '.join(available) or 'none'})"


def check_onnx_gpu(available: list[str], what: str = "ONNX models") -> None:
    """Refuse (or, with ``REFFACE_ALLOW_CPU=1``, warn) when a GPU is present but ORT cannot use it.

    Raises:
        CpuFallbackError: naming the cause, the fix and the escape hatch.
    """
    if "CUDAExecutionProvider" in available or not gpu_present():
        return
    message = (
        f"an NVIDIA GPU is present but onnxruntime has no CUDAExecutionProvider, so {what} would run "
        f"on the CPU: {ort_diagnosis(available)}. Fix: {ORT_FIX}. To run on the CPU anyway set "
        f"{ALLOW_CPU_ENV}=1."
    )
    if allow_cpu():
        log.warning("%s", message)
        return
    raise CpuFallbackError(message)


def warn_faiss_cpu(num_gpus: int) -> str | None:
    """The warning for a FAISS without GPUs on a GPU machine (logged; returned for reports)."""
    if num_gpus > 0 or not gpu_present():
        return None
    global _FAISS_WARNED
    have = ", ".join(f"{k} {v}" for k, v in installed_versions(FAISS_PACKAGES).items()) or "none"
    message = (
        f"an NVIDIA GPU is present but FAISS sees none (installed: {have}); neighbour search runs "
        f"on the CPU. Fix: {FAISS_FIX}"
    )
    if not _FAISS_WARNED:
        log.warning("%s", message)
        _FAISS_WARNED = True
    return message


def note_device(component: str, description: object) -> None:
    """Record what ``component`` ran on in this process (read back by :func:`runtime_devices`)."""
    _USED[component] = description


def torch_summary(torch) -> dict:
    """torch build and devices, from an imported torch module."""
    info: dict = {"version": torch.__version__, "cuda_build": torch.version.cuda}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["cuda_devices"] = []
    return info


def runtime_devices() -> dict:
    """What this process has and used, for manifests: GPUs, and for each compute library it has
    imported (onnxruntime, faiss, torch) its build and devices, plus what the code noted it used."""
    out: dict = {"gpus": list(nvidia_gpus())}
    ort = sys.modules.get("onnxruntime")
    if ort is not None:
        out["onnxruntime"] = {
            "packages": installed_versions(ORT_PACKAGES),
            "providers": list(ort.get_available_providers()),
        }
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        get = getattr(faiss, "get_num_gpus", None)
        out["faiss"] = {"packages": installed_versions(FAISS_PACKAGES), "gpus": int(get()) if get else 0}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        out["torch"] = torch_summary(torch)
    if _USED:
        out["used"] = dict(_USED)
    return out
