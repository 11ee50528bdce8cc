r"""The covariances the design and the memory update read: exact, or known through a sketch.

* :class:`CovarianceAccumulator`: the running exact ``S = sum_n x_n x_n^T`` [d, d] of an input group's tokens, and
  ``C = S / N``;
* :class:`LowRankCovariance`: ``C`` known through a Frequent Directions sketch of one side and exact products with the
  other (what :class:`~peft_inflora.subspace.SketchAccumulator` gives; see :mod:`peft_inflora.subspace.sketch`
  for its accuracy). :func:`~peft_inflora.subspace.design_eigen` and :func:`~peft_inflora.subspace.update_memory`
  accept it in place of the dense ``C``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..distributed import world_size


_F64 = torch.float64


@dataclass
class CovarianceAccumulator:
    """Running ``S = sum_n x_n x_n^T`` (``d x d``) and token count ``N``; ``covariance() = S / N``."""

    dim: int
    dtype: torch.dtype = torch.float64
    device: Optional[torch.device] = None
    sum: torch.Tensor = field(init=False)
    count: torch.Tensor = field(init=False)
    local_count: int = field(init=False, default=0)  # tokens added by this process (no device sync to read)

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)

    def update(self, tokens: torch.Tensor) -> None:
        """Add the rows of ``tokens`` (``n x d``): one GEMM ``S += X^T X``."""
        if tokens.shape[0] == 0:
            return
        x = tokens.detach().to(device=self.sum.device, dtype=self.dtype)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]
        self.local_count += int(x.shape[0])

    def all_reduce(self) -> None:
        """Sum ``S`` and ``N`` over all processes of the default group (no-op without torch.distributed)."""
        if world_size() > 1:
            torch.distributed.all_reduce(self.sum)
            torch.distributed.all_reduce(self.count)

    def covariance(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.sum).all())

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (the ``d x d`` sum)."""
        return self.sum.numel() * self.sum.element_size()


