"""Dense solvers of the design and the memory update (float64 LAPACK), and the choice of solver.

``solver="exact"`` runs these: SVD / eigh of the projected covariance, ``O(d_in^3)``. Every decomposition falls back
(with a ``RuntimeWarning``) when LAPACK fails on an ill-conditioned matrix. ``"randomized"`` finds the leading
directions only (:mod:`peft_inflora.subspace.randomized`); ``"auto"`` picks by the input width.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch

from .memory import Memory


_F64 = torch.float64

SOLVERS = ("auto", "exact", "randomized")

AUTO_EXACT_MAX_DIM = 1024
"""``solver="auto"`` uses the exact solver up to this many input features, the randomized one above: at
d_in <= 1024 a dense decomposition takes well under a second (and is exact); at d_in = 4096 it takes tens of
seconds per layer on a CPU core, the randomized solver about a second."""


def _check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(
            f"unknown solver {solver!r}: use 'exact' (dense SVD / eigh, exact), 'randomized' (block subspace "
            f"iteration for the leading directions only, for wide layers) or 'auto' (exact up to "
            f"{AUTO_EXACT_MAX_DIM} input features, randomized above)"
        )
    return solver


def resolve_solver(solver: str, d_in: int) -> str:
    """The solver ``"auto"`` stands for at input width ``d_in``: ``"exact"`` up to ``AUTO_EXACT_MAX_DIM``,
    ``"randomized"`` above. ``"exact"`` and ``"randomized"`` are returned unchanged."""
    solver = _check_solver(solver)
    if solver != "auto":
        return solver
    return "randomized" if int(d_in) > AUTO_EXACT_MAX_DIM else "exact"


def _sigma_max(C: torch.Tensor) -> float:
    """Largest singular value of a covariance: ``max |eigenvalue|`` of the symmetric C (eigvalsh: about 10x cheaper
    than the SVD behind ``matrix_norm(C, 2)`` at d_in = 4096)."""
    if C.numel() == 0:
        return 0.0
    e = _safe_eigh(0.5 * (C + C.T), eigenvectors=False)
    return float(e.abs().max())


def _safe_eigh(A: torch.Tensor, eigenvectors: bool = True):
    """``torch.linalg.eigh(A)`` (``eigvalsh`` when ``eigenvectors=False``) of a symmetric PSD ``A``: eigenvalues
    ascending. If the solver fails (``torch.linalg.LinAlgError``, e.g. on an ill-conditioned covariance) it warns
    (``RuntimeWarning``) and falls back to eigh of ``A + c I`` in float64 (c: a tiny jitter, subtracted from the
    eigenvalues again; eigenvectors are unchanged by it), and if that fails too, to the SVD (for a symmetric PSD
    ``A``, ``A = U diag(s) U^T`` is its eigendecomposition)."""
    try:
        return torch.linalg.eigh(A) if eigenvectors else torch.linalg.eigvalsh(A)
    except torch.linalg.LinAlgError as exc:
        error = exc
    A64 = A.to(torch.float64)
    n = A64.shape[-1]
    jitter = 1e-10 * max(float(torch.diagonal(A64).abs().max()) if n else 0.0, 1e-300)
    warnings.warn(f"torch.linalg.eigh failed on a {n}x{n} matrix ({error}); falling back to eigh in float64 with "
                  f"{jitter:.1e} added to the diagonal.", RuntimeWarning, stacklevel=2)
    try:
        e, V = torch.linalg.eigh(A64 + jitter * torch.eye(n, dtype=A64.dtype, device=A64.device))
        e = e - jitter
    except torch.linalg.LinAlgError as exc:
        warnings.warn(f"eigh with jitter failed too ({exc}); falling back to the SVD.", RuntimeWarning, stacklevel=2)
        U, sv, _ = torch.linalg.svd(A64)
        e, V = torch.flip(sv, dims=(0,)), torch.flip(U, dims=(1,))
    return (e.to(A.dtype), V.to(A.dtype)) if eigenvectors else e.to(A.dtype)


def _safe_left_singular(A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Thin SVD of ``A`` [m, n]: left singular vectors U [m, min(m, n)] and singular values s (descending). If the
    SVD fails (``torch.linalg.LinAlgError``) it warns and uses :func:`_safe_eigh` of ``A A^T`` in float64 instead
    (``s = sqrt(eigenvalues)``; exact in exact arithmetic, accurate for singular values well above
    ``sqrt(eps) * s_max``, which covers every direction the design and memory rules keep)."""
    try:
        U, s, _ = torch.linalg.svd(A, full_matrices=False)
        return U, s
    except torch.linalg.LinAlgError as exc:
        warnings.warn(f"torch.linalg.svd failed on a {tuple(A.shape)} matrix ({exc}); falling back to the "
                      "eigendecomposition of A A^T in float64.", RuntimeWarning, stacklevel=2)
    A64 = A.to(torch.float64)
    k = min(A64.shape)
    e, V = _safe_eigh(A64 @ A64.T)
    e, V = torch.flip(e, dims=(0,))[:k].clamp_min(0.0), torch.flip(V, dims=(1,))[:, :k]
    return V.to(A.dtype), torch.sqrt(e).to(A.dtype)


