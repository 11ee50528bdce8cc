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

Modules (pure torch, no PEFT): :mod:`~peft_inflora.subspace.memory` (``Memory``, storing and orthonormalising),
:mod:`~peft_inflora.subspace.design` (``design_eigen``, ``design_random``), :mod:`~peft_inflora.subspace.update`
(``update_memory``, ``energy_threshold``, ``memory_capacity``, ``captured_energy_ratio``),
:mod:`~peft_inflora.subspace.solvers` (dense SVD / eigh) and :mod:`~peft_inflora.subspace.randomized` (block subspace
iteration), :mod:`~peft_inflora.subspace.covariance` (``CovarianceAccumulator``, ``LowRankCovariance``) and
:mod:`~peft_inflora.subspace.sketch` (Frequent Directions statistics), :mod:`~peft_inflora.subspace.checks`
(argument checks and the choice lists).
"""

from ..errors import SketchWarning
from .checks import ENERGIES, MEMORY_FORMS, MEMORY_KINDS
from .covariance import CovarianceAccumulator, LowRankCovariance
from .design import design_eigen, design_random
from .memory import Memory, _complement_basis, _orthonormalise, _store, principal_angle_cosines
from .randomized import (
    RANDOMIZED_FIRST_BLOCK,
    RANDOMIZED_MAX_FRACTION,
    RANDOMIZED_MAX_ITERATIONS,
    RANDOMIZED_MEMORY_TOLERANCE,
    RANDOMIZED_OVERSAMPLING,
    RANDOMIZED_TOLERANCE,
)
from .sketch import SKETCH_AUTO_SIZE, FrequentDirections, SketchAccumulator, sketch_size, uses_sketch
from .solvers import AUTO_EXACT_MAX_DIM, SOLVERS, _gram_left_singular, resolve_solver
from .update import captured_energy_ratio, energy_threshold, memory_capacity, update_memory


# _complement_basis, _orthonormalise, _store and _gram_left_singular stay reachable as peft_inflora.subspace._name for
# the scripts in benchmarks/ that build reference memories with them.

__all__ = [
    "AUTO_EXACT_MAX_DIM",
    "CovarianceAccumulator",
    "ENERGIES",
    "FrequentDirections",
    "LowRankCovariance",
    "MEMORY_FORMS",
    "MEMORY_KINDS",
    "Memory",
    "RANDOMIZED_FIRST_BLOCK",
    "RANDOMIZED_MAX_FRACTION",
    "RANDOMIZED_MAX_ITERATIONS",
    "RANDOMIZED_MEMORY_TOLERANCE",
    "RANDOMIZED_OVERSAMPLING",
    "RANDOMIZED_TOLERANCE",
    "SKETCH_AUTO_SIZE",
    "SOLVERS",
    "SketchAccumulator",
    "SketchWarning",
    "captured_energy_ratio",
    "design_eigen",
    "design_random",
    "energy_threshold",
    "memory_capacity",
    "principal_angle_cosines",
    "resolve_solver",
    "sketch_size",
    "update_memory",
    "uses_sketch",
]
