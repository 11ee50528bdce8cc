"""The record of a continual run: ``ContinualResult`` (accuracy matrix, timings, metadata), its JSON file and
tables; :func:`compare_table` across methods and seeds.

Notation and the metrics are those of :mod:`.metrics`; plots are drawn by :mod:`.plots` (matplotlib is imported
only there, when a plot is drawn).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .metrics import (
    _METRICS,
    _accuracy,
    _as_triangle,
    _cell,
    _json_default,
    _markdown,
    _pct,
    _seconds,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
)


RESULT_FILE = "continual_result.json"  # the name under which a run's result is saved next to its adapter

__all__ = ["RESULT_FILE", "ContinualResult", "compare_table"]

_FORMAT = "peft_inflora.ContinualResult"
_FORMAT_VERSION = 1
_DEFAULT_METHOD = "InfLoRA"


# ---------------------------------------------------------------------------------------------
# result record
# ---------------------------------------------------------------------------------------------
@dataclass
class ContinualResult:
    """The outcome of one continual-learning run: the accuracy matrix plus timings and free-form metadata.

    Attributes:
        task_names: the ``T`` tasks in training order.
        accuracy_matrix: ``a[i][j]``, accuracy (fraction in [0, 1]) on task ``j`` after training task ``i``. May be
            given as a lower triangle or as a rectangle with None/NaN above the diagonal (see the module docstring);
            it is stored as the lower triangle (row ``i`` has ``i + 1`` floats). It may have fewer rows than there
            are tasks (a run in progress; grow it with :meth:`add_row`).
        train_seconds: training time of each task, in order (at most ``T`` entries).
        statistics_seconds: time of each task's ``begin_task`` + ``end_task`` (input statistics, subspace design and
            memory update), in order (at most ``T`` entries).
        extra: free-form JSON-serialisable metadata, e.g. ``{"method": "InfLoRA", "seed": 0, "config": {...}}``.
            ``extra["method"]`` labels the run in plots (default ``"InfLoRA"``).

    The properties :attr:`final_accuracy`, :attr:`average_incremental_accuracy`, :attr:`backward_transfer` and
    :attr:`forgetting` evaluate the module-level functions of the same names on the rows present (and raise
    :class:`ValueError` while no row is present).
    """

    task_names: list[str]
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    statistics_seconds: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.task_names, str):
            raise ValueError("task_names must be a sequence of task names, not a single string")
        self.task_names = [str(name) for name in self.task_names]
        if not self.task_names:
            raise ValueError("task_names is empty: a continual run needs at least one task")
        matrix = self.accuracy_matrix
        # An empty matrix is allowed here (rows are added with add_row); the metric functions reject it.
        empty = matrix is None or (hasattr(matrix, "__len__") and len(matrix) == 0)
        self.accuracy_matrix = [] if empty else _as_triangle(matrix)
        if len(self.accuracy_matrix) > len(self.task_names):
            raise ValueError(
                f"accuracy_matrix has {len(self.accuracy_matrix)} rows but there are only {len(self.task_names)} "
                f"tasks ({self.task_names})"
            )
        self.train_seconds = _seconds(self.train_seconds, "train_seconds", len(self.task_names))
        self.statistics_seconds = _seconds(self.statistics_seconds, "statistics_seconds", len(self.task_names))
        if self.extra is None:
            self.extra = {}
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        self.extra = dict(self.extra)

    # -- shape --------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks in the sequence."""
        return len(self.task_names)

    @property
    def num_learned(self) -> int:
        """The number of rows present (tasks learned and evaluated so far)."""
        return len(self.accuracy_matrix)

    @property
    def method(self) -> str:
        """``extra["method"]``, or ``"InfLoRA"``."""
        return str(self.extra.get("method", _DEFAULT_METHOD))

    def headline(self) -> str:
        """One line: ``"<method>: A_T = .. %, A_avg = .. %, BWT = .. pp, forgetting = .. pp"``."""
        return (f"{self.method}: A_T = {100 * self.final_accuracy:.2f} %, A_avg = "
                f"{100 * self.average_incremental_accuracy:.2f} %, BWT = {100 * self.backward_transfer:.2f} pp, "
                f"forgetting = {100 * self.forgetting:.2f} pp")

    def square_matrix(self) -> np.ndarray:
        """The accuracies as a ``num_learned x num_tasks`` float array, NaN where ``j > i``."""
        out = np.full((self.num_learned, self.num_tasks), np.nan)
        for i, row in enumerate(self.accuracy_matrix):
            out[i, : i + 1] = row
        return out

    def add_row(
        self,
        accuracies: Sequence[float],
        *,
        train_seconds: float | None = None,
        statistics_seconds: float | None = None,
    ) -> None:
        """Append row ``i = num_learned``: the accuracies on tasks ``0 .. i`` after training task ``i``.

        ``accuracies`` must have exactly ``i + 1`` entries, each in [0, 1]. The optional timings are appended to
        :attr:`train_seconds` / :attr:`statistics_seconds`, which must then hold exactly ``i`` entries already (one
        per earlier task). Nothing is changed when a ValueError is raised.
        """
        i = self.num_learned
        if i >= self.num_tasks:
            raise ValueError(f"all {self.num_tasks} tasks already have a row; cannot add row {i}")
        if isinstance(accuracies, (str, bytes)):
            raise ValueError("accuracies must be a sequence of numbers, not a string")
        try:
            values = list(accuracies)
        except TypeError:
            raise ValueError(f"accuracies must be a sequence of numbers, got {accuracies!r}") from None
        if len(values) != i + 1:
            raise ValueError(
                f"row {i} (after task {i}, {self.task_names[i]!r}) needs exactly {i + 1} accuracies (tasks 0..{i}), "
                f"got {len(values)}"
            )
        row = [_accuracy(value, f"a[{i}][{j}]") for j, value in enumerate(values)]
        timings = []
        for name, value in (("train_seconds", train_seconds), ("statistics_seconds", statistics_seconds)):
            if value is None:
                continue
            current = getattr(self, name)
            if len(current) != i:
                raise ValueError(f"{name} has {len(current)} entries; appending task {i}'s needs exactly {i}")
            timings.append((name, _seconds([value], name, 1)[0]))
        self.accuracy_matrix.append(row)
        for name, value in timings:
            getattr(self, name).append(value)

    # -- metrics ------------------------------------------------------------------------------
    @property
    def final_accuracy(self) -> float:
        """``A_T = mean_j a[T-1][j]`` over the rows present (see :func:`final_accuracy`)."""
        return final_accuracy(self.accuracy_matrix)

    @property
    def average_incremental_accuracy(self) -> float:
        """``A_avg = mean_i mean_{j<=i} a[i][j]`` over the rows present (see :func:`average_incremental_accuracy`)."""
        return average_incremental_accuracy(self.accuracy_matrix)

    @property
    def backward_transfer(self) -> float:
        """``BWT = mean_{j<T-1} (a[T-1][j] - a[j][j])`` over the rows present (see :func:`backward_transfer`)."""
        return backward_transfer(self.accuracy_matrix)

    @property
    def forgetting(self) -> float:
        """``F = mean_{j<T-1} (max_{j<=i<T-1} a[i][j] - a[T-1][j])`` over the rows present (see :func:`forgetting`)."""
        return forgetting(self.accuracy_matrix)

    def metrics(self) -> dict[str, float]:
        """The four metrics by name (fractions), or ``{}`` while no row is present."""
        if not self.accuracy_matrix:
            return {}
        return {key: fn(self.accuracy_matrix) for key, _, _, fn in _METRICS}

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict; :meth:`from_dict` inverts it exactly.

        The matrix is stored as its lower triangle (no NaN). A ``"metrics"`` entry with the four metrics is included
        for readers of the file and ignored by :meth:`from_dict`.
        """
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "task_names": list(self.task_names),
            "accuracy_matrix": [list(row) for row in self.accuracy_matrix],
            "train_seconds": list(self.train_seconds),
            "statistics_seconds": list(self.statistics_seconds),
            "extra": json.loads(json.dumps(self.extra, default=_json_default)) if self.extra else {},
            "metrics": self.metrics(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ContinualResult":
        """Rebuild a result from :meth:`to_dict` output (validated like the constructor)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a dict, got {type(data).__name__}")
        fmt = data.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"not a ContinualResult record: format is {fmt!r}, expected {_FORMAT!r}")
        version = data.get("version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported ContinualResult format version {version!r} (this code reads 1)")
        if "task_names" not in data:
            raise ValueError("missing 'task_names'")
        return cls(
            task_names=data["task_names"],
            accuracy_matrix=data.get("accuracy_matrix", []),
            train_seconds=data.get("train_seconds", []),
            statistics_seconds=data.get("statistics_seconds", []),
            extra=data.get("extra", {}),
        )

    def to_json(self, path: Union[str, os.PathLike]) -> str:
        """Write :meth:`to_dict` as strict JSON (no NaN/Infinity; parent folders created); returns the path.

        Raises ValueError when ``extra`` holds a non-finite float or something JSON cannot represent. Tuples in
        ``extra`` come back as lists.
        """
        try:
            text = json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False, default=_json_default)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot write this result as strict JSON (check `extra`): {exc}") from exc
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        return path

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "ContinualResult":
        """Read a file written by :meth:`to_json`."""
        with open(os.fspath(path), encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    @classmethod
    def from_pretrained(cls, path_or_repo_id: Union[str, os.PathLike], *, revision: Optional[str] = None,
                        token: Optional[str] = None) -> "ContinualResult":
        """The result saved next to an adapter: ``continual_result.json`` in a local folder (a ContinualTrainer's
        ``output_dir``, a checkpoint) or in a Hub repository pushed by ``ContinualTrainer.push_to_hub``.

        Pass it as ``previous_result`` to ``ContinualTrainer.train_continual`` to continue the sequence.
        """
        path = os.fspath(path_or_repo_id)
        if os.path.isfile(path):
            return cls.from_json(path)
        if os.path.isdir(path):
            file = os.path.join(path, RESULT_FILE)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path} holds no {RESULT_FILE}: pass the folder a ContinualTrainer wrote "
                                        "(its output_dir or a continual/after-task-NN checkpoint).")
            result = cls.from_json(file)
        else:
            from huggingface_hub import hf_hub_download

            result = cls.from_json(hf_hub_download(path, RESULT_FILE, revision=revision, token=token))
        result.source = (path, revision)  # where the files saved with it (e.g. class statistics) are; not saved
        return result

    # -- reporting ----------------------------------------------------------------------------
    def summary_table(self, digits: int = 2) -> str:
        """Markdown: the accuracy matrix in % (rows "after task i", columns tasks), then the four metrics.

        ``A_T`` and ``A_avg`` are in %, ``BWT`` and forgetting in percentage points (pp). Cells above the diagonal
        (and rows not yet learned) are left out / blank.
        """
        header = ["after task"] + [f"{j + 1}: {name}" for j, name in enumerate(self.task_names)]
        align = ["---"] + ["---:"] * self.num_tasks
        rows = []
        for i, row in enumerate(self.accuracy_matrix):
            cells = [_pct(v, digits) for v in row] + [""] * (self.num_tasks - i - 1)
            rows.append([f"{i + 1}: {self.task_names[i]}"] + cells)
        parts = [f"**{_cell(self.method)}**: {self.num_learned} of {self.num_tasks} tasks learned", ""]
        parts.append(_markdown(header, align, rows))
        metrics = self.metrics()
        metric_rows = [
            [f"{label} ({unit})", _pct(metrics[key], digits) if metrics else "n/a"] for key, label, unit, _ in _METRICS
        ]
        parts += ["", _markdown(["metric", "value"], ["---", "---:"], metric_rows)]
        return "\n".join(parts)

    def plot_accuracy_matrix(self, path: Union[str, os.PathLike], title: str | None = None) -> str:
        """Save a heatmap PNG of the accuracy matrix (%), each cell annotated; returns the path (see
        :func:`.plots.plot_accuracy_matrix`)."""
        from .plots import plot_accuracy_matrix

        return plot_accuracy_matrix(self, path, title)

    def plot_accuracy_curve(
        self,
        path: Union[str, os.PathLike],
        others: Mapping[str, Union["ContinualResult", Sequence["ContinualResult"]]] | None = None,
        title: str | None = None,
    ) -> str:
        """Save a PNG of the mean accuracy over the tasks seen so far vs the number of tasks learned, one line per
        method (``others``: more methods, a list of runs drawn as mean +- std); returns the path (see
        :func:`.plots.plot_accuracy_curve`)."""
        from .plots import plot_accuracy_curve

        return plot_accuracy_curve(self, path, others, title)


