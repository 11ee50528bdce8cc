"""The randomized solver: block subspace iteration with Rayleigh-Ritz for the leading directions only.

``O(d_in^2 k)`` per iteration for a block of k columns instead of the ``O(d_in^3)`` of a dense decomposition. The
start blocks are drawn on CPU from a seeded generator, so every process of a distributed run gets the same result.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .memory import Memory, _orthonormalise, _reorthonormalise


_F64 = torch.float64

RANDOMIZED_OVERSAMPLING = 16
"""Extra columns of the randomized block beyond the vectors kept (``k = kept + max(16, kept)``)."""

RANDOMIZED_FIRST_BLOCK = 16
"""Directions the randomized memory update looks for first; later blocks are sized from the energy still missing."""

RANDOMIZED_MAX_ITERATIONS = 60
RANDOMIZED_TOLERANCE = 1e-6
"""A Ritz pair (theta, v) of the design is converged when ``||S v - theta v|| <= tol * theta`` (or theta is
negligible)."""

RANDOMIZED_MEMORY_TOLERANCE = 1e-2
"""The same for the blocks of the memory update, which may hold hundreds of directions. It can be loose: the update
selects directions by their Ritz values, which are the exact energies of the directions found (Rayleigh quotients of
orthonormal vectors add up to the energy of their span), so the memory captures at least the threshold whatever the
accuracy; a rough subspace only costs a direction more now and then. At 1e-2 the memories of the benchmarks match
the exact ones in dimension, with principal-angle cosines >= 0.999."""

RANDOMIZED_MAX_FRACTION = 1 / 16
"""The randomized memory update gives up (and runs the exact solver) once it would need more than this fraction
of the free dimensions: past that point a full decomposition is about as cheap (measured in
``benchmarks/bench_solver.py``)."""


def _default_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    """The randomized solver's start blocks are drawn on CPU from ``generator`` (a fixed seed when None), so
    every process of a distributed run computes the same design from the same (all-reduced) covariance."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if generator.device.type != "cpu":
        raise ValueError(f"the randomized solver draws on CPU: pass a CPU torch.Generator, got one on "
                         f"{generator.device}")
    return generator


def _free_projector(memory: Memory, found: Optional[torch.Tensor], device: torch.device):
    """``X -> (Q - F F^T) X``: the memory's free-space projector, deflated by orthonormal columns F [d, n] that lie
    in the free space (directions already found)."""
    B = memory.basis.to(dtype=_F64, device=device)
    complement = memory.form == "complement"

    def project(X: torch.Tensor) -> torch.Tensor:
        if B.shape[1] > 0 or complement:
            X = B @ (B.T @ X) if complement else X - B @ (B.T @ X)
        if found is not None and found.shape[1] > 0:
            X = X - found @ (found.T @ X)
        return X

    return project


