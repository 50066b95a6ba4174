"""Blur kernels in BasicSR's semantics: iso/aniso Gaussian, generalized Gaussian, plateau, sinc."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# Kernel families as BasicSR's ``random_mixed_kernels`` names them.
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
# A zero sigma makes BasicSR's covariance singular; below this the kernel is a delta either way.
MIN_SIGMA = 1e-3


def mesh_grid(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets from the kernel centre: (xx, yy), each (K, K); xx varies along columns."""
    ax = np.arange(-kernel_size // 2 + 1.0, kernel_size // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    return xx, yy


def inverse_sigma(sig_x: float, sig_y: float, theta: float, isotropic: bool) -> np.ndarray:
    """Inverse of the rotated covariance ``U diag(sx², sy²) Uᵀ`` (2, 2)."""
    sig_x = max(float(sig_x), MIN_SIGMA)
    sig_y = max(float(sig_y), MIN_SIGMA)
    if isotropic:
        sigma = np.array([[sig_x**2, 0.0], [0.0, sig_x**2]])
    else:
        d = np.array([[sig_x**2, 0.0], [0.0, sig_y**2]])
        u = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        sigma = u @ d @ u.T
    return np.linalg.inv(sigma)


def _quadratic(kernel_size: int, sig_x: float, sig_y: float, theta: float, isotropic: bool) -> np.ndarray:
    """``gridᵀ Σ⁻¹ grid`` at every kernel tap (K, K)."""
    inv = inverse_sigma(sig_x, sig_y, theta, isotropic)
    xx, yy = mesh_grid(kernel_size)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def bivariate_gaussian(
    kernel_size: int, sig_x: float, sig_y: float, theta: float, isotropic: bool = True
) -> np.ndarray:
    """Normalized (an)isotropic Gaussian kernel; ``theta`` in radians."""
    kernel = np.exp(-0.5 * _quadratic(kernel_size, sig_x, sig_y, theta, isotropic))
    return kernel / np.sum(kernel)


def bivariate_generalized_gaussian(
    kernel_size: int, sig_x: float, sig_y: float, theta: float, beta: float, isotropic: bool = True
) -> np.ndarray:
    """Normalized generalized Gaussian ``exp(-0.5 q^β)``; β = 1 is the Gaussian."""
    kernel = np.exp(-0.5 * np.power(_quadratic(kernel_size, sig_x, sig_y, theta, isotropic), beta))
    return kernel / np.sum(kernel)


def bivariate_plateau(
    kernel_size: int, sig_x: float, sig_y: float, theta: float, beta: float, isotropic: bool = True
) -> np.ndarray:
    """Normalized plateau kernel ``1 / (1 + q^β)``."""
    kernel = np.reciprocal(np.power(_quadratic(kernel_size, sig_x, sig_y, theta, isotropic), beta) + 1)
    return kernel / np.sum(kernel)


def _gaussian_family(p: dict, size: int) -> np.ndarray:
    return bivariate_gaussian(size, p["sigma_x"], p["sigma_y"], p["theta"], p["kernel_type"] == "iso")


def _generalized_family(p: dict, size: int) -> np.ndarray:
    iso = p["kernel_type"].endswith("_iso")
    return bivariate_generalized_gaussian(size, p["sigma_x"], p["sigma_y"], p["theta"], p["beta"], iso)


def _plateau_family(p: dict, size: int) -> np.ndarray:
    iso = p["kernel_type"].endswith("_iso")
    return bivariate_plateau(size, p["sigma_x"], p["sigma_y"], p["theta"], p["beta"], iso)


KERNEL_BUILDERS: dict[str, Callable[[dict, int], np.ndarray]] = {
    "iso": _gaussian_family,
    "aniso": _gaussian_family,
    "generalized_iso": _generalized_family,
    "generalized_aniso": _generalized_family,
    "plateau_iso": _plateau_family,
    "plateau_aniso": _plateau_family,
}


def make_kernel(params: dict, kernel_size: int) -> np.ndarray:
    """The kernel for recorded parameters (``kernel_type``, ``sigma_x``, ``sigma_y``, ``theta``, ``beta``)."""
    try:
        builder = KERNEL_BUILDERS[params["kernel_type"]]
    except KeyError:
        raise ValueError(
            f"unknown kernel type {params['kernel_type']!r}; choose one of {', '.join(KERNEL_TYPES)}"
        ) from None
    return builder(params, kernel_size)


def _sample_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    # BasicSR assumes beta_range straddles 1 and picks either side with probability 1/2.
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1))
    return float(rng.uniform(1, beta_range[1]))


def sample_kernel_params(
    rng: np.random.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    sigma_x_range: Sequence[float],
    sigma_y_range: Sequence[float],
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
) -> dict:
    """Draw kernel parameters in the order and with the distributions of ``random_mixed_kernels``.

    Isotropic kernels record ``sigma_y = sigma_x`` and ``theta = 0`` as BasicSR uses them;
    ``beta`` is ``None`` for the Gaussian families.
    """
    prob = np.asarray(kernel_prob, dtype=np.float64)
    kernel_type = str(kernel_list[int(rng.choice(len(kernel_list), p=prob / prob.sum()))])
    sigma_x = float(rng.uniform(sigma_x_range[0], sigma_x_range[1]))
    if kernel_type.endswith("iso") and not kernel_type.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = float(rng.uniform(sigma_y_range[0], sigma_y_range[1]))
        theta = float(rng.uniform(rotation_range[0], rotation_range[1]))
    beta = None
    if kernel_type.startswith("generalized"):
        beta = _sample_beta(rng, betag_range)
    elif kernel_type.startswith("plateau"):
        beta = _sample_beta(rng, betap_range)
    return {"kernel_type": kernel_type, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta, "beta": beta}
