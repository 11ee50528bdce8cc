"""Argument checks of the subspace math, and its choice lists (each defined here once).

Every public function of :mod:`peft_inflora.subspace` checks its arguments with these before computing anything, and
raises ``ValueError`` saying what to pass instead. ``InfLoRAConfig`` validates its fields against the same lists.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch


if TYPE_CHECKING:
    from .memory import Memory

MEMORY_FORMS = ("basis", "complement")
"""How a :class:`~peft_inflora.subspace.Memory` stores the memory: its basis M, or the basis P of its complement."""
MEMORY_KINDS = ("dualgpm", "gpm")
"""The memory rule (``InfLoRAConfig.memory``): DualGPM switches to the complement once it is smaller, GPM never."""
ENERGIES = ("squared", "linear")
"""What the energy threshold measures (``InfLoRAConfig.energy``): squared singular values of C, or eigenvalues."""

_F64 = torch.float64


def _as_int(value, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = value.__index__()
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_r(r) -> int:
    if isinstance(r, bool) or not hasattr(type(r), "__index__"):
        raise ValueError(f"r (the rank of B_t) must be a positive integer, got {r!r}")
    r = r.__index__()
    if r <= 0:
        raise ValueError(f"r (the rank of B_t) must be a positive integer, got {r}; use r >= 1")
    return r


def _check_rtol(rtol: float) -> float:
    rtol = float(rtol)
    if not (0.0 <= rtol < 1.0) or math.isnan(rtol):
        raise ValueError(f"rtol must be in [0, 1), got {rtol}; the default 1e-6 is usually right")
    return rtol


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a finite positive number (the paper uses 1/sqrt(3)), got {scale}")
    return scale


def _check_covariance(covariance, memory: Memory) -> torch.Tensor:
    """Validate and convert to float64 (on the covariance's device)."""
    if not isinstance(covariance, torch.Tensor):
        raise ValueError(f"covariance must be a torch.Tensor of shape (d_in, d_in), got {type(covariance).__name__}")
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(
            f"covariance must be square (d_in, d_in), got shape {tuple(covariance.shape)}; "
            "pass C = X^T X / N of the layer's inputs X (N, d_in)"
        )
    if covariance.shape[0] != memory.d_in:
        raise ValueError(
            f"covariance is {tuple(covariance.shape)} but memory.d_in is {memory.d_in}: "
            "pass the covariance of this layer's inputs together with this layer's memory"
        )
    C = covariance.detach().to(dtype=_F64)
    finite = torch.isfinite(C)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise ValueError(
            f"statistics contain NaN or inf: {n_bad} of {C.numel()} covariance entries are not finite; "
            "recompute the statistics (accumulate in float32/float64, check the model's outputs for "
            "overflow or NaN)"
        )
    return C


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (0.0 < threshold <= 1.0):  # also rejects NaN
        raise ValueError(
            f"threshold must be in (0, 1], got {threshold}; it is the fraction of the task's input "
            "energy the memory must capture (the paper uses 0.95-0.98; see energy_threshold)"
        )
    return threshold


def _check_energy(energy: str) -> str:
    if energy not in ENERGIES:
        raise ValueError(
            f"unknown energy {energy!r}: use 'squared' (the authors' convention, energies are squared "
            "singular values of C) or 'linear' (energies are eigenvalues of C)"
        )
    return energy
