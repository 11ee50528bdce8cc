r"""Subspace math of InfLoRA (Liang & Li, CVPR 2024): design of B_t and the GPM/DualGPM memory.

Pure tensor math on one adapted linear layer with ``d_in``-dimensional inputs. Everything is
computed in float64 whatever the input dtype; results are float64.

Notation (shapes in brackets)
-----------------------------
``C``  [d_in, d_in]  input covariance of the current task, ``C = (1/N) sum_n x_n x_n^T``.
``M``  [d_in, k]     orthonormal basis of the *memory*: the input subspace old tasks occupy.
``P``  [d_in, k]     orthonormal basis of the orthogonal complement of the memory (DualGPM form).
``Q``  [d_in, d_in]  projector onto the free space, ``Q = I - M M^T = P P^T``.

Design (before task t trains), rows of ``B_t`` [r, d_in]:

* eigen design (the ViT paper): the top-r left singular vectors of ``Q C`` (equivalently the
  top-r eigenvectors of ``Q C^2 Q``; note: *C squared*, not ``Q C Q``), times ``1/sqrt(3)``;
* random design (the LM follow-up): Gaussian rows projected by ``Q``, normalised, times ``1/sqrt(3)``.

Every row of ``B_t`` lies in ``span(Q)``, so ``B_t x ~ 0`` for inputs x of old tasks.

Memory update (after task t trains), with energy threshold
``eps_t = lamb + (1 - lamb) t / T`` (t 0-based):

* ``S = C C^T`` ("squared" energy, the authors' convention: C plays the data matrix, energies are
  squared singular values of C) or ``S = C`` ("linear": energies are eigenvalues of C);
* ``total = trace(S)``; energy outside the memory ``trace(Q S Q)``; ``captured = total - trace(Q S Q)``;
* candidate directions ``u_i`` and energies ``e_i``: eigen-decomposition of ``Q S Q``, descending;
* first task (empty memory): keep ``k = #{i : sum_{l<=i} e_l / total < eps}``, at least 1;
* later tasks: nothing if ``captured / total >= eps``, else the smallest ``j`` with
  ``(captured + e_1 + ... + e_j) / total >= eps``;
* ``eps >= 1``: keep every non-negligible direction.

A direction is *non-negligible* when its singular value in the data matrix, ``sqrt(e_i)``, exceeds
``rtol`` times the largest singular value of the data matrix, i.e. ``e_i > rtol^2 * lambda_max(S)``.
For the squared energy this is exactly the rule of :func:`design_eigen`
(``sigma_i(Q C) > rtol * sigma_max(C)``).

GPM stores ``M``; DualGPM stores ``M`` while ``dim <= d_in / 2`` and ``P`` once ``dim > d_in / 2``.
Both describe the same ``Q``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .sketch import LowRankCovariance, SketchWarning

__all__ = [
    "MEMORY_FORMS",
    "MEMORY_KINDS",
    "ENERGIES",
    "Memory",
    "energy_threshold",
    "design_eigen",
    "design_random",
    "update_memory",
    "principal_angle_cosines",
    "captured_energy_ratio",
    "SOLVERS",
    "resolve_solver",
]

MEMORY_FORMS = ("basis", "complement")
MEMORY_KINDS = ("gpm", "dualgpm")
ENERGIES = ("squared", "linear")

_F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Memory:
    r"""Orthonormal description of the input subspace old tasks occupy in one layer (d_in-dim inputs).

    ``form == "basis"``:      columns of ``basis`` [d_in, k] span the memory M;  ``Q = I - M M^T``.
    ``form == "complement"``: columns of ``basis`` [d_in, k] span its orthogonal complement P;
    ``Q = P P^T``.

    The columns are assumed orthonormal (not checked: it would cost a d_in x k Gram matrix).
    ``Q`` is the projector onto the *free* space, the part of R^{d_in} no old task occupies.
    Equality is identity (``eq=False``): tensors have no single truth value.
    """

    basis: torch.Tensor
    form: str = "basis"

    def __post_init__(self) -> None:
        if not isinstance(self.basis, torch.Tensor):
            raise ValueError(
                f"Memory.basis must be a torch.Tensor of shape (d_in, k), got {type(self.basis).__name__}"
            )
        if self.form not in MEMORY_FORMS:
            raise ValueError(f"Memory.form must be one of {MEMORY_FORMS}, got {self.form!r}")
        if self.basis.ndim != 2:
            raise ValueError(
                f"Memory.basis must be 2-D (d_in, k) with orthonormal columns, got shape {tuple(self.basis.shape)}"
            )
        if not self.basis.is_floating_point():
            raise ValueError(f"Memory.basis must be a floating-point tensor, got dtype {self.basis.dtype}")
        d_in, k = self.basis.shape
        if d_in < 1:
            raise ValueError(f"Memory.basis must have d_in >= 1 rows, got shape {tuple(self.basis.shape)}")
        if k > d_in:
            raise ValueError(
                f"Memory.basis has {k} columns but only {d_in} rows: at most d_in orthonormal columns exist"
            )

    @classmethod
    def empty(cls, d_in: int, dtype: torch.dtype = _F64, device: Optional[torch.device] = None) -> "Memory":
        """Memory of a layer before the first task: ``M`` of shape (d_in, 0), ``Q = I``."""
        d_in = _as_int(d_in, "d_in", minimum=1)
        return cls(torch.zeros(d_in, 0, dtype=dtype, device=device), "basis")

    @property
    def d_in(self) -> int:
        """Input dimension of the layer (rows of ``basis``)."""
        return int(self.basis.shape[0])

    @property
    def dimension(self) -> int:
        """``dim span(memory)``: k for form "basis", ``d_in - k`` for form "complement"."""
        k = int(self.basis.shape[1])
        return k if self.form == "basis" else self.d_in - k

    @property
    def free_dimension(self) -> int:
        """``d_in - dimension = rank(Q)``: how many input directions new tasks may still use."""
        return self.d_in - self.dimension

    def project(self, X: torch.Tensor) -> torch.Tensor:
        r"""``Q X`` for X of shape (d_in, n) or (d_in,), in float64, same shape as X.

        basis form: ``Q X = X - M (M^T X)``; complement form: ``Q X = P (P^T X)``.
        Costs O(d_in k n); the d_in x d_in projector is never formed.
        """
        if not isinstance(X, torch.Tensor):
            raise ValueError(f"project expects a torch.Tensor, got {type(X).__name__}")
        if X.ndim not in (1, 2) or X.shape[0] != self.d_in:
            raise ValueError(
                f"project expects X of shape ({self.d_in},) or ({self.d_in}, n), got {tuple(X.shape)}"
            )
        X64 = X.to(dtype=_F64)
        B = self.basis.to(dtype=_F64, device=X64.device)
        if self.form == "basis":
            return X64 - B @ (B.T @ X64)
        return B @ (B.T @ X64)

    def projector(self) -> torch.Tensor:
        r"""The projector ``Q`` [d_in, d_in], float64: ``I - M M^T`` (basis) or ``P P^T`` (complement)."""
        B = self.basis.to(dtype=_F64)
        if self.form == "basis":
            return torch.eye(self.d_in, dtype=_F64, device=B.device) - B @ B.T
        return B @ B.T

    def to(self, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> "Memory":
        """A copy with ``basis`` converted (same form)."""
        return Memory(self.basis.to(dtype=dtype, device=device), self.form)

    def __repr__(self) -> str:
        return (
            f"Memory(form={self.form!r}, d_in={self.d_in}, dimension={self.dimension}, "
            f"stored_columns={int(self.basis.shape[1])}, dtype={self.basis.dtype})"
        )


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
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


def _check_memory(memory) -> Memory:
    if not isinstance(memory, Memory):
        raise ValueError(
            f"memory must be a peft_inflora.subspace.Memory, got {type(memory).__name__}; "
            "use Memory.empty(d_in) before the first task"
        )
    return memory


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


# --------------------------------------------------------------------------------------------
# Linear-algebra helpers (float64)
# --------------------------------------------------------------------------------------------
def _complement_basis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [n, n - m] of the orthogonal complement of span(A), A [n, m] orthonormal columns."""
    n, m = A.shape
    if m == 0:
        return torch.eye(n, dtype=A.dtype, device=A.device)
    if m >= n:
        return A.new_zeros(n, 0)
    Qf, _ = torch.linalg.qr(A, mode="complete")
    return Qf[:, m:].contiguous()


