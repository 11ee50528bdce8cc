"""Plots of a continual result: the accuracy matrix as a heatmap, and the accuracy curve over the sequence.

The only module of the package that imports matplotlib (on an Agg canvas, no pyplot state), and only when a plot is
drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

from .metrics import incremental_accuracies


if TYPE_CHECKING:
    from .result import ContinualResult

__all__ = ["plot_accuracy_curve", "plot_accuracy_matrix"]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_accuracy_matrix(result: "ContinualResult", path: Union[str, os.PathLike], title: str | None = None) -> str:
    """Save a heatmap PNG of the accuracy matrix (%), each cell annotated; returns the path.

    Rows are "after task i", columns the tasks; cells above the diagonal are blank.
    """
    if not result.accuracy_matrix:
        raise ValueError("nothing to plot: the accuracy matrix has no row yet")
    matrix = 100.0 * result.square_matrix()
    n_rows, n_cols = matrix.shape
    fig = _new_figure(max(4.0, 1.0 + 0.9 * n_cols), max(3.0, 1.0 + 0.6 * n_rows))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for i in range(n_rows):
        for j in range(i + 1):
            value = matrix[i, j]
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="black" if value >= 60 else "white")
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels(result.task_names, rotation=30, ha="right")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([f"after {i + 1}: {result.task_names[i]}" for i in range(n_rows)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if title is None:
        title = (
            f"{result.method}: A_T {100 * result.final_accuracy:.2f}%, A_avg "
            f"{100 * result.average_incremental_accuracy:.2f}%"
        )
    ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_curve(
    result: "ContinualResult",
    path: Union[str, os.PathLike],
    others: Mapping[str, Union["ContinualResult", Sequence["ContinualResult"]]] | None = None,
    title: str | None = None,
) -> str:
    """Save a PNG of the mean accuracy over the tasks seen so far vs the number of tasks learned; returns the path.

    One line per method: ``result`` (labelled ``extra.get("method", "InfLoRA")``) and each entry of ``others``
    (labelled by its key). An entry of ``others`` may be a list of runs (seeds) with the same number of rows:
    its mean is drawn with a shaded +- one (sample) standard deviation band.
    """
    curves = [(result.method, [result])]
    for label, value in (others or {}).items():
        runs = [value] if hasattr(value, "accuracy_matrix") else list(value)
        if not runs:
            raise ValueError(f"others[{label!r}] is an empty list")
        curves.append((str(label), runs))
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    max_len = 1
    for label, runs in curves:
        series = [incremental_accuracies(run.accuracy_matrix) for run in runs]
        if len({len(s) for s in series}) != 1:
            raise ValueError(f"runs of {label!r} have different numbers of rows: {[len(s) for s in series]}")
        values = 100.0 * np.asarray(series)
        mean = values.mean(axis=0)
        x = np.arange(1, values.shape[1] + 1)
        max_len = max(max_len, len(x))
        (line,) = ax.plot(x, mean, marker="o", label=label if len(runs) == 1 else f"{label} (n={len(runs)})")
        if len(runs) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xticks(range(1, max_len + 1))
    ax.set_xlabel("number of tasks learned")
    ax.set_ylabel("mean accuracy on tasks seen so far (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title if title is not None else "accuracy over the task sequence")
    return _save(fig, path)
