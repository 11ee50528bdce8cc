"""Continual-learning metrics, a result record, tables and plots.

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

No torch is needed here; matplotlib is imported only inside the plotting methods (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

RESULT_FILE = "continual_result.json"  # the name under which a run's result is saved next to its adapter


__all__ = [
    "ContinualResult",
    "average_incremental_accuracy",
    "backward_transfer",
    "compare_table",
    "final_accuracy",
    "forgetting",
    "incremental_accuracies",
]

_FORMAT = "peft_inflora.ContinualResult"
_FORMAT_VERSION = 1
_DEFAULT_METHOD = "InfLoRA"


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
            return cls.from_json(file)
        from huggingface_hub import hf_hub_download

        return cls.from_json(hf_hub_download(path, RESULT_FILE, revision=revision, token=token))

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
        """Save a heatmap PNG of the accuracy matrix (%), each cell annotated; returns the path.

        Rows are "after task i", columns the tasks; cells above the diagonal are blank.
        """
        if not self.accuracy_matrix:
            raise ValueError("nothing to plot: the accuracy matrix has no row yet")
        matrix = 100.0 * self.square_matrix()
        n_rows, n_cols = matrix.shape
        fig = _new_figure(max(4.0, 1.0 + 0.9 * n_cols), max(3.0, 1.0 + 0.6 * n_rows))
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
        for i in range(n_rows):
            for j in range(i + 1):
                value = matrix[i, j]
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="black" if value >= 60 else "white")
        ax.set_xticks(range(n_cols))
        ax.set_xticklabels(self.task_names, rotation=30, ha="right")
        ax.set_yticks(range(n_rows))
        ax.set_yticklabels([f"after {i + 1}: {self.task_names[i]}" for i in range(n_rows)])
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training task")
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        if title is None:
            title = (
                f"{self.method}: A_T {100 * self.final_accuracy:.2f}%, A_avg "
                f"{100 * self.average_incremental_accuracy:.2f}%"
            )
        ax.set_title(title)
        return _save(fig, path)

    def plot_accuracy_curve(
        self,
        path: Union[str, os.PathLike],
        others: Mapping[str, Union["ContinualResult", Sequence["ContinualResult"]]] | None = None,
        title: str | None = None,
    ) -> str:
        """Save a PNG of the mean accuracy over the tasks seen so far vs the number of tasks learned; returns the path.

        One line per method: this result (labelled ``extra.get("method", "InfLoRA")``) and each entry of ``others``
        (labelled by its key). An entry of ``others`` may be a list of runs (seeds) with the same number of rows:
        its mean is drawn with a shaded +- one (sample) standard deviation band.
        """
        curves = [(self.method, [self])]
        for label, value in (others or {}).items():
            runs = [value] if isinstance(value, ContinualResult) else list(value)
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