def _projected_left_singular(memory: Memory, C: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors U [d_in, m] and singular values s [m] (descending) of ``Q C``.

    basis form: SVD of ``C - M (M^T C)``; complement form: SVD of ``P^T C`` [k, d_in] and ``U = P U_k``
    (cheaper when k is small).
    """
    B = memory.basis.to(dtype=_F64, device=C.device)
    if memory.form == "basis":
        QC = C - B @ (B.T @ C)
        return _safe_left_singular(QC)
    if B.shape[1] == 0:
        return B.new_zeros(memory.d_in, 0), B.new_zeros(0)
    Uk, s = _safe_left_singular(B.T @ C)
    return B @ Uk, s


def _gram_left_singular(memory: Memory, C: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_projected_left_singular` (U [d_in, m], s [m] descending) through a dense eigh of the Gram matrix
    ``(Q C)(Q C)^T`` instead of the SVD of ``Q C``: about 3x cheaper, and exact for every singular value above
    ``sqrt(eps) * s_max`` (~1.5e-8 s_max in float64), which covers every direction the update keeps
    (``rtol = 1e-6``)."""
    B = memory.basis.to(dtype=_F64, device=C.device)
    if memory.form == "complement":
        if B.shape[1] == 0:
            return B.new_zeros(memory.d_in, 0), B.new_zeros(0)
        A = B.T @ C  # [k, d_in]: Q C = P (P^T C)
    else:
        A = C - B @ (B.T @ C)
    G = A @ A.T
    e, V = _safe_eigh(0.5 * (G + G.T))
    e, V = torch.flip(e, dims=(0,)).clamp_min(0.0), torch.flip(V, dims=(1,))
    if memory.form == "complement":
        V = B @ V
    return V, torch.sqrt(e)


def _projected_eigh(memory: Memory, C: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors V [d_in, m] and eigenvalues e [m] (descending, clipped at 0) of ``Q C Q`` (C symmetric)."""
    B = memory.basis.to(dtype=_F64, device=C.device)
    if memory.form == "basis":
        QC = C - B @ (B.T @ C)
        QCQ = QC - (QC @ B) @ B.T
        QCQ = 0.5 * (QCQ + QCQ.T)
        e, V = _safe_eigh(QCQ)
    else:
        if B.shape[1] == 0:
            return B.new_zeros(memory.d_in, 0), B.new_zeros(0)
        small = B.T @ C @ B
        small = 0.5 * (small + small.T)
        e, Vk = _safe_eigh(small)
        V = B @ Vk
    e = torch.flip(e, dims=(0,)).clamp_min(0.0)
    V = torch.flip(V, dims=(1,))
    return V, e


def _energy_totals(memory: Memory, C: torch.Tensor, energy: str) -> Tuple[float, float]:
    """``(total, outside) = (trace(S), trace(Q S Q))`` with S = C C^T (squared) or S = C (linear)."""
    B = memory.basis.to(dtype=_F64, device=C.device)
    if energy == "squared":
        total = float((C * C).sum())
        if memory.form == "basis":
            QC = C - B @ (B.T @ C)
            outside = float((QC * QC).sum())
        else:
            PtC = B.T @ C  # ||P P^T C||_F = ||P^T C||_F
            outside = float((PtC * PtC).sum())
    else:
        total = float(torch.diagonal(C).sum())
        if memory.form == "basis":
            outside = total - float(torch.diagonal(B.T @ C @ B).sum())  # tr(QCQ) = tr(C) - tr(M^T C M)
        else:
            outside = float(torch.diagonal(B.T @ C @ B).sum())
    return total, outside
