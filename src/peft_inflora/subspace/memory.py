r"""The memory of one layer: an orthonormal basis of the input subspace old tasks occupy, or of its complement.

``M`` [d_in, k] spans the memory, ``P`` [d_in, d_in - k] its orthogonal complement, ``Q = I - M M^T = P P^T`` the
projector onto the free space. GPM stores ``M``; DualGPM stores ``M`` while ``dim <= d_in / 2`` and ``P`` once
``dim > d_in / 2`` (:func:`_store`). Both describe the same ``Q``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .checks import MEMORY_FORMS, _as_int, _check_rtol


_F64 = torch.float64


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


def _check_memory(memory) -> Memory:
    if not isinstance(memory, Memory):
        raise ValueError(
            f"memory must be a peft_inflora.subspace.Memory, got {type(memory).__name__}; "
            "use Memory.empty(d_in) before the first task"
        )
    return memory


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
