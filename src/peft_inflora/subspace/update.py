r"""The memory update after task t trains (GPM / DualGPM), its energy threshold and capacity planning.

With energy threshold ``eps_t = lamb + (1 - lamb) t / T`` (t 0-based), ``S = C C^T`` ("squared" energy) or ``S = C``
("linear"), ``total = trace(S)`` and ``captured = total - trace(Q S Q)``: the candidate directions ``u_i`` with
energies ``e_i`` are the eigenvectors of ``Q S Q``, descending; the first task keeps
``k = #{i : sum_{l<=i} e_l / total < eps}`` (at least 1), later tasks nothing if ``captured / total >= eps``, else the
smallest ``j`` with ``(captured + e_1 + ... + e_j) / total >= eps``; ``eps >= 1`` keeps every non-negligible direction
(``e_i > rtol^2 * lambda_max(S)``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch

from ..errors import SketchWarning
from . import solvers
from .checks import MEMORY_KINDS, _as_int, _check_covariance, _check_energy, _check_rtol, _check_threshold
from .covariance import LowRankCovariance
from .memory import Memory, _check_memory, _reorthonormalise, _store
from .randomized import _default_generator, _largest_eigenvalue, _randomized_candidates
from .solvers import resolve_solver


_F64 = torch.float64


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


def memory_capacity(d_in: int, rank: int, tasks_left: int) -> int:
    r"""Largest memory dimension that still leaves room for the remaining tasks (``adaptive_threshold``).

    After a task, with ``tasks_left`` tasks still to learn at rank ``r`` each in a layer of ``d_in`` input
    features, the memory may span at most ``d_in - r * tasks_left`` dimensions: every later task then finds ``r``
    free directions for its ``B_t`` even if each of them adds ``r`` directions to the memory in turn (a task's own
    branch directions are what its memory update usually keeps). Never negative.
    """
    return max(int(d_in) - int(rank) * max(int(tasks_left), 0), 0)


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

    ``covariance`` may also be a :class:`~peft_inflora.subspace.LowRankCovariance` (``statistics_sketch``):
    candidates and energies are those of ``C_hat = V diag(lambda) V^T`` (left singular vectors of the d_in x m
    matrix ``Q V diag(lambda)``, resp. ``Q V diag(sqrt(lambda))`` for linear energy; ``solver`` is not used), and
    the energy the sketch could not keep is counted as energy outside the memory that no candidate holds
    (:meth:`~peft_inflora.subspace.LowRankCovariance.energy_totals`: ``total = ||C_hat||_F^2 + t_res^2 / (d_in - m)``
    for squared energy, the exact ``tr(C)`` for linear; see :mod:`peft_inflora.subspace.sketch` for how these errors
    affect the threshold). When the rule needs more than half of the sketch's directions (its inaccurate lower half) a
    :class:`~peft_inflora.errors.SketchWarning` says to raise ``statistics_sketch``. Data of rank <= ell: the same
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
        total, outside = solvers._energy_totals(mem, C, energy)
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
            candidates = solvers._gram_left_singular(mem, C)
            candidates = (candidates[0], candidates[1] ** 2)
    if candidates is not None:
        U, e = candidates
        data_sv = torch.sqrt(e)
    elif energy == "squared":
        U, s = solvers._projected_left_singular(mem, C)
        e = s * s
        data_sv = s
        smax = solvers._sigma_max(C)
    else:
        Csym = 0.5 * (C + C.T)
        U, e = solvers._projected_eigh(mem, Csym)
        data_sv = torch.sqrt(e)
        lam_max = float(solvers._safe_eigh(Csym, eigenvectors=False)[-1])
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
    total, outside = solvers._energy_totals(memory, C, energy)
    if not total > 0.0:
        raise _zero_energy_error(total)
    return (total - outside) / total


def _zero_energy_error(total: float) -> ValueError:
    return ValueError(
        f"covariance has no energy (trace of S = {total:g}): no inputs were recorded for this layer, "
        "or the statistics are all zeros; collect the statistics over the task's data before "
        "updating the memory"
    )


def _low_rank_candidates(mem: Memory, cov: LowRankCovariance, energy: str, threshold: float, total: float,
                         captured: float) -> Tuple[Tuple[torch.Tensor, torch.Tensor], float]:
    """Candidate directions ``(U, e)`` of the memory update from a sketched covariance (``e = s^2`` of
    :meth:`LowRankCovariance.projected`) and ``sigma_max`` of the data matrix (``lambda_1`` for squared energy,
    ``sqrt(lambda_1)`` for linear).

    Warns (:class:`~peft_inflora.errors.SketchWarning`) when the candidates come from the sketch (no memory, or one
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