def _orthonormalise(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(A) for A [n, m] of full column rank (thin QR)."""
    if A.shape[1] == 0:
        return A
    Qr, _ = torch.linalg.qr(A, mode="reduced")
    return Qr


def _reorthonormalise(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning span(A) that stay close to A's columns when A is nearly orthonormal.

    Thin QR with the signs fixed so that diag(R) > 0: for A with orthonormal columns up to round-off
    (e.g. a basis stored in float32) this only removes the round-off.
    """
    if A.shape[1] == 0:
        return A
    Qr, R = torch.linalg.qr(A, mode="reduced")
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    return Qr * signs


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


def _zero_energy_error(total: float) -> ValueError:
    return ValueError(
        f"covariance has no energy (trace of S = {total:g}): no inputs were recorded for this layer, "
        "or the statistics are all zeros; collect the statistics over the task's data before "
        "updating the memory"
    )


def _sign_fix_rows(B: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-|.| entry is positive (first such entry on ties)."""
    if B.shape[0] == 0:
        return B
    idx = B.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(torch.gather(B, 1, idx))
    signs[signs == 0] = 1.0
    return B * signs


# --------------------------------------------------------------------------------------------
# Sketched statistics (peft_inflora.sketch): design and memory candidates from C_hat = V diag(lambda) V^T
# --------------------------------------------------------------------------------------------
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


def _low_rank_candidates(mem: Memory, cov: LowRankCovariance, energy: str, threshold: float, total: float,
                         captured: float) -> Tuple[Tuple[torch.Tensor, torch.Tensor], float]:
    """Candidate directions ``(U, e)`` of the memory update from a sketched covariance (``e = s^2`` of
    :meth:`LowRankCovariance.projected`) and ``sigma_max`` of the data matrix (``lambda_1`` for squared energy,
    ``sqrt(lambda_1)`` for linear).

    Warns (:class:`~peft_inflora.sketch.SketchWarning`) when the candidates come from the sketch (no memory, or one
    stored as a basis: in form "complement" they are exact), the sketch is not exact and the threshold rule needs more
    than half of its m directions (``#{j : (captured + e_1 + ... + e_j) / total < threshold} > m / 2``; the lower half
    of a Frequent Directions sketch carries its shrinkage and is inaccurate), or a threshold of 1 asks for every
    direction while the sketch missed some energy."""
    U, s = cov.projected(mem, energy)
    e = s * s
    lam_max = cov.largest_eigenvalue
    smax = lam_max if energy == "squared" else math.sqrt(max(lam_max, 0.0))
    m = int(cov.basis.shape[1])
    if not cov.exact and cov.memory_form != "complement":
        needed = m if threshold >= 1.0 else int(((captured + torch.cumsum(e, dim=0)) / total < threshold).sum())
        if 2 * needed > m:
            warnings.warn(
                f"The memory update needs about {needed} of the {m} directions of the statistics sketch to reach the "
                f"energy threshold {threshold:.4f}, but only the leading half of a Frequent Directions sketch is "
                "accurate: the memory may keep less of this layer's input energy than the threshold asks. Raise "
                f"`statistics_sketch` (to at least {4 * needed}), or set it to None for the exact covariance.",
                SketchWarning,
                stacklevel=3,
            )
    return (U, e), smax


# --------------------------------------------------------------------------------------------
# Solvers of the top eigenproblems: exact (dense LAPACK) or randomized (block subspace iteration)
# --------------------------------------------------------------------------------------------
SOLVERS = ("auto", "exact", "randomized")

AUTO_EXACT_MAX_DIM = 1024
"""``solver="auto"`` uses the exact solver up to this many input features, the randomized one above: at
d_in <= 1024 a dense decomposition takes well under a second (and is exact); at d_in = 4096 it takes tens of
seconds per layer on a CPU core, the randomized solver about a second."""

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


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def memory_capacity(d_in: int, rank: int, tasks_left: int) -> int:
    r"""Largest memory dimension that still leaves room for the remaining tasks (``adaptive_threshold``).

    After a task, with ``tasks_left`` tasks still to learn at rank ``r`` each in a layer of ``d_in`` input
    features, the memory may span at most ``d_in - r * tasks_left`` dimensions: every later task then finds ``r``
    free directions for its ``B_t`` even if each of them adds ``r`` directions to the memory in turn (a task's own
    branch directions are what its memory update usually keeps). Never negative.
    """
    return max(int(d_in) - int(rank) * max(int(tasks_left), 0), 0)


def energy_threshold(lamb: float, task_index: int, total_tasks: Optional[int] = None) -> float:
    r"""Energy threshold of task ``t`` (0-based): ``eps_t = lamb + (1 - lamb) * t / T``.

    With ``total_tasks`` (T) unknown (None) returns ``lamb``. The paper uses lamb = 0.95 (CIFAR-100,
    DomainNet) and 0.98 (ImageNet-R); eps rises linearly towards 1 over the sequence.

    Raises ValueError when lamb is not in (0, 1], task_index < 0, total_tasks < 1 or
    task_index >= total_tasks.
    """
    lamb = float(lamb)
    if not (0.0 < lamb <= 1.0):
        raise ValueError(f"lamb must be in (0, 1], got {lamb}; the paper uses 0.95 or 0.98")
    t = _as_int(task_index, "task_index")
    if t < 0:
        raise ValueError(f"task_index must be >= 0 (0-based: the first task is 0), got {t}")
    if total_tasks is None:
        return lamb
    T = _as_int(total_tasks, "total_tasks")
    if T < 1:
        raise ValueError(f"total_tasks must be >= 1, got {T}")
    if t >= T:
        raise ValueError(
            f"task_index {t} >= total_tasks {T}: task indices are 0-based, so the last task is {T - 1}; "
            "raise total_tasks or pass total_tasks=None to use eps = lamb"
        )
    return lamb + (1.0 - lamb) * t / T


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

    ``covariance`` may also be a :class:`~peft_inflora.sketch.LowRankCovariance` (``statistics_sketch``):
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
    smax = _sigma_max(C)
    U, s = _projected_left_singular(memory, C)
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


def update_memory(
    memory: Memory,
    covariance: torch.Tensor,
    threshold: float,
    kind: str = "dualgpm",
    energy: str = "squared",
    rtol: float = 1e-6,
    solver: str = "auto",
    generator: Optional[torch.Generator] = None,
    max_dimension: Optional[int] = None,
) -> Memory:
    r"""GPM / DualGPM memory update after a task; returns a new float64 Memory (the input is not modified).

    ``covariance`` C [d_in, d_in] of the task's inputs (recomputed with the trained branch active).
    ``S = C C^T`` (energy "squared": energies are squared singular values of C, the authors' choice that
    the published thresholds were tuned with) or ``S = C`` (energy "linear", classic GPM on the
    representation). ``total = trace(S)``, ``captured = total - trace(Q S Q)``.
    Candidate directions u_i [d_in] with energies e_i: eigen-decomposition of ``Q S Q``, descending
    (for "squared" computed as the SVD of ``Q C``, e_i = s_i^2). Non-negligible: ``e_i > rtol^2 lambda_max(S)``
    (for "squared" the same as ``s_i > rtol sigma_max(C)`` in :func:`design_eigen`).

    * empty memory (dimension 0): add ``k = #{i : cumsum(e)_i / total < threshold}`` leading directions,
      at least 1 (the authors' rule; it ends just below the threshold);
    * otherwise: unchanged if ``captured / total >= threshold``, else add the smallest j leading
      directions with ``(captured + e_1 + ... + e_j) / total >= threshold``;
    * ``threshold == 1``: add every non-negligible direction;
    * never more directions than are non-negligible;
    * ``max_dimension`` (capacity planning, ``adaptive_threshold``): never more than ``max_dimension`` in total,
      i.e. at most ``max(max_dimension - dim M, 0)`` new directions, the leading ones (the memory then keeps less
      than ``threshold`` of the energy: :func:`captured_energy_ratio` gives how much).

    Storage (``kind``): "gpm" always returns form "basis" with ``M_new = [M, U_j]``; "dualgpm" returns form
    "basis" while the new dimension is <= d_in / 2 and form "complement" (P_new [d_in, d_in - dim]) once
    it exceeds d_in / 2 (also when the first task already does). Shrinking P: with ``c = P^T U_j`` [k, j],
    ``P_new = P N`` where N is an orthonormal basis of the complement of span(c) in R^k. Both kinds give
    the same projector ``Q``. The input basis is re-orthonormalised in float64 first (thin QR, columns kept
    close to the originals), so a memory stored in float32 does not drift over many updates.
    The result lives on the covariance's device.

    ``solver``: "exact" (dense SVD / eigh of the projected covariance), "randomized" or "auto" (exact up to
    ``AUTO_EXACT_MAX_DIM`` input features). The randomized solver finds the leading directions only, in
    blocks (block subspace iteration with Rayleigh-Ritz, each block deflated by the ones before, the first
    of ``RANDOMIZED_FIRST_BLOCK`` directions) until the rule above is decided; energies, totals and the
    selection are as above, the energies being the Ritz values (the exact energies of the directions found).
    When the threshold needs more than ``RANDOMIZED_MAX_FRACTION`` of the free dimensions (a flat spectrum),
    which the energies found predict early, it falls back to one dense eigh of the Gram matrix ``(Q C)(Q C)^T``
    (squared energy) or of ``Q C Q`` (linear).

    ``covariance`` may also be a :class:`~peft_inflora.sketch.LowRankCovariance` (``statistics_sketch``):
    candidates and energies are those of ``C_hat = V diag(lambda) V^T`` (left singular vectors of the d_in x m
    matrix ``Q V diag(lambda)``, resp. ``Q V diag(sqrt(lambda))`` for linear energy; ``solver`` is not used), and
    the energy the sketch could not keep is counted as energy outside the memory that no candidate holds
    (:meth:`~peft_inflora.sketch.LowRankCovariance.energy_totals`: ``total = ||C_hat||_F^2 + t_res^2 / (d_in - m)``
    for squared energy, the exact ``tr(C)`` for linear; see :mod:`peft_inflora.sketch` for how these errors affect
    the threshold). When the rule needs more than half of the sketch's directions (its inaccurate lower half) a
    :class:`~peft_inflora.sketch.SketchWarning` says to raise ``statistics_sketch``. Data of rank <= ell: the same
    memory as the exact covariance.

    Raises ValueError for a non-square covariance or one that does not match ``memory.d_in``, NaN/inf
    statistics, zero covariance, threshold outside (0, 1], unknown kind, energy or solver.
    """
    memory = _check_memory(memory)
    threshold = _check_threshold(threshold)
    if kind not in MEMORY_KINDS:
        raise ValueError(
            f"unknown kind {kind!r}: use 'gpm' (store the memory basis M) or 'dualgpm' (store the "
            "complement once the memory fills more than half of the input space)"
        )
    energy = _check_energy(energy)
    rtol = _check_rtol(rtol)
    solver = resolve_solver(solver, memory.d_in)
    low_rank = isinstance(covariance, LowRankCovariance)
    C = covariance.checked(memory.d_in) if low_rank else _check_covariance(covariance, memory)
    mem = memory.to(dtype=_F64, device=C.device)
    # a basis stored in low precision is orthonormal only up to its round-off: clean it in float64 first
    mem = Memory(_reorthonormalise(mem.basis), mem.form)

    if low_rank:
        total, outside, _ = C.energy_totals(mem, energy)
    else:
        total, outside = _energy_totals(mem, C, energy)
    if not total > 0.0:
        raise _zero_energy_error(total)
    captured = total - outside

    if mem.dimension > 0 and captured / total >= threshold:
        return _store(mem, mem.basis.new_zeros(mem.d_in, 0), kind)

    candidates = None
    if low_rank:
        candidates, smax = _low_rank_candidates(mem, C, energy, threshold, total, captured)
    elif solver == "randomized":
        generator = _default_generator(generator)
        lam_max = _largest_eigenvalue(C, generator)
        smax = lam_max if energy == "squared" else math.sqrt(max(lam_max, 0.0))
        negligible = (rtol * smax) ** 2  # on energies: squared singular values (squared) or eigenvalues (linear)
        need = math.inf if threshold >= 1.0 else threshold * total - captured
        candidates = _randomized_candidates(mem, C, energy, need, outside, negligible, generator)
        if candidates is None and energy == "squared":
            # too many directions for the randomized solver: one dense eigh of the Gram matrix (Q C)(Q C)^T,
            # about 3x cheaper than the SVD of Q C and exact for every singular value above sqrt(eps) * s_max
            candidates = _gram_left_singular(mem, C)
            candidates = (candidates[0], candidates[1] ** 2)
    if candidates is not None:
        U, e = candidates
        data_sv = torch.sqrt(e)
    elif energy == "squared":
        U, s = _projected_left_singular(mem, C)
        e = s * s
        data_sv = s
        smax = _sigma_max(C)
    else:
        Csym = 0.5 * (C + C.T)
        U, e = _projected_eigh(mem, Csym)
        data_sv = torch.sqrt(e)
        lam_max = float(_safe_eigh(Csym, eigenvectors=False)[-1])
        smax = math.sqrt(lam_max) if lam_max > 0 else 0.0
    n_nonneg = int((data_sv > rtol * smax).sum()) if smax > 0 else 0
    n_nonneg = min(n_nonneg, mem.free_dimension)
    if n_nonneg == 0:
        return _store(mem, mem.basis.new_zeros(mem.d_in, 0), kind)

    if threshold >= 1.0:
        j = n_nonneg
    elif mem.dimension == 0:
        ratios = torch.cumsum(e, dim=0) / total
        j = max(int((ratios < threshold).sum()), 1)
    else:
        ratios = (captured + torch.cumsum(e, dim=0)) / total
        reached = torch.nonzero(ratios >= threshold)
        j = int(reached[0, 0]) + 1 if reached.numel() > 0 else n_nonneg
    j = min(j, n_nonneg)
    if max_dimension is not None:
        j = min(j, max(int(max_dimension) - mem.dimension, 0))
    return _store(mem, U[:, :j], kind)


def _store(mem: Memory, U: torch.Tensor, kind: str) -> Memory:
    """Memory spanning span(mem) + span(U) (U [d_in, j] orthonormal, in the free space), stored per kind."""
    d_in = mem.d_in
    if U.shape[1] > 0:
        # U lies in span(Q) up to round-off: project again and re-orthonormalise so the stored
        # columns are orthonormal to machine precision.
        U = _orthonormalise(mem.project(U))
    new_dim = mem.dimension + int(U.shape[1])
    complement = kind == "dualgpm" and 2 * new_dim > d_in
    if not complement:
        M_old = mem.basis if mem.form == "basis" else _complement_basis(mem.basis)
        return Memory(torch.cat([M_old, U], dim=1).contiguous(), "basis")
    if mem.form == "complement":
        P = mem.basis
        if U.shape[1] == 0:
            return Memory(P.clone(), "complement")
        c = P.T @ U  # [k, j], orthonormal columns: U lies in span(P)
        N = _complement_basis(_orthonormalise(c))
        return Memory((P @ N).contiguous(), "complement")
    return Memory(_complement_basis(torch.cat([mem.basis, U], dim=1)), "complement")


def principal_angle_cosines(U: torch.Tensor, V: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    r"""Cosines of the principal angles between the column spaces of U [d, a] and V [d, b], descending.

    Each input is orthonormalised first (thin SVD; columns whose singular value is <= rtol * the
    largest are dropped as rank deficiency), giving Q_U [d, a'] and Q_V [d, b']. The cosines are the
    singular values of ``Q_U^T Q_V``, clipped to [0, 1]: ``min(a', b')`` values, float64.
    1 = a shared direction, 0 = orthogonal. 1-D inputs are treated as one column.
    """
    def _orth(A: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(A, torch.Tensor) or A.ndim not in (1, 2):
            raise ValueError(f"{name} must be a tensor of shape (d, n) or (d,), got {getattr(A, 'shape', A)!r}")
        A = A.detach().to(dtype=_F64)
        if A.ndim == 1:
            A = A[:, None]
        if not bool(torch.isfinite(A).all()):
            raise ValueError(f"{name} contains NaN or inf")
        if A.shape[1] == 0:
            return A
        W, s, _ = torch.linalg.svd(A, full_matrices=False)
        if s.numel() == 0 or float(s[0]) == 0.0:
            return A.new_zeros(A.shape[0], 0)
        return W[:, s > rtol * s[0]]

    rtol = _check_rtol(rtol)
    QU, QV = _orth(U, "U"), _orth(V, "V")
    if QU.shape[0] != QV.shape[0]:
        raise ValueError(f"U and V must have the same number of rows (d), got {QU.shape[0]} and {QV.shape[0]}")
    if QU.shape[1] == 0 or QV.shape[1] == 0:
        return QU.new_zeros(0)
    cos = torch.linalg.svdvals(QU.T @ QV.to(QU.device))
    return cos.clamp(0.0, 1.0)


def captured_energy_ratio(memory: Memory, covariance: torch.Tensor, energy: str = "squared") -> float:
    r"""Fraction of the task's input energy inside the memory: ``(trace(S) - trace(Q S Q)) / trace(S)``.

    S = C C^T ("squared") or S = C ("linear"), C [d_in, d_in]. 0 with an empty memory, 1 when the
    memory spans every direction the task uses. This is the quantity :func:`update_memory` compares
    with the energy threshold. Raises ValueError for a zero covariance (no energy to measure).
    """
    memory = _check_memory(memory)
    energy = _check_energy(energy)
    C = _check_covariance(covariance, memory)
    if energy == "linear":
        C = 0.5 * (C + C.T)
    total, outside = _energy_totals(memory, C, energy)
    if not total > 0.0:
        raise _zero_energy_error(total)
    return (total - outside) / total
