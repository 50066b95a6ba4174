"""BasicSR's own degradation functions, loaded by file path, and the GFPGAN pipeline built from them.

Used by the parity tests and the benchmark as the reference implementation. The module file
``basicsr/data/degradations.py`` is imported directly (the ``basicsr`` package import pulls in
its whole training stack); its ``torchvision.transforms.functional_tensor`` import, gone from
current torchvision, is provided by a stand-in when torchvision lacks it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from refface.degradations.ops import noise_rng


class ReferenceUnavailable(RuntimeError):
    """BasicSR is not installed; the message says how to install it."""


INSTALL_HINT = (
    "pip download --no-deps basicsr==1.4.2 -d /tmp/bsr && "
    "pip install --no-deps --no-build-isolation /tmp/bsr/basicsr-1.4.2.tar.gz"
)


def _rgb_to_grayscale(img, num_output_channels: int = 1):
    # torchvision's formula (ITU-R 601-2 luma), for the Poisson gray path of BasicSR's torch ops.
    r, g, b = img.unbind(dim=-3)
    gray = (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(dim=-3)
    return gray.expand(img.shape) if num_output_channels == 3 else gray


def _provide_functional_tensor() -> None:
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except Exception:  # noqa: BLE001 - absent or broken torchvision: provide the one name used
        pass
    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = _rgb_to_grayscale  # type: ignore[attr-defined]
    sys.modules[name] = shim


def load_basicsr_degradations() -> types.ModuleType:
    """``basicsr/data/degradations.py`` as a module, without importing the ``basicsr`` package.

    Raises:
        ReferenceUnavailable: basicsr is not installed (message has the install line).
    """
    cached = sys.modules.get("_refface_basicsr_degradations")
    if cached is not None:
        return cached
    spec = importlib.util.find_spec("basicsr")
    if spec is None or not spec.submodule_search_locations:
        raise ReferenceUnavailable(f"basicsr is not installed; install it without its deps: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "degradations.py"
    if not path.exists():
        raise ReferenceUnavailable(f"{path} not found; reinstall basicsr: {INSTALL_HINT}")
    _provide_functional_tensor()
    mod_spec = importlib.util.spec_from_file_location("_refface_basicsr_degradations", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ReferenceUnavailable(f"{path} cannot be loaded as a module; reinstall basicsr: {INSTALL_HINT}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    sys.modules["_refface_basicsr_degradations"] = module
    return module


@contextmanager
def fixed_randn(field: np.ndarray):
    """Make ``np.random.randn`` return ``field`` (BasicSR draws its noise from the global generator)."""
    original = np.random.randn
    np.random.randn = lambda *shape: field  # type: ignore[assignment]
    try:
        yield
    finally:
        np.random.randn = original


def basicsr_kernel(bsr: types.ModuleType, params: dict) -> np.ndarray:
    """BasicSR's kernel for our recorded parameters."""
    size, kind = params["kernel_size"], params["kernel_type"]
    iso = kind in ("iso", "generalized_iso", "plateau_iso")
    if kind in ("iso", "aniso"):
        return bsr.bivariate_Gaussian(
            size, params["sigma_x"], params["sigma_y"], params["theta"], isotropic=iso
        )
    if kind.startswith("generalized"):
        return bsr.bivariate_generalized_Gaussian(
            size, params["sigma_x"], params["sigma_y"], params["theta"], params["beta"], isotropic=iso
        )
    return bsr.bivariate_plateau(
        size, params["sigma_x"], params["sigma_y"], params["theta"], params["beta"], isotropic=iso
    )


def basicsr_blur_downsample(bsr: types.ModuleType, img_rgb: np.ndarray, params: dict) -> np.ndarray:
    """GFPGAN's first two steps with BasicSR's kernel: float32 BGR [0, 1], (h', w', 3)."""
    img = img_rgb[:, :, ::-1].astype(np.float32) / 255.0
    h, w = img.shape[:2]
    blurred = cv2.filter2D(img, -1, basicsr_kernel(bsr, params))
    scale = params["scale"]
    return cv2.resize(
        blurred, (max(1, int(w // scale)), max(1, int(h // scale))), interpolation=cv2.INTER_LINEAR
    )


def basicsr_degrade(
    bsr: types.ModuleType, img_rgb: np.ndarray, params: dict, own_noise: bool = False
) -> np.ndarray:
    """GFPGAN's ``FFHQDegradationDataset`` LQ synthesis with BasicSR's functions and our params.

    The Gaussian noise field is the one our degrader draws from ``params['noise_seed']``, handed
    to BasicSR through ``np.random.randn``, so both sides see the same realization; with
    ``own_noise`` BasicSR draws it from NumPy's global generator as it does in training (timing).
    """
    h, w = img_rgb.shape[:2]
    img = basicsr_blur_downsample(bsr, img_rgb, params)
    if params["noise_type"] == "gaussian" and own_noise:
        img = bsr.add_gaussian_noise(img, params["noise_sigma"], gray_noise=params["noise_gray"])
    elif params["noise_type"] == "gaussian":
        rng = noise_rng(params["noise_seed"])
        shape = img.shape[:2] if params["noise_gray"] else img.shape
        field = rng.standard_normal(shape, dtype=np.float32)
        with fixed_randn(field):
            img = bsr.add_gaussian_noise(img, params["noise_sigma"], gray_noise=params["noise_gray"])
    elif params["noise_type"] is not None:
        raise ValueError("the reference pipeline covers Gaussian noise only")
    if params["jpeg_quality"] is not None:
        img = bsr.add_jpg_compression(img, int(params["jpeg_quality"]))
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    if params.get("color_jitter") is not None:
        img = np.clip(img + np.asarray(params["color_jitter"], dtype=np.float32), 0, 1)
    if params.get("gray"):
        img = np.tile(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None], [1, 1, 3])
    return np.clip((img * 255.0).round(), 0, 255).astype(np.uint8)[:, :, ::-1]
