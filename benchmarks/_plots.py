"""Plots of the benchmark results (GitHub issue 15, part 5): PNGs next to the JSON they are drawn from.

``bench_quality.py`` (also with ``--merge``) and ``bench_long_sequence.py`` call :func:`write_quality_plots` /
:func:`write_long_sequence_plots` after writing their JSON; this module's command line draws the same plots again
from stored JSON, and pools long-sequence folders of several seeds into one set of plots:

    R=benchmarks/results
    python benchmarks/_plots.py $R/quality_3seeds               # quality_accuracy.png, quality_forgetting.png
    python benchmarks/_plots.py $R/long_sequence_lambda09999    # long_sequence_accuracy / _free_dimension.png
    python benchmarks/_plots.py $R/long_sequence_30tasks_* --out $R/long_sequence_30tasks_3seeds   # seeds pooled

Notation as in ``peft_inflora.continual.metrics``: ``a[i][j]`` is the accuracy on task ``j`` right after training
task ``i``
(rows ``i = 0 .. T-1``, ``j <= i``). The numbers drawn come from the small pure functions at the top
(:func:`seen_accuracy`, :func:`forgetting_per_task`, :func:`mean_std`, :func:`free_dimensions`), tested against
numpy in tests/test_benchmark_plots.py. Figures are drawn on matplotlib's Agg canvas without pyplot state.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from peft_inflora.continual.metrics import incremental_accuracies


# ---------------------------------------------------------------------------------------------- the numbers
def seen_accuracy(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """``A_i = 100 * mean_{j <= i} a[i][j]`` for every row ``i`` (%): accuracy on the tasks seen so far, shape (T,)."""
    return 100.0 * np.asarray(incremental_accuracies(matrix), dtype=np.float64)


def forgetting_per_task(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """``f_j = 100 * (max_{j <= i < T-1} a[i][j] - a[T-1][j])`` for every old task ``j < T-1``, in pp, shape (T-1,).

    The per-task terms of ``peft_inflora.metrics.forgetting`` (their mean is ``100 * F``); empty for one row.
    """
    rows = [list(map(float, row[: i + 1])) for i, row in enumerate(matrix)]
    last = rows[-1]
    return 100.0 * np.array([max(rows[i][j] for i in range(j, len(rows) - 1)) - last[j]
                             for j in range(len(rows) - 1)], dtype=np.float64)


def mean_std(series: Sequence[Sequence[float]], ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (``ddof``, the sample std by default, as ``compare_table``) over runs (axis 0).

    Runs of different lengths (a run stopped early) are cut to the shortest; with one run the std is 0.
    """
    if not series:
        raise ValueError("mean_std needs at least one run")
    n = min(len(s) for s in series)
    values = np.asarray([np.asarray(s, dtype=np.float64)[:n] for s in series])
    std = values.std(axis=0, ddof=ddof) if len(values) > ddof else np.zeros(n)
    return values.mean(axis=0), std


Series = dict[str, tuple[np.ndarray, np.ndarray, int]]  # method -> (mean, std, number of runs)


def accuracy_series(matrices: Mapping[str, Sequence[Sequence[Sequence[float]]]]) -> Series:
    """Per method (its runs' accuracy matrices): mean and std over the runs of :func:`seen_accuracy`, in %."""
    return {m: (*mean_std([seen_accuracy(a) for a in runs]), len(runs)) for m, runs in matrices.items()}


def forgetting_series(matrices: Mapping[str, Sequence[Sequence[Sequence[float]]]]) -> Series:
    """Per method: mean and std over the runs of :func:`forgetting_per_task` with the run's mean over its old
    tasks (its ``100 * forgetting``) appended, in pp, shape (T,)."""
    out = {}
    for method, runs in matrices.items():
        per_run = [forgetting_per_task(a) for a in runs]
        out[method] = (*mean_std([np.append(f, f.mean() if f.size else 0.0) for f in per_run]), len(runs))
    return out


