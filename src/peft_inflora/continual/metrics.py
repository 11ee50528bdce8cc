"""Continual-learning metrics of an accuracy matrix, and the validation of that matrix.

Notation (``docs/inflora-algorithm.md``, section "Metrics"): tasks are learned in order ``0 .. T-1`` and
``a[i][j]`` is the accuracy on task ``j`` measured right after training task ``i`` (only ``j <= i`` is defined).
With ``T`` the number of rows present (the last row is ``a[T-1]``):

* final accuracy            ``A_T   = mean_{j <= T-1} a[T-1][j]``
* average incremental acc.  ``A_avg = mean_{i} ( mean_{j <= i} a[i][j] )``
* backward transfer         ``BWT   = mean_{j < T-1} ( a[T-1][j] - a[j][j] )``
* forgetting                ``F     = mean_{j < T-1} ( max_{j <= i < T-1} a[i][j] - a[T-1][j] )``

For a single row (one task learned) ``BWT`` and ``F`` have no old task to average over and are defined as ``0.0``.
Every mean over tasks is unweighted: when tasks have test sets of different sizes, ``A_T`` differs from the
accuracy over the pooled test data of all tasks (the paper's class-incremental ``A_T``); they agree for
equal-sized test sets.

Accuracies are fractions in ``[0, 1]`` everywhere in this module; the markdown tables show percentages (and
percentage points for ``BWT`` / forgetting).

An accuracy matrix may be given as

* a lower triangle: row ``i`` holds exactly ``i + 1`` numbers ``a[i][0..i]``; or
* a rectangle: every row has the same width ``W >= number of rows`` (a square ``T x T`` matrix, or ``k x T`` while
  only ``k`` of ``T`` tasks are learned) whose entries ``j > i`` are ``None`` or NaN.

A matrix with fewer rows than tasks (a run in progress) is fine: the metrics are then those of the rows present.
Anything else (empty, ragged, a number above the diagonal, a missing number on or below it, a value outside
``[0, 1]``) raises :class:`ValueError`.

No torch is needed here. The result record is :mod:`.result`, its plots :mod:`.plots`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np


__all__ = [
    "average_incremental_accuracy",
    "backward_transfer",
    "final_accuracy",
    "forgetting",
    "incremental_accuracies",
]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(float(value))


def _accuracy(value: Any, where: str) -> float:
    """One accuracy as a float in [0, 1], or a ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: accuracy must be a real number in [0, 1], got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{where}: accuracy is missing (NaN); entries a[i][j] with j <= i must all be given")
    if not 0.0 <= number <= 1.0:
        hint = " (accuracies are fractions in [0, 1], not percentages)" if 1.0 < number <= 100.0 else ""
        raise ValueError(f"{where}: accuracy {number!r} is outside [0, 1]{hint}")
    return number


def _as_triangle(acc: Any) -> list[list[float]]:
    """Validate an accuracy matrix (triangle or rectangle, see the module docstring) and return its lower triangle.

    Row ``i`` of the result is a new list of exactly ``i + 1`` floats.
    """
    if acc is None:
        raise ValueError("accuracy matrix is empty (None)")
    try:
        rows = [list(row) for row in acc]
    except TypeError as exc:
        raise ValueError(f"accuracy matrix must be a sequence of rows (sequences of numbers): {exc}") from None
    if not rows:
        raise ValueError("accuracy matrix is empty: at least one task must have been evaluated")
    n_rows = len(rows)
    widths = [len(row) for row in rows]
    triangular = all(width == i + 1 for i, width in enumerate(widths))
    rectangular = len(set(widths)) == 1 and widths[0] >= n_rows
    if not (triangular or rectangular):
        raise ValueError(
            f"accuracy matrix is neither lower-triangular (row i of length i + 1) nor a rectangle of width >= "
            f"{n_rows} (its number of rows) with None/NaN above the diagonal; row lengths are {widths}"
        )
    triangle = []
    for i, row in enumerate(rows):
        for j in range(i + 1, len(row)):
            if not _is_missing(row[j]):
                raise ValueError(
                    f"a[{i}][{j}] = {row[j]!r} lies above the diagonal (accuracy on task {j} before it was "
                    f"learned): entries with j > i must be None or NaN"
                )
        triangle.append([_accuracy(row[j], f"a[{i}][{j}]") for j in range(i + 1)])
    return triangle


