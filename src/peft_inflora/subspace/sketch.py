r"""Bounded-memory input statistics: Frequent Directions sketches instead of ``d x d`` covariances.

The exact statistics of an input group are ``C = X^T X / N`` (``X`` [N, d] the group's non-padding input tokens), a
``d x d`` matrix: 128 MiB in float64 at ``d = 4096``, 512 MiB at 8192, for every input group. With
``InfLoRAConfig(statistics_sketch=ell)`` a group wider than ``2 ell`` keeps instead (:class:`SketchAccumulator`)

* a Frequent Directions sketch ``S`` [<= 2 ell, d] (16 MiB in float64 at ``ell = 256, d = 4096``),
* with a non-empty memory, whose stored basis is ``E`` [d, e] (the memory itself in form "basis", its complement in
  form "complement": e <= d / 2 under DualGPM), the exact product ``H = C E`` [d, e]; the sketch then sketches the
  rows projected off E, ``x - E E^T x``,
* the token count ``N``, the exact trace ``tr(C) = (1/N) sum_n ||x_n||^2`` and the total shrinkage ``Delta``,

``(2 ell + 2 e) d`` numbers in all, and the design and the memory update work from them without forming a ``d x d``
matrix (:class:`LowRankCovariance`; :func:`~peft_inflora.subspace.design_eigen` and
:func:`~peft_inflora.subspace.update_memory` accept it in place of ``C``). Data of rank <= ell is sketched exactly, and
then the design and the memory equal the exact mode's up to float error.

Frequent Directions (Liberty 2013; Ghashami, Liberty, Phillips & Woodruff, SIAM J. Comput. 2016)
----------------------------------------------------------------------------------------------
Rows are appended to a buffer of ``2 ell`` rows. When it is full, with the buffer ``B = U diag(s) V^T`` (``s``
descending) and ``delta = s_{ell+1}^2`` (the (ell+1)-th squared singular value; 0 when the buffer holds at most
``ell`` rows), the buffer is replaced by the ``ell`` rows ``sqrt(s_i^2 - delta) v_i^T`` (i <= ell) and
``Delta += delta``. (The original shrinks by the ell-th value; shrinking by the (ell+1)-th keeps ``ell`` directions
instead of ``ell - 1``, so that data of rank <= ell is sketched *exactly*, and only improves the bound.) Guarantees,
for every unit vector ``x`` and every ``k <= ell``::

    0  <=  x^T (X^T X - S^T S) x  <=  Delta  <=  ||X - X_k||_F^2 / (ell + 1 - k)

(``X_k`` the best rank-k approximation of X), and ``||X||_F^2 - ||S||_F^2 >= (ell + 1) Delta``. Proof sketch: each
shrink subtracts ``sum_i min(s_i^2, delta) v_i v_i^T`` (between 0 and ``delta I``) and at least ``(ell + 1) delta``
of squared Frobenius norm; summing over the top-k right singular vectors of X bounds ``(ell + 1 - k) Delta`` by
``||X - X_k||_F^2``. Data of rank <= ell never has a non-zero (ell+1)-th singular value in the buffer (every buffered
row lies in the row space of X), so then ``Delta = 0`` and ``S^T S = X^T X`` up to float error.

The buffer's singular values come from the eigendecomposition of its ``2 ell x 2 ell`` Gram matrix ``B B^T`` (about
8x faster than an SVD of ``B`` on a CPU core at ``ell = 256, d = 4096``, and as accurate for every direction above
``sqrt(eps) s_max``; the rows kept are ``sqrt(1 - delta / s_i^2) u_i^T B``). Rows are buffered in the order they
arrive, so the sketch does not depend on how they are split into batches. Cost per token ``O(ell d)`` (exact:
``O(d^2)``).

Merging (FD is mergeable): the rows of a second sketch are fed into the first and the shrinkages add up; the
guarantee then holds against the concatenation ``[X_1; X_2]`` with ``Delta = Delta_1 + Delta_2 + Delta_merge``. Under
``torch.distributed`` every process sketches its shard, the sketches are all-gathered and merged in rank order, and
rank 0's result is broadcast, so every process holds the identical sketch (:meth:`SketchAccumulator.all_reduce`).

Why the split by the memory
---------------------------
The design of a later task is the top-r left singular vectors of ``Q C`` (``Q`` the free-space projector), and with
``P = I - M M^T``: ``(Q C)(Q C)^T = (P C P)^2 + (P C M)(P C M)^T``. The free-space block ``P C P`` holds little
energy (the memory took the task's leading directions), so a sketch of all of X, whose error ``delta`` is set by the
whole spectrum, cannot see it; and the cross term ``P C M`` usually dominates the design. Keeping ``C M`` exactly and
spending the sketch on the free-space rows only raises the smallest principal-angle cosine of MiniLM's later designs
from 0.41-0.83 to 0.996-0.9999 at ell = 128 (d = 384). In form "complement" (``Q = E E^T``) the design and the
memory's candidate directions are exact (``Q C = E H^T``), and only the energy of the memory block ``M^T C M`` is
sketched.

The sketched block and the energy threshold
-------------------------------------------
After the pass the sketch is compressed to at most ``ell`` rows, ``S = U diag(sigma) V^T``, and the sketched block
(all of C without a memory, ``P C P`` with one) is described by (per token, ``delta = Delta / N``)::

    C_hat = V diag(lambda) V^T,    lambda_i = (sigma_i^2 + Delta) / N        (V [d, m], m <= ell)

the "compensated" sketch (Desai, Ghashami & Phillips, IEEE TKDE 2016): FD takes ``Delta`` off every direction that
stays in the sketch throughout, and adding it back makes the leading eigenvalues nearly exact; ``-delta <= x^T
(C - C_hat) x <= delta`` still holds for unit x (in the sketched block). The lower directions entered the sketch later
and were shrunk less, so there the compensation *overestimates* (up to ``delta``). Without it, every leading
eigenvalue is short by up to ``delta``, which turns the design of later tasks and makes the memory keep too little;
with a per-direction compensation (credits tracked through the shrinks) the energies are nearly unbiased, but the
memory then keeps 0.3-1 % less energy than the threshold asks, because a subspace picked from noisy directions
captures less than it claims. The full compensation errs on the safe side: the memory keeps at least the exact
energy fraction, with more directions than the exact update (numbers in benchmarks/RESULTS.md, "Statistics at LLM
scale").

The trace is exact, so the residual ``t_res = max(tr(P C P) - sum_i lambda_i, 0)`` (energy of sketched-side
directions the sketch lost) is known. For the squared energy (the default) the threshold rule needs ``||C||_F^2``, in
which the residual counts as ``t_res^2 / (d - e - m)``: the least squared energy it can have (its trace spread evenly
over the missing directions). The provable upper bound ``delta t_res`` (``t_res / delta`` directions at the largest
eigenvalue FD allows) is 20x too large on a 1/i spectrum at d = 4096, ell = 256 (``delta`` is 2.5x the true 256th
eigenvalue there) and made the memory keep 5x the exact number of directions. The residual is counted as energy
outside the memory that no candidate direction holds, so every ratio ``(captured + e_1 + ... + e_j) / total`` of the
rule is computed from sketched energies in which the compensation's excess outweighs the residual's shortfall.
Linear energy: ``total = tr(C)``, exact.

The lower half of an FD sketch carries the shrinkage and is inaccurate: when the memory update needs more than half of
the sketch's directions (e.g. a flat spectrum, or a first task whose memory needs many directions), or a threshold of
1 asks for every direction while the sketch lost some energy, a :class:`SketchWarning` says to raise
``statistics_sketch``: the memory may then keep less energy than the threshold asks.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..distributed import world_size
from .covariance import LowRankCovariance


_F64 = torch.float64

SKETCH_AUTO_SIZE = 256
"""``statistics_sketch="auto"``: ell = 256 rows (a buffer of 512 x d_in: 16 MiB in float64 at d_in = 4096, 1/8 of
the exact covariance). Chosen from benchmarks/bench_statistics_memory.py: see benchmarks/RESULTS.md ("Statistics at
LLM scale") for the principal-angle cosines it gives against the exact design and memory."""


def sketch_size(value: Union[int, str, None]) -> Optional[int]:
    """The sketch size ``ell`` that ``InfLoRAConfig.statistics_sketch`` stands for: ``None`` (exact covariance),
    ``SKETCH_AUTO_SIZE`` for ``"auto"``, else the int itself (validated by the config)."""
    if value is None:
        return None
    if value == "auto":
        return SKETCH_AUTO_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"statistics_sketch must be an int >= 1, 'auto' or None, got {value!r}.")
    return int(value)