@dataclass(eq=False)
class LowRankCovariance:
    r"""A covariance ``C`` [d, d] known through a sketch of one side and exact products with the other.

    ``exact_basis`` E [d, e] (orthonormal, possibly e = 0) spans the side kept exactly, ``P = I - E E^T`` the other::

        C = P C P  +  (P H) E^T  +  E (P H)^T  +  E (E^T H) E^T,      H = C E  [d, e] (exact)
        P C P ~ C_hat = V diag(lambda) V^T                              (sketched, V [d, m] orthonormal, V ⊥ E)

    With a memory at hand (``memory_form``), E is the memory's stored basis: the memory M (form "basis") or its
    complement, the free space, (form "complement"); with an empty memory e = 0 and ``C ~ C_hat``.

    Attributes:
        basis: ``V`` [d, m], float64. values: ``lambda`` [m], descending, >= 0: compensated eigenvalues of the sketched
            block per token, ``(sigma_i^2 + Delta) / N``.
        trace: the exact ``tr(C) = (1/N) sum_n ||x_n||^2``.
        shrinkage: ``delta = Delta / N``: for unit x in the sketched side, ``-delta <= x^T (P C P - C_hat) x <=
            delta``, and ``x^T C x <= delta`` for unit x orthogonal to span(V) and span(E).
        count: ``N``, the number of tokens.
        exact_basis: ``E`` [d, e] (None: e = 0). exact_product: ``H = C E`` [d, e] (None: e = 0).
        memory_form: the form of the memory E came from ("basis" or "complement"; None when e = 0).

    ``residual_trace`` = ``max(tr(P C P) - sum lambda, 0)``: energy in sketched-side directions the sketch could not
    keep. Equality is identity (tensors have no single truth value).
    """

    basis: torch.Tensor
    values: torch.Tensor
    trace: float
    shrinkage: float
    count: float
    exact_basis: Optional[torch.Tensor] = None
    exact_product: Optional[torch.Tensor] = None
    memory_form: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.basis, torch.Tensor) or self.basis.ndim != 2:
            raise ValueError(f"LowRankCovariance.basis must be a tensor of shape (d, m), got "
                             f"{getattr(self.basis, 'shape', self.basis)!r}")
        if not isinstance(self.values, torch.Tensor) or self.values.shape != (self.basis.shape[1],):
            raise ValueError(f"LowRankCovariance.values must be a tensor of shape ({self.basis.shape[1]},), got "
                             f"{getattr(self.values, 'shape', self.values)!r}")
        if (self.exact_basis is None) != (self.exact_product is None):
            raise ValueError("LowRankCovariance: give both exact_basis E and exact_product H = C E, or neither")
        if self.exact_basis is not None:
            if self.exact_basis.shape[0] != self.dim or self.exact_product.shape != self.exact_basis.shape:
                raise ValueError(f"LowRankCovariance: exact_basis and exact_product must both be ({self.dim}, e), got "
                                 f"{tuple(self.exact_basis.shape)} and {tuple(self.exact_product.shape)}")
            if self.memory_form not in ("basis", "complement"):
                raise ValueError(f"LowRankCovariance.memory_form must be 'basis' or 'complement' with an exact_basis, "
                                 f"got {self.memory_form!r}")

    @property
    def dim(self) -> int:
        """``d``: the input width."""
        return int(self.basis.shape[0])

    @property
    def device(self) -> torch.device:
        return self.basis.device

    @property
    def exact_dim(self) -> int:
        """``e``: columns of the exactly kept side (0 without one)."""
        return 0 if self.exact_basis is None else int(self.exact_basis.shape[1])

    def _exact_blocks(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(P H [d, e], E^T H [e, e])`` (empty without an exact side)."""
        if self.exact_basis is None:
            empty = self.basis.new_zeros(self.dim, 0)
            return empty, self.basis.new_zeros(0, 0)
        E, H = self.exact_basis, self.exact_product
        EtH = E.T @ H
        return H - E @ EtH, 0.5 * (EtH + EtH.T)

    @property
    def residual_trace(self) -> float:
        """``t_res = max(tr(C) - tr(E^T C E) - sum_i lambda_i, 0)``: the sketched side's energy the sketch lost."""
        exact = float(torch.diagonal(self._exact_blocks()[1]).sum()) if self.exact_dim else 0.0
        return max(float(self.trace) - exact - float(self.values.sum()), 0.0)

    @property
    def exact(self) -> bool:
        """True when the sketch shrank nothing away (``delta <= 1e-10 lambda_1``, e.g. data of rank <= ell): then
        ``C_hat = P C P`` and the whole covariance is exact up to float error."""
        return float(self.shrinkage) <= 1e-10 * self.largest_eigenvalue

    @property
    def largest_eigenvalue(self) -> float:
        """``max(lambda_1, lambda_max(E^T C E))``, within a factor 2 of ``sigma_max(C)`` (used only for the
        negligibility cut-off ``rtol * sigma_max``); 0 for an empty covariance."""
        top = float(self.values.max()) if self.values.numel() else 0.0
        if self.exact_dim:
            top = max(top, float(torch.linalg.eigvalsh(self._exact_blocks()[1])[-1]))
        return top

    def dense(self) -> torch.Tensor:
        """The covariance as a [d, d] float64 matrix (for tests and inspection: this is what the sketch avoids)."""
        V = self.basis.to(_F64)
        C = (V * self.values.to(_F64)) @ V.T
        if self.exact_dim:
            E = self.exact_basis.to(_F64)
            PH, EtH = self._exact_blocks()
            C = C + PH @ E.T + E @ PH.T + E @ EtH @ E.T
        return C

    def checked(self, d_in: int) -> "LowRankCovariance":
        """Validated against a layer of width ``d_in`` and converted to float64: raises ``ValueError`` for another
        width or non-finite values (the same wording as the dense checks of :mod:`peft_inflora.subspace`)."""
        if self.dim != d_in:
            raise ValueError(
                f"covariance is a sketch of width {self.dim} but memory.d_in is {d_in}: pass the statistics of this "
                "layer's inputs together with this layer's memory"
            )
        device = self.basis.device
        tensors = [t.detach().to(device=device, dtype=_F64) if t is not None else None
                   for t in (self.basis, self.values, self.exact_basis, self.exact_product)]
        scalars = (float(self.trace), float(self.shrinkage))
        finite = all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)
        if not (finite and all(math.isfinite(x) for x in scalars)):
            raise ValueError(
                "statistics contain NaN or inf: the sketched covariance is not finite; recompute the statistics "
                "(check the model's outputs for overflow or NaN)"
            )
        V, lam, E, H = tensors
        return LowRankCovariance(V, lam.clamp_min(0.0), scalars[0], max(scalars[1], 0.0), float(self.count), E, H,
                                 self.memory_form)

    def _check_memory(self, memory) -> None:
        """The memory the design / update runs with must be the one the statistics were split by."""
        if self.exact_dim == 0:
            return
        B = memory.basis.to(device=self.device, dtype=_F64)
        same = memory.form == self.memory_form and tuple(B.shape) == tuple(self.exact_basis.shape)
        if same:
            E = self.exact_basis
            same = float((B - E @ (E.T @ B)).abs().max()) <= 1e-5
        if not same:
            raise ValueError(
                f"these sketched statistics were collected against a memory of form {self.memory_form!r} with "
                f"{self.exact_dim} stored columns, but {memory!r} was given: collect the statistics with the memory "
                "the design / update runs with (InfLoRAModel does)"
            )

    def projected(self, memory, energy: str = "squared") -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Left singular vectors ``U`` [d, m'] and singular values ``s`` (descending) of the free-space operator
        (``s_i^2``: eigenvalues of ``Q C^2 Q`` for ``"squared"``, of ``Q C Q`` for ``"linear"``), ``Q`` the memory's
        free-space projector; ``memory`` a :class:`~peft_inflora.subspace.Memory`. Nothing of size d x d is formed.

        * no exact side: ``C ~ C_hat``; of ``Q V diag(lambda)`` (``Q C_hat = (Q V diag(lambda)) V^T``, and ``V^T`` has
          orthonormal rows), resp. of ``Q V diag(sqrt(lambda))`` (its Gram matrix is ``Q C_hat Q``);
        * memory form "basis" (E = M, ``Q = P``): ``(Q C)(Q C)^T = (P C P)^2 + (P H)(P H)^T`` because ``P E = 0``: of
          the factor ``[V diag(lambda), P H]`` [d, m + e]; linear: ``Q C Q = P C P``, of ``V diag(sqrt(lambda))``;
        * memory form "complement" (E = P_free, ``Q = E E^T``): ``Q C = E H^T`` exactly: ``E`` times the right
          singular vectors of ``H`` [d, e]; linear: ``Q C Q = E (E^T H) E^T``, exact.
        """
        self._check_memory(memory)
        if self.exact_dim == 0:
            weights = self.values if energy == "squared" else torch.sqrt(self.values)
            return _left_singular(memory.project(self.basis) * weights)
        E = self.exact_basis
        PH, EtH = self._exact_blocks()
        if self.memory_form == "basis":
            if energy == "squared":
                return _left_singular(torch.cat([self.basis * self.values, PH], dim=1))
            return _left_singular(self.basis * torch.sqrt(self.values))
        if energy == "squared":
            _, s, Wh = torch.linalg.svd(self.exact_product, full_matrices=False)
            return E @ Wh.T, s
        e, Z = torch.linalg.eigh(EtH)
        e, Z = torch.flip(e, dims=(0,)).clamp_min(0.0), torch.flip(Z, dims=(1,))
        return E @ Z, torch.sqrt(e)

    def energy_totals(self, memory, energy: str = "squared") -> Tuple[float, float, float]:
        r"""``(total, outside, residual)`` for the memory update: the task's energy, the part outside the memory
        (``||Q C||_F^2``, resp. ``tr(Q C Q)``) and the share of both that is estimated, not sketched or exact.

        ``"squared"``: ``||C||_F^2 = ||P C P||_F^2 + 2 ||P H||_F^2 + ||E^T H||_F^2``, the sketched block
        ``||P C P||_F^2 ~ ||C_hat||_F^2 + residual`` with ``residual = t_res^2 / (d - e - m)`` (the least squared
        energy of a trace ``t_res`` spread over the sketched side's missing directions; see the module docstring for
        why not the provable upper bound ``delta t_res``). ``outside``: ``||P C P||_F^2 + ||P H||_F^2`` (memory form
        "basis"; without an exact side ``||Q C_hat||_F^2 + residual``) or ``||H||_F^2`` (form "complement", exact).
        ``"linear"``: ``total = tr(C)`` (exact), ``outside = tr(C) - tr(E^T H)`` (form "basis", exact),
        ``tr(E^T H)`` (form "complement", exact), or ``tr(Q C_hat Q) + t_res`` (no exact side). The residual is
        counted outside the memory and in no candidate direction.
        """
        self._check_memory(memory)
        missing = self.dim - self.exact_dim - int(self.basis.shape[1])
        t_res = self.residual_trace
        if energy == "linear":
            if self.exact_dim == 0:
                A = memory.project(self.basis) * torch.sqrt(self.values)
                return float(self.trace), float((A * A).sum()) + t_res, t_res
            inside = float(torch.diagonal(self._exact_blocks()[1]).sum())  # tr(E^T C E)
            outside = float(self.trace) - inside if self.memory_form == "basis" else inside
            return float(self.trace), outside, 0.0
        residual = t_res ** 2 / missing if missing > 0 else 0.0
        sketched = float((self.values * self.values).sum()) + residual
        if self.exact_dim == 0:
            A = memory.project(self.basis) * self.values
            return sketched, float((A * A).sum()) + residual, residual
        PH, EtH = self._exact_blocks()
        cross, corner = float((PH * PH).sum()), float((EtH * EtH).sum())
        total = sketched + 2.0 * cross + corner
        outside = sketched + cross if self.memory_form == "basis" else cross + corner
        return total, outside, residual


def _left_singular(A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Thin SVD of ``A`` [d, n]: left singular vectors [d, min(d, n)] and singular values, descending."""
    if A.shape[1] == 0:
        return A, A.new_zeros(0)
    try:
        U, s, _ = torch.linalg.svd(A, full_matrices=False)
    except torch.linalg.LinAlgError:  # pragma: no cover - fallback for ill-conditioned inputs
        e, W = torch.linalg.eigh(A.T @ A)
        e, W = torch.flip(e, dims=(0,)).clamp_min(0.0), torch.flip(W, dims=(1,))
        s = torch.sqrt(e)
        U = (A @ W) / s.clamp_min(1e-300)
    return U, s