def _seconds(values: Any, name: str, n_tasks: int) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of seconds, got {values!r}") from None
    if len(values) > n_tasks:
        raise ValueError(f"{name} has {len(values)} entries but there are only {n_tasks} tasks")
    out = []
    for k, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"{name}[{k}] must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise ValueError(f"{name}[{k}] must be >= 0, got {value!r}")
        out.append(float(value))
    return out


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def incremental_accuracies(acc: Sequence[Sequence[float]]) -> list[float]:
    """Mean accuracy over the tasks seen so far, after each task: ``[mean_{j <= i} a[i][j] for each row i]``.

    This is the accuracy curve plotted by :meth:`ContinualResult.plot_accuracy_curve`; its last entry is ``A_T`` and
    its mean is ``A_avg``.
    """
    return [float(np.mean(row)) for row in _as_triangle(acc)]


def final_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Final accuracy ``A_T = mean_{j <= T-1} a[T-1][j]``: the mean over all learned tasks of the last row.

    ``T`` is the number of rows present. Unweighted over tasks (see the module docstring).
    """
    return float(np.mean(_as_triangle(acc)[-1]))


def average_incremental_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Average incremental accuracy ``A_avg = mean_{i <= T-1} ( mean_{j <= i} a[i][j] )``.

    The mean, over the rows present, of each row's mean over the tasks learned by then.
    """
    return float(np.mean([np.mean(row) for row in _as_triangle(acc)]))


def backward_transfer(acc: Sequence[Sequence[float]]) -> float:
    """Backward transfer ``BWT = mean_{j < T-1} ( a[T-1][j] - a[j][j] )``.

    How much the accuracy on each old task changed between just after learning it and the end; negative values
    mean forgetting. With a single row there is no old task and ``BWT`` is defined as ``0.0``.
    """
    rows = _as_triangle(acc)
    last = rows[-1]
    if len(rows) == 1:
        return 0.0
    return float(np.mean([last[j] - rows[j][j] for j in range(len(rows) - 1)]))


def forgetting(acc: Sequence[Sequence[float]]) -> float:
    """Average forgetting ``F = mean_{j < T-1} ( max_{j <= i < T-1} a[i][j] - a[T-1][j] )``.

    For each old task, the drop from its best accuracy before the last task (``i`` runs over rows ``j .. T-2``, the
    last row excluded) to its final accuracy. Usually >= 0; negative when old tasks end above every earlier
    measurement. With a single row there is no old task and ``F`` is defined as ``0.0``.
    """
    rows = _as_triangle(acc)
    last = rows[-1]
    if len(rows) == 1:
        return 0.0
    n_old = len(rows) - 1
    return float(np.mean([max(rows[i][j] for i in range(j, n_old)) - last[j] for j in range(n_old)]))


_METRICS = (
    ("final_accuracy", "final accuracy A_T", "%", final_accuracy),
    ("average_incremental_accuracy", "average incremental accuracy A_avg", "%", average_incremental_accuracy),
    ("backward_transfer", "backward transfer BWT", "pp", backward_transfer),
    ("forgetting", "forgetting F", "pp", forgetting),
)


# ---------------------------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------------------------
def _pct(value: float, digits: int) -> str:
    """A fraction as a percentage string, never ``-0.00``."""
    text = f"{100.0 * value:.{digits}f}"
    if float(text) == 0.0:
        text = f"{0.0:.{digits}f}"
    return text


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")