def uses_sketch(ell: Optional[int], d_in: int) -> bool:
    """Whether an input group of width ``d_in`` keeps a sketch of ``ell`` rows: only when its buffer (``2 ell`` rows)
    is smaller than the exact ``d_in x d_in`` covariance, i.e. ``2 ell < d_in``; narrower groups keep the exact
    covariance, which then costs no more memory and is exact."""
    return ell is not None and 2 * int(ell) < int(d_in)


# ---------------------------------------------------------------------------------------------- Frequent Directions
class FrequentDirections:
    r"""Frequent Directions sketch of a stream of rows ``x_n`` [d] (the rows of ``X`` [N, d]).

    ``buffer`` [2 ell, d] (``dtype``, on ``device``) holds ``rows`` rows (the rest zeros); :attr:`matrix` is the sketch
    ``S = buffer[:rows]``; ``shrinkage`` is the sum ``Delta`` of the shrink amounts, in the units of ``X^T X``.
    Guarantee (module docstring): ``0 <= x^T (X^T X - S^T S) x <= Delta <= ||X - X_k||_F^2 / (ell + 1 - k)`` for unit
    x and ``k <= ell``.
    """

    def __init__(self, dim: int, ell: int, dtype: torch.dtype = _F64, device: Optional[torch.device] = None) -> None:
        if isinstance(ell, bool) or not isinstance(ell, int) or ell < 1:
            raise ValueError(f"ell (the sketch size) must be an int >= 1, got {ell!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        self.ell = ell
        self.buffer = torch.zeros(2 * ell, dim, dtype=dtype, device=device)
        self.rows = 0
        self.shrinkage = 0.0

    @property
    def matrix(self) -> torch.Tensor:
        """The sketch ``S`` [rows, d] (a view of the buffer)."""
        return self.buffer[: self.rows]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer."""
        return self.buffer.numel() * self.buffer.element_size()

    def update(self, rows: torch.Tensor) -> None:
        """Append the rows of ``rows`` [n, d] (any float dtype, any device: copied into the buffer chunk by chunk, so
        no converted copy of the whole batch is made), shrinking whenever the buffer is full."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {tuple(rows.shape)}")
        rows = rows.detach()
        capacity = self.buffer.shape[0]
        start, n = 0, int(rows.shape[0])
        while start < n:
            take = min(capacity - self.rows, n - start)
            self.buffer[self.rows: self.rows + take].copy_(rows[start: start + take])
            self.rows += take
            start += take
            if self.rows == capacity:
                self._shrink()

    def compress(self) -> None:
        """Shrink to at most ``ell`` rows (no-op when it holds no more)."""
        if self.rows > self.ell:
            self._shrink()

    def merge(self, other: "FrequentDirections") -> None:
        """Add another sketch of the same width: afterwards this is a sketch of the concatenation of both inputs,
        with ``Delta = Delta_self + Delta_other + Delta_merge``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge a sketch of width {other.dim} into one of width {self.dim}")
        self.update(other.matrix)
        self.shrinkage += other.shrinkage

    def _shrink(self) -> None:
        B = self.buffer[: self.rows]
        G = B @ B.T
        G = 0.5 * (G + G.T)
        try:
            e, U = torch.linalg.eigh(G)
        except torch.linalg.LinAlgError:  # pragma: no cover - eigh of a small PSD Gram matrix practically never fails
            U, s, _ = torch.linalg.svd(G)
            e, U = torch.flip(s, dims=(0,)), torch.flip(U, dims=(1,))
        e, U = torch.flip(e, dims=(0,)).clamp_min(0.0), torch.flip(U, dims=(1,))  # descending squared singular values
        keep = min(self.ell, self.rows)
        delta = float(e[self.ell]) if self.rows > self.ell else 0.0
        top = e[:keep]
        factor = torch.where(top > delta, torch.sqrt((top - delta).clamp_min(0.0) / top.clamp_min(1e-300)),
                             torch.zeros_like(top))
        shrunk = (U[:, :keep] * factor).T @ B  # rows sqrt(s_i^2 - delta) v_i^T
        self.buffer[:keep] = shrunk
        self.buffer[keep:].zero_()
        self.rows = keep
        self.shrinkage += delta


class SketchAccumulator:
    r"""The statistics of one input group in sketch mode, split by the group's memory.

    With an empty memory (or none): a :class:`FrequentDirections` sketch of the tokens ``x_n``. With a memory whose
    stored basis is ``E`` [d, e] (the memory M in form "basis", its complement in form "complement": the smaller side
    under DualGPM): the exact product ``sum_n x_n (E^T x_n)^T`` [d, e] and a sketch of the rows projected off E,
    ``x_n - E E^T x_n``. Always: the token count ``N`` and the exact ``sum_n ||x_n||^2``.

    Why split: the design of a later task needs the top left singular vectors of ``Q C``, and
    ``(Q C)(Q C)^T = (P C P)^2 + (P C M)(P C M)^T``: the free-space block ``P C P`` holds little energy (the memory
    took the task's leading directions), so a sketch of all of ``X`` (error ``delta``, set by the whole spectrum)
    misses it, while the cross term ``P C M`` usually dominates the design. Kept exactly, and with the sketch spent on
    the free-space rows only, the design of MiniLM's later tasks goes from principal-angle cosine 0.4 to 0.996 at
    ell = 128 (benchmarks/bench_statistics_memory.py). In form "complement" the design and the memory's candidates are
    exact and only the memory block's energy (in the threshold's total) is sketched.

    The same interface as :class:`~peft_inflora.subspace.CovarianceAccumulator`: ``update(tokens)``,
    ``all_reduce()``, ``count`` / ``local_count``, ``is_finite()``, ``nbytes``, and ``covariance()``, which returns a
    :class:`LowRankCovariance` (what :func:`~peft_inflora.subspace.design_eigen` and
    :func:`~peft_inflora.subspace.update_memory` accept in place of the dense ``C``). Memory: ``(2 ell + e) d``
    numbers of ``dtype``, whatever the number of tokens (e <= d / 2 with DualGPM).
    """

    def __init__(self, dim: int, ell: int, dtype: torch.dtype = _F64, device: Optional[torch.device] = None,
                 memory=None) -> None:
        self.dim = int(dim)
        self.ell = int(ell)
        self.dtype = dtype
        self.sketch = FrequentDirections(self.dim, self.ell, dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=_F64, device=device)
        self.square_sum = torch.zeros((), dtype=_F64, device=device)  # sum_n ||x_n||^2, exact
        self.local_count = 0  # tokens added by this process (no device sync to read)
        self.memory_form: Optional[str] = None
        self.exact_basis: Optional[torch.Tensor] = None
        self.product: Optional[torch.Tensor] = None  # sum_n x_n (E^T x_n)^T
        if memory is not None and memory.basis.shape[1] > 0:
            if memory.d_in != self.dim:
                raise ValueError(f"the memory is for inputs of width {memory.d_in}, the statistics for {self.dim}")
            basis = memory.basis.detach().to(device=device, dtype=_F64)
            Qr, R = torch.linalg.qr(basis, mode="reduced")  # clean a basis stored in float32
            signs = torch.sign(torch.diagonal(R))
            signs[signs == 0] = 1.0
            self.exact_basis = (Qr * signs).to(dtype)
            self.memory_form = memory.form
            self.product = torch.zeros(self.dim, basis.shape[1], dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (sketch buffer and exact product; the scalars are negligible)."""
        extra = 0 if self.product is None else 2 * self.product.numel() * self.product.element_size()
        return self.sketch.nbytes + extra

    def update(self, tokens: torch.Tensor, chunk: int = 512) -> None:
        """Add the rows of ``tokens`` (``n x d``), ``chunk`` rows at a time (no converted copy of the whole batch)."""
        if tokens.shape[0] == 0:
            return
        tokens = tokens.detach()
        device = self.count.device
        for start in range(0, tokens.shape[0], chunk):
            x = tokens[start: start + chunk].to(device=device, dtype=self.dtype)
            self.square_sum += x.to(_F64).square().sum()
            if self.exact_basis is not None:
                coords = x @ self.exact_basis  # [n, e]
                self.product.addmm_(x.T, coords)
                x = x - coords @ self.exact_basis.T
            self.sketch.update(x)
        self.count += tokens.shape[0]
        self.local_count += int(tokens.shape[0])

    def all_reduce(self) -> None:
        """Merge the statistics of all processes of the default group (no-op without torch.distributed).

        Each process compresses its sketch to ``ell`` rows; the sketches are all-gathered and merged in rank order
        (FD is mergeable: the result is a sketch of all processes' rows with the shrinkages added up); rank 0's merged
        sketch is broadcast so every process holds the identical sketch. Exact products, counts and squared-norm sums
        are all-reduced.
        """
        world = world_size()
        if world == 1:
            return
        dist = torch.distributed
        self.sketch.compress()
        device = self.sketch.buffer.device
        local = self.sketch.buffer[: self.ell].contiguous()
        meta = torch.tensor([float(self.sketch.rows), self.sketch.shrinkage], dtype=_F64, device=device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(gathered, local)
        dist.all_gather(metas, meta)
        merged = FrequentDirections(self.dim, self.ell, dtype=self.dtype, device=device)
        for rows, info in zip(gathered, metas):
            merged.update(rows[: int(info[0].item())])
            merged.shrinkage += float(info[1].item())
        merged.compress()
        state = torch.tensor([float(merged.rows), merged.shrinkage], dtype=_F64, device=device)
        dist.broadcast(merged.buffer, src=0)
        dist.broadcast(state, src=0)
        merged.rows, merged.shrinkage = int(state[0].item()), float(state[1].item())
        self.sketch = merged
        if self.product is not None:
            dist.all_reduce(self.product)
        dist.all_reduce(self.count)
        dist.all_reduce(self.square_sum)

    def is_finite(self) -> bool:
        finite = bool(torch.isfinite(self.sketch.buffer).all()) and bool(torch.isfinite(self.square_sum))
        return finite and (self.product is None or bool(torch.isfinite(self.product).all()))

    def covariance(self, rtol: float = 1e-10) -> LowRankCovariance:
        r"""The statistics as a :class:`LowRankCovariance`: the sketch compressed to ``<= ell`` rows,
        ``S = U diag(sigma) V^T`` (thin SVD, float64), the directions with ``sigma_i > rtol * sigma_1``, and
        ``C_hat = V diag((sigma^2 + Delta) / N) V^T``; the exact side ``E`` with ``H = (1/N) sum_n x_n (E^T x_n)^T``;
        the exact trace and ``delta = Delta / N``."""
        self.sketch.compress()
        n = max(float(self.count.item()), 1.0)
        S = self.sketch.matrix.to(_F64)
        if S.shape[0] == 0:
            V, sigma = S.new_zeros(self.dim, 0), S.new_zeros(0)
        else:
            _, sigma, Vh = torch.linalg.svd(S, full_matrices=False)
            keep = sigma > rtol * sigma[0] if float(sigma[0]) > 0 else torch.zeros_like(sigma, dtype=torch.bool)
            V, sigma = Vh[keep].T.contiguous(), sigma[keep]
        shrinkage = float(self.sketch.shrinkage)
        values = (sigma * sigma + shrinkage) / n
        E = None if self.exact_basis is None else self.exact_basis.to(_F64)
        H = None if self.product is None else self.product.to(_F64) / n
        return LowRankCovariance(V, values, float(self.square_sum.item()) / n, shrinkage / n, n, E, H,
                                 self.memory_form)