# ---------------------------------------------------------------------------------------------
# comparison across methods / seeds
# ---------------------------------------------------------------------------------------------
def compare_table(
    results: Mapping[str, Union[ContinualResult, Sequence[ContinualResult]]], digits: int = 2, ddof: int = 1
) -> str:
    """Markdown table ``method | runs | A_T (%) | A_avg (%) | BWT (pp) | forgetting (pp)``, one row per method.

    A method given a single :class:`ContinualResult` shows its values; a list of runs (e.g. seeds) shows
    ``mean ± std`` over the runs, the standard deviation with ``ddof`` (default 1: the sample standard deviation;
    a list of one run shows the value alone). All runs of one method must have the same number of rows.
    """
    if not results:
        raise ValueError("compare_table needs at least one method")
    header = ["method", "runs", "A_T (%)", "A_avg (%)", "BWT (pp)", "forgetting (pp)"]
    rows = []
    for method, value in results.items():
        runs = [value] if isinstance(value, ContinualResult) else list(value)
        if not runs:
            raise ValueError(f"results[{method!r}] is an empty list")
        for run in runs:
            if not isinstance(run, ContinualResult):
                raise ValueError(f"results[{method!r}] must hold ContinualResult objects, got {type(run).__name__}")
            if not run.accuracy_matrix:
                raise ValueError(f"a run of {method!r} has no accuracy row yet")
        lengths = sorted({run.num_learned for run in runs})
        if len(lengths) > 1:
            raise ValueError(f"runs of {method!r} have different numbers of learned tasks: {lengths}")
        cells = [str(method), str(len(runs))]
        for _, _, _, fn in _METRICS:
            values = np.array([fn(run.accuracy_matrix) for run in runs])
            text = _pct(float(values.mean()), digits)
            if len(runs) > ddof:
                text += f" ± {_pct(float(values.std(ddof=ddof)), digits)}"
            cells.append(text)
        rows.append(cells)
    return _markdown(header, ["---", "---:"] + ["---:"] * len(_METRICS), rows)