def free_dimension_bands(frees: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smallest, median and largest free dimension over the layers after each task, each the mean over runs
    (seeds) of the ``(T, layers)`` arrays of :func:`free_dimensions`."""
    return tuple(mean_std([reduce(f, axis=1) for f in frees])[0] for reduce in (np.min, np.median, np.max))


def quality_matrices(result: Mapping) -> dict[str, list]:
    """The accuracy matrices of every method of a ``quality.json`` whose runs have one (not joint LoRA's)."""
    return {m: [r["accuracy_matrix"] for r in runs] for m, runs in result["runs"].items()
            if runs and all("accuracy_matrix" in r for r in runs)}


def long_sequence_matrices(runs: Sequence[Mapping]) -> dict[str, list]:
    """The accuracy matrices of a ``long_sequence.json``'s runs (one seed, or pooled seeds) by method."""
    out: dict[str, list] = {}
    for run in runs:
        if run["result"]["accuracy_matrix"]:
            out.setdefault(run["method"], []).append(run["result"]["accuracy_matrix"])
    return out


def free_dimensions(capacity: Sequence[Mapping[str, Sequence[float]]]) -> tuple[list[str], np.ndarray]:
    """Layer names and the free dimension ``d_in - dim(memory)`` of each layer after each task, shape (T, layers).

    ``capacity`` is ``ContinualResult.extra["capacity"]``: per task ``{layer: [memory_dim, free_dim, threshold]}``.
    """
    if not capacity:
        raise ValueError("no capacity recorded (extra['capacity'] is empty): only InfLoRA runs record it")
    names = list(capacity[0])
    return names, np.array([[float(after[name][1]) for name in names] for after in capacity])


def layer_groups(names: Sequence[str], free: np.ndarray) -> list[tuple[str, list[int]]]:
    """Layers whose free dimensions are equal at every task (e.g. ``k_proj`` and ``v_proj``, which read the same
    input), as ``(label, column indices)``; labels drop the prefix common to all names."""
    prefix = os.path.commonprefix(list(names)).rpartition(".")[0]
    short = [n[len(prefix) + 1:] if prefix else n for n in names]
    groups: dict[tuple, list[int]] = {}
    for k in range(len(names)):
        groups.setdefault(tuple(free[:, k]), []).append(k)
    out = []
    for cols in groups.values():
        members = [short[k] for k in cols]
        head = os.path.commonprefix(members).rpartition(".")[0]
        label = members[0] if len(members) == 1 else (
            f"{head}.{{{', '.join(m[len(head) + 1:] for m in members)}}}" if head else " = ".join(members))
        out.append((label, cols))
    return out


# ---------------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _task_ticks(ax, names: Sequence[str], every: int = 1) -> None:
    ticks = list(range(1, len(names) + 1))[::every]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{k}\n{names[k - 1]}" if every == 1 else str(k) for k in ticks])


def _curves(ax, series: Series, marker: Optional[str]) -> None:
    """One line per method (the mean) with a shaded +- std band when it has more than one run."""
    for method, (mean, std, n) in series.items():
        x = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(x, mean, marker=marker, markersize=4, label=f"{method} (n={n})")
        if n > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)


def plot_quality_accuracy(result: Mapping, path: os.PathLike) -> Path:
    """Accuracy on the tasks seen so far after each task, every method of a ``quality.json`` (mean +- std over
    seeds); runs without an accuracy matrix (joint LoRA: final accuracies only) as a dashed reference at ``A_T``."""
    names = list(result["task_names"])
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    matrices = quality_matrices(result)
    _curves(ax, accuracy_series(matrices), marker="o")
    for method, runs in result["runs"].items():
        if method not in matrices and runs and all("final_accuracy" in r for r in runs):
            mean, std = mean_std([[100.0 * r["final_accuracy"]] for r in runs])
            ax.axhline(mean[0], color="black", linestyle="--", linewidth=1,
                       label=f"{method}: A_T, all tasks at once (n={len(runs)})")
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color="black", alpha=0.07, linewidth=0)
    _task_ticks(ax, names)
    ax.set_xlabel("after training task")
    ax.set_ylabel("mean accuracy on the tasks seen so far (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"Accuracy over the sequence, mean ± std over seeds {_seeds(result)}", fontsize=10)
    return _save(fig, path)


def plot_quality_forgetting(result: Mapping, path: os.PathLike) -> Path:
    """Forgetting of each old task (best earlier accuracy minus final accuracy, pp) as bars grouped by task, one bar
    per method, mean +- std over seeds; the last group is the mean over the old tasks (the table's forgetting)."""
    names = list(result["task_names"])
    per_method = forgetting_series(quality_matrices(result))
    groups = names[:-1] + ["mean (F)"]
    fig = _figure(max(7.5, 1.6 * len(groups) + 2), 4.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(per_method), 1)
    for k, (method, (mean, std, n)) in enumerate(per_method.items()):
        x = np.arange(len(mean)) + (k - (len(per_method) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=std, capsize=2, label=f"{method} (n={n})")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("old task")
    ax.set_ylabel("forgetting (pp): best earlier accuracy − final")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Forgetting per task after the last task, mean ± std over seeds {_seeds(result)}", fontsize=10)
    return _save(fig, path)


def plot_long_sequence_accuracy(runs: Sequence[Mapping], path: os.PathLike, title: str) -> Path:
    """Accuracy on the tasks seen so far over a long sequence, one line per method (mean +- std over its runs)."""
    by_method = long_sequence_matrices(runs)
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    _curves(ax, accuracy_series(by_method), marker=None)
    n_tasks = max(len(m) for ms in by_method.values() for m in ms)
    ax.set_xticks(range(1, n_tasks + 1, max(1, n_tasks // 15)))
    ax.set_xlabel("number of tasks learned")
    ax.set_ylabel("mean accuracy on the tasks seen so far (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _floor(ax, n_tasks: int, r: int) -> None:
    x = np.arange(1, n_tasks + 1)
    ax.plot(x, r * (n_tasks - x), color="black", linestyle=":", linewidth=1.2,
            label=f"r × tasks still to come (r={r})")


def plot_free_dimension(runs: Sequence[Mapping], path: os.PathLike, r: int, title: str) -> Path:
    """One panel per InfLoRA run of one seed (fixed, adaptive threshold): the free dimension of every adapted layer
    after each task (layers with equal values share a line), and ``r (T - t)``, what the tasks still to come need."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    runs = [run for run in runs if run["result"].get("extra", {}).get("capacity")]
    fig = _figure(6.0 * len(runs), 4.6)
    axes = [fig.add_subplot(1, len(runs), k + 1) for k in range(len(runs))]
    for ax, run in zip(axes, runs):
        names, free = free_dimensions(run["result"]["extra"]["capacity"])
        x = np.arange(1, len(free) + 1)
        groups = layer_groups(names, free)
        colors = [colormaps["viridis"](v) for v in np.linspace(0, 0.9, len(groups))]
        for (label, cols), color in zip(groups, colors):
            style = "--" if "fc" in label or "mlp" in label else "-"
            ax.plot(x, free[:, cols[0]], color=color, linestyle=style, linewidth=1.2, label=label)
        _floor(ax, len(run["result"]["task_names"]), r)
        ax.set_title(run["method"], fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("after training task")
        ax.set_ylabel(f"free input dimensions (of d_in = {_d_in([run])})")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_free_dimension_seeds(runs: Sequence[Mapping], path: os.PathLike, r: int, title: str) -> Path:
    """Fixed against adaptive threshold over several seeds: per method the median over the adapted layers of the
    free dimension after each task (solid) and the smallest and largest layer's (dashed), each the mean over the
    seeds."""
    from matplotlib.ticker import MaxNLocator

    by_method: dict[str, list[np.ndarray]] = {}
    for run in runs:
        if run["result"].get("extra", {}).get("capacity"):
            by_method.setdefault(run["method"], []).append(free_dimensions(run["result"]["extra"]["capacity"])[1])
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    n_tasks = 1
    for method, frees in by_method.items():
        lo, mid, hi = free_dimension_bands(frees)
        x = np.arange(1, len(mid) + 1)
        n_tasks = max(n_tasks, len(x))
        (line,) = ax.plot(x, mid, linewidth=2, label=f"{method}: median layer (n={len(frees)})")
        ax.plot(x, lo, color=line.get_color(), linestyle="--", linewidth=1, label=f"{method}: smallest, largest layer")
        ax.plot(x, hi, color=line.get_color(), linestyle="--", linewidth=1)
    _floor(ax, n_tasks, r)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("after training task")
    ax.set_ylabel(f"free input dimensions per layer (of d_in = {_d_in(runs)})")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _d_in(runs: Sequence[Mapping]) -> str:
    """The input width(s) of the adapted layers, ``memory_dim + free_dim``, as recorded in the capacity."""
    widths = {int(v[0] + v[1]) for run in runs for after in run["result"].get("extra", {}).get("capacity", [])
              for v in after.values()}
    return ", ".join(map(str, sorted(widths)))


def _seeds(result: Mapping) -> str:
    return ", ".join(str(s) for s in result.get("seeds", [])) or "?"


# ---------------------------------------------------------------------------------------------- writers
def write_quality_plots(result: Mapping, json_path: os.PathLike) -> list[Path]:
    """``<stem>_accuracy.png`` and ``<stem>_forgetting.png`` next to ``json_path`` (a bench_quality result)."""
    stem = Path(json_path).with_suffix("")
    paths = []
    if any(runs and all("accuracy_matrix" in r for r in runs) for runs in result["runs"].values()):
        paths.append(plot_quality_accuracy(result, f"{stem}_accuracy.png"))
        if len(result["task_names"]) > 1:
            paths.append(plot_quality_forgetting(result, f"{stem}_forgetting.png"))
    return paths


def write_long_sequence_plots(payload: Mapping, json_path: os.PathLike) -> list[Path]:
    """``<stem>_accuracy.png`` (every method) and ``<stem>_free_dimension.png`` (the InfLoRA runs' capacity) next
    to ``json_path`` (a bench_long_sequence result of one seed, or runs pooled over seeds by :func:`pool`)."""
    stem, args, runs = Path(json_path).with_suffix(""), payload["args"], payload["runs"]
    seeds = sorted({run.get("seed", args.get("seed")) for run in runs})
    setting = f"{args['tasks']} permuted-digit tasks, r = {args['r']}, lambda = {args['energy_threshold']}"
    paths = []
    if long_sequence_matrices(runs):  # a run stopped before its first task has no row to draw
        paths.append(plot_long_sequence_accuracy(runs, f"{stem}_accuracy.png", f"Long sequence: {setting}; " + (
            f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")))
    if any(run["result"].get("extra", {}).get("capacity") for run in runs):
        if len(seeds) > 1:
            paths.append(plot_free_dimension_seeds(runs, f"{stem}_free_dimension.png", args["r"],
                                                   f"Free dimension per layer: {setting}; mean over seeds "
                                                   f"{', '.join(map(str, seeds))}"))
        else:
            paths.append(plot_free_dimension(runs, f"{stem}_free_dimension.png", args["r"],
                                             f"Free dimension per layer after each task: {setting}, seed {seeds[0]}"))
    return paths


def pool(payloads: Sequence[Mapping]) -> dict:
    """Long-sequence results of several folders (seeds, or methods run apart) as one payload: each run tagged with
    its seed; a (method, seed) found again in a later payload replaces the earlier. The folders must share the
    sequence's settings (tasks, r, lambda, epochs, lr)."""
    keys = ("tasks", "r", "energy_threshold", "epochs", "lr")
    first = {k: payloads[0]["args"][k] for k in keys}
    runs: dict[tuple, dict] = {}
    for payload in payloads:
        setting = {k: payload["args"][k] for k in keys}
        if setting != first:
            raise ValueError(f"cannot pool long-sequence runs of different settings: {first} vs {setting}; pass "
                             "only folders of one setting")
        for run in payload["runs"]:
            runs[(run["method"], payload["args"]["seed"])] = {**run, "seed": payload["args"]["seed"]}
    return {"args": {**payloads[0]["args"], "seed": None}, "runs": list(runs.values())}


# ---------------------------------------------------------------------------------------------- command line
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    p = argparse.ArgumentParser(description="Draw the benchmark plots again from stored JSON.")
    p.add_argument("folders", nargs="+", help="result folders holding quality.json or long_sequence.json")
    p.add_argument("--out", default=None, help="pool the long-sequence folders (seeds) into one set of plots here; "
                                               "without it each folder gets its own plots")
    args = p.parse_args(argv)
    written: list[Path] = []
    long_sequence = []
    for folder in map(Path, args.folders):
        found = [f for f in ("quality.json", "quality_quick.json", "long_sequence.json", "long_sequence_quick.json")
                 if (folder / f).is_file()]
        if not found:
            raise SystemExit(f"{folder}: no quality.json or long_sequence.json in it; pass a results folder")
        for name in found:
            data = json.loads((folder / name).read_text())
            if name.startswith("quality"):
                if args.out:
                    raise SystemExit("pool quality runs with `bench_quality.py --merge`, then plot the merged folder")
                written += write_quality_plots(data, folder / name)
            elif args.out:
                long_sequence.append(data)
            else:
                written += write_long_sequence_plots(data, folder / name)
    if long_sequence:
        pooled = pool(long_sequence)
        pooled["pooled_from"] = [str(f) for f in args.folders]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        written += write_long_sequence_plots(pooled, out / "long_sequence.json")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
