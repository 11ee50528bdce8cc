r"""Design of ``B_t`` [r_t, d_in] before task t trains: rows in the free space of the memory.

* eigen design (the ViT paper): the top-r left singular vectors of ``Q C`` (equivalently the top-r eigenvectors of
  ``Q C^2 Q``; note: *C squared*, not ``Q C Q``), times ``1/sqrt(3)``;
* random design (the LM follow-up): Gaussian rows projected by ``Q``, normalised, times ``1/sqrt(3)``.

Every row of ``B_t`` lies in ``span(Q)``, so ``B_t x ~ 0`` for inputs x of old tasks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import solvers
from .checks import _check_covariance, _check_r, _check_rtol, _check_scale
from .covariance import LowRankCovariance
from .memory import Memory, _check_memory
from .randomized import _clean_directions, _default_generator, _randomized_design
from .solvers import _check_solver, resolve_solver


_F64 = torch.float64


def design_eigen(
    covariance: torch.Tensor,
    memory: Memory,
    r: int,
    scale: float = 1.0 / math.sqrt(3.0),
    rtol: float = 1e-6,
    solver: str = "auto",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    r"""Eigen design of ``B_t`` [r_t, d_in] (float64): rows = top-r left singular vectors of ``Q C``, times scale.

    ``covariance`` C [d_in, d_in]; ``Q`` [d_in, d_in] the memory's free-space projector.
    With ``Q C = U diag(s) V^T`` (s descending), ``B_t = scale * U[:, :r_t]^T``. Equivalently the rows
    are the top eigenvectors of ``Q C^2 Q`` (C squared: this differs from the eigenvectors of ``Q C Q``
    whenever span(M) is not invariant under C). With an empty memory they are the top eigenvectors of C.

    ``r_t = min(r, usable)`` where ``usable = #{i : s_i > rtol * sigma_max(C)}``; r_t may be 0
    (result of shape (0, d_in)): the free space holds nothing of this task, the caller decides whether
    to warn or raise. Each row is sign-fixed so its largest-|.| entry is positive (deterministic output).
    Rows are orthonormal (before scaling) and orthogonal to the memory: ``B_t M = 0``.

    ``solver``: "exact" (dense SVD of ``Q C``), "randomized" (block subspace iteration on ``Q C^2 Q`` with
    ``r + max(16, r)`` columns and Rayleigh-Ritz, converged to relative residual 1e-6; O(d_in^2 r) per step
    instead of O(d_in^3); start block from ``generator``, seed 0 when None, so it is deterministic) or "auto"
    (exact up to ``AUTO_EXACT_MAX_DIM`` input features). The randomized solver falls back to the exact one
    when the free space is smaller than twice its block.

    ``covariance`` may also be a :class:`~peft_inflora.subspace.LowRankCovariance` (``statistics_sketch``):
    ``C_hat = V diag(lambda) V^T``, V [d_in, m]. The rows are then the top-r left singular vectors of the
    ``d_in x m`` matrix ``Q V diag(lambda)`` (``Q C_hat`` without the factor ``V^T``, which has orthonormal rows),
    ``sigma_max(C)`` is taken as ``lambda_1`` and ``solver`` is not used (the problem is d_in x m); at most m rows.
    """
    memory = _check_memory(memory)
    r = _check_r(r)
    scale = _check_scale(scale)
    rtol = _check_rtol(rtol)
    if isinstance(covariance, LowRankCovariance):
        _check_solver(solver)
        return _low_rank_design(covariance.checked(memory.d_in), memory, r, scale, rtol)
    C = _check_covariance(covariance, memory)

    if resolve_solver(solver, memory.d_in) == "randomized":
        U = _randomized_design(memory.to(dtype=_F64, device=C.device), C, r, rtol, _default_generator(generator))
        if U is not None:
            return _sign_fix_rows(U.T.contiguous()) * scale
    smax = solvers._sigma_max(C)
    U, s = solvers._projected_left_singular(memory, C)
    usable = int((s > rtol * smax).sum()) if smax > 0 else 0
    r_t = min(r, usable)
    B = U[:, :r_t].T.contiguous()
    return _sign_fix_rows(B) * scale


def design_random(
    memory: Memory,
    r: int,
    scale: float = 1.0 / math.sqrt(3.0),
    generator: Optional[torch.Generator] = None,
    rtol: float = 1e-6,
) -> torch.Tensor:
    r"""Random design of ``B_t`` [r_t, d_in] (float64, on the memory's device).

    ``G ~ N(0, 1)`` [r, d_in] drawn in float64 on CPU with ``generator`` (torch's global RNG when None);
    rows projected onto the free space, ``g_i Q``; rows with ``||g_i Q|| < rtol * ||g_i||`` are dropped
    (the free space is (nearly) empty); at most ``min(r, memory.free_dimension)`` rows are kept (only
    that many can be independent), the first ones in draw order; each kept row is normalised to unit
    norm and multiplied by ``scale``. Rows are orthogonal to the memory but not to each other.
    """
    memory = _check_memory(memory)
    r = _check_r(r)
    scale = _check_scale(scale)
    rtol = _check_rtol(rtol)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"design_random draws on CPU: pass a CPU torch.Generator, got one on {generator.device}")

    d_in = memory.d_in
    G = torch.randn(r, d_in, dtype=_F64, generator=generator)
    GQ = memory.to(dtype=_F64, device=torch.device("cpu")).project(G.T).T  # Q symmetric: (Q G^T)^T = G Q
    norms_in = torch.linalg.vector_norm(G, dim=1)
    norms_out = torch.linalg.vector_norm(GQ, dim=1)
    keep = norms_out >= rtol * norms_in
    keep &= norms_out > 0
    rows = GQ[keep][: min(r, memory.free_dimension)]
    rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return (rows * scale).to(device=memory.basis.device)


def _low_rank_design(cov: LowRankCovariance, memory: Memory, r: int, scale: float, rtol: float) -> torch.Tensor:
    """Eigen design from a sketched covariance: the top-r left singular vectors of ``Q C_hat``, which are those of
    the ``d x m`` matrix ``Q V diag(lambda)`` (:meth:`LowRankCovariance.projected`); usable directions as in
    :func:`design_eigen`, with ``sigma_max(C) ~ lambda_1``."""
    U, s = cov.projected(memory.to(dtype=_F64, device=cov.device), "squared")
    smax = cov.largest_eigenvalue
    usable = int((s > rtol * smax).sum()) if smax > 0 else 0
    r_t = min(r, usable, memory.free_dimension)
    if r_t > 0:
        U = _clean_directions(memory.to(dtype=_F64, device=cov.device), U[:, :r_t])
    return _sign_fix_rows(U[:, :r_t].T.contiguous()) * scale


def _sign_fix_rows(B: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-|.| entry is positive (first such entry on ties)."""
    if B.shape[0] == 0:
        return B
    idx = B.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(torch.gather(B, 1, idx))
    signs[signs == 0] = 1.0
    return B * signs