def _subspace_iteration(op, X0: torch.Tensor, n_trusted: int, negligible: float,
                        max_iterations: Optional[int] = None,
                        tol: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Leading eigenpairs of a symmetric PSD operator ``S`` (``op(X) = S X``) by block subspace iteration.

    Each step: ``W = S X`` [d, k]; Rayleigh-Ritz ``T = X^T W = Z diag(theta) Z^T`` (theta descending); Ritz vectors
    ``V = X Z`` with residuals ``R = W Z - V diag(theta)`` (free: ``S V = W Z``); next block ``X = orth(W Z)``.
    Stops once the first ``n_trusted`` pairs satisfy ``||r_i|| <= tol * theta_i`` or ``theta_i <= negligible``.
    Returns ``(theta [k], V [d, k])`` of the last Rayleigh-Ritz step (theta clipped at 0).
    ``max_iterations`` / ``tol`` default to ``RANDOMIZED_MAX_ITERATIONS`` / ``RANDOMIZED_TOLERANCE``.
    """
    max_iterations = RANDOMIZED_MAX_ITERATIONS if max_iterations is None else max_iterations
    tol = RANDOMIZED_TOLERANCE if tol is None else tol
    X = _orthonormalise(X0)
    theta = X.new_zeros(X.shape[1])
    V = X
    for iteration in range(max_iterations):
        W = op(X)
        T = X.T @ W
        T = 0.5 * (T + T.T)
        theta, Z = torch.linalg.eigh(T)
        theta, Z = torch.flip(theta, dims=(0,)), torch.flip(Z, dims=(1,))
        V, WZ = X @ Z, W @ Z
        head = theta[:n_trusted]
        residual = torch.linalg.vector_norm(WZ[:, :n_trusted] - V[:, :n_trusted] * head, dim=0)
        done = (residual <= tol * head.clamp_min(0.0)) | (head <= negligible)
        if iteration >= 1 and bool(done.all()):
            break
        X = _orthonormalise(WZ)
    return theta.clamp_min(0.0), V


def _symmetric_matmul(C: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``C X`` for a symmetric C [d, d] and a narrow X [d, k], computed as ``(X^T C)^T``: the same product, about
    twice as fast on CPUs for k << d (the wide operand is read along its rows)."""
    return (X.T @ C).T


def _covariance_operator(C: torch.Tensor, project, energy: str):
    """``S_Q X`` for the free-space operator (C symmetric): ``Q C C Q`` (squared energy; its eigenvectors are the
    left singular vectors of ``Q C``) or ``Q C Q`` (linear)."""
    if energy == "squared":
        return lambda X: project(_symmetric_matmul(C, _symmetric_matmul(C, project(X))))
    return lambda X: project(_symmetric_matmul(C, project(X)))


def _random_block(d: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(d, k, dtype=_F64, generator=generator).to(device)


def _largest_eigenvalue(C: torch.Tensor, generator: torch.Generator) -> float:
    """``lambda_max`` of a symmetric PSD C (``= sigma_max(C)``), from a 4-column subspace iteration: a lower bound
    within about 1e-3 relative, which is all the negligibility cut-off ``rtol * sigma_max`` needs."""
    d = C.shape[0]
    k = min(4, d)
    X0 = _random_block(d, k, generator, C.device)
    theta, _ = _subspace_iteration(lambda X: _symmetric_matmul(C, X), X0, 1, 0.0, max_iterations=100, tol=1e-3)
    return float(theta[0])


def _randomized_top(memory: Memory, C: torch.Tensor, energy: str, n_kept: int, negligible: float,
                    generator: torch.Generator, found: Optional[torch.Tensor] = None,
                    tol: Optional[float] = None, oversampling: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``n_kept`` leading eigenpairs ``(e [n], U [d, n])`` of the free-space operator (deflated by ``found``)."""
    project = _free_projector(memory, found, C.device)
    oversampling = max(RANDOMIZED_OVERSAMPLING, n_kept) if oversampling is None else oversampling
    X0 = project(_random_block(memory.d_in, n_kept + oversampling, generator, C.device))
    theta, V = _subspace_iteration(_covariance_operator(C, project, energy), X0, n_kept, negligible, tol=tol)
    return theta[:n_kept], V[:, :n_kept]


def _clean_directions(memory: Memory, U: torch.Tensor, found: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project U [d, n] onto the free space (minus ``found``) again and re-orthonormalise it (columns kept close)."""
    if U.shape[1] == 0:
        return U
    return _reorthonormalise(_free_projector(memory, found, U.device)(U))


def _randomized_design(memory: Memory, C: torch.Tensor, r: int, rtol: float,
                       generator: torch.Generator) -> Optional[torch.Tensor]:
    """Top-r left singular vectors U [d, r_t] of ``Q C`` (randomized), or None when the free space is too small for
    the block (the caller uses the exact solver, which is cheap there)."""
    k = r + max(RANDOMIZED_OVERSAMPLING, r)
    if 2 * k > memory.free_dimension:
        return None
    smax = _largest_eigenvalue(C, generator)
    cut = (rtol * smax) ** 2  # on squared singular values
    e, U = _randomized_top(memory, C, "squared", r, cut, generator)
    usable = int((e > cut).sum()) if smax > 0 else 0
    return _clean_directions(memory, U[:, : min(r, usable)])


def _more_directions(energies: torch.Tensor, missing: float, cap: int) -> int:
    """How many more directions are needed to add ``missing`` energy (a block size; more than ``cap`` when the
    estimate exceeds it): the flat bound ``missing / last energy`` (every further energy is at most the last one),
    or the sum of a power law ``a i^-b`` fitted to the last half of the energies found, whichever is larger."""
    last = float(energies[-1])
    if not math.isfinite(missing) or last <= 0:
        return cap + 1
    flat = math.ceil(missing / last)
    n = int(energies.numel())
    if n >= 4 and flat <= cap:
        i = torch.arange(n // 2 + 1, n + 1, dtype=_F64)
        y = torch.log(energies[n // 2:].clamp_min(1e-300).to(_F64))
        x = torch.log(i)
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        if slope < 0:
            intercept = float(y.mean()) - slope * float(x.mean())
            tail = torch.exp(intercept + slope * torch.log(torch.arange(n + 1, n + cap + 2, dtype=_F64)))
            reached = torch.nonzero(torch.cumsum(tail, 0) >= missing)
            return max(flat, int(reached[0, 0]) + 1 if reached.numel() else cap + 1)
    return flat


def _randomized_candidates(memory: Memory, C: torch.Tensor, energy: str, need: float, outside: float,
                           negligible: float, generator: torch.Generator
                           ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    r"""Leading candidate directions of the memory update, enough of them for the selection rule.

    Blocks of eigenpairs of the free-space operator are found one after another, each block deflated by the ones
    before and sized from the energy still missing, until (a) their energies add up to ``need`` (the energy the
    memory must gain), or (b) a negligible one (``e <= negligible``) turns up, or (c) what is left outside
    (``outside - sum e``) is itself negligible: in (b) and (c) every non-negligible direction has been found.
    Returns ``(U [d, n], e [n])``, e descending; or None when more than ``RANDOMIZED_MAX_FRACTION`` of the free
    dimensions would be needed (predicted from the energies found, see :func:`_more_directions`, so a flat
    spectrum falls back after the first block).
    """
    d, free = memory.d_in, memory.free_dimension
    max_dirs = int(RANDOMIZED_MAX_FRACTION * free)
    block = min(RANDOMIZED_FIRST_BLOCK, max_dirs)
    if block < 1 or 2 * (block + max(RANDOMIZED_OVERSAMPLING, block)) > free:
        return None
    found = C.new_zeros(d, 0)
    energies = C.new_zeros(0)
    while True:
        e, U = _randomized_top(memory, C, energy, block, negligible, generator, found=found,
                               tol=RANDOMIZED_MEMORY_TOLERANCE, oversampling=max(RANDOMIZED_OVERSAMPLING, block // 2))
        U = _clean_directions(memory, U, found)
        found = torch.cat([found, U], dim=1)
        energies = torch.cat([energies, e])
        total_found = float(energies.sum())
        if total_found >= need or bool((e <= negligible).any()) or outside - total_found <= negligible:
            return found, energies
        more = _more_directions(energies, need - total_found, max_dirs - found.shape[1])
        if found.shape[1] + more > max_dirs:
            return None
        block = min(max(RANDOMIZED_FIRST_BLOCK, math.ceil(1.25 * more)), max_dirs - found.shape[1])
