"""benchmarks/_plots.py: the numbers each benchmark plot draws equal an independent numpy computation, and every
plot writer (and the command line) writes non-empty PNGs from small synthetic result dicts.

Fast (no model, no training): the plots of the real runs are in benchmarks/results/ and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from peft_inflora.continual.metrics import final_accuracy, forgetting


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_plots():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmark_plots_module", BENCHMARKS / "_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P = load_plots()


def triangle(rng: np.random.Generator, n_tasks: int) -> list[list[float]]:
    """A random accuracy matrix as the benchmarks store it: row i holds a[i][0..i]."""
    return [list(rng.uniform(0.0, 1.0, size=i + 1)) for i in range(n_tasks)]


def square(matrix: list[list[float]]) -> np.ndarray:
    """The same matrix as a float64 T x T array with NaN above the diagonal."""
    out = np.full((len(matrix), len(matrix)), np.nan)
    for i, row in enumerate(matrix):
        out[i, : i + 1] = row
    return out


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something is drawn, not a blank canvas


def capacity(rng: np.random.Generator, n_tasks: int, layers: list[str], d_in: int = 16) -> list[dict]:
    """``extra["capacity"]`` as the trainer records it: per task {layer: [memory_dim, free_dim, threshold]}, the
    memory growing; the first two layers read the same input (equal values, like k_proj and v_proj)."""
    memory = np.zeros(len(layers), dtype=int)
    out = []
    for _ in range(n_tasks):
        memory = np.minimum(d_in, memory + rng.integers(0, 3, size=len(layers)))
        memory[1] = memory[0]
        out.append({name: [int(m), int(d_in - m), 0.99] for name, m in zip(layers, memory)})
    return out


# ---------------------------------------------------------------------------------------------- the numbers
def test_seen_accuracy_is_the_row_mean_over_the_tasks_seen_so_far():
    matrix = triangle(np.random.default_rng(0), 5)
    expected = 100.0 * np.nanmean(square(matrix), axis=1)
    np.testing.assert_allclose(P.seen_accuracy(matrix), expected, rtol=0, atol=1e-12)
    assert P.seen_accuracy(matrix)[-1] == pytest.approx(100.0 * final_accuracy(matrix))


def test_forgetting_per_task_is_the_best_earlier_accuracy_minus_the_final_one():
    matrix = triangle(np.random.default_rng(1), 6)
    a = square(matrix)
    expected = 100.0 * (np.nanmax(a[:-1, :-1], axis=0) - a[-1, :-1])  # rows j..T-2 of column j (NaN above)
    got = P.forgetting_per_task(matrix)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got.shape == (5,) and got.mean() == pytest.approx(100.0 * forgetting(matrix))
    assert P.forgetting_per_task(matrix[:1]).shape == (0,)


def test_forgetting_per_task_ignores_the_last_row_when_taking_the_best():
    # task 0: 0.5 after task 0, 0.9 after task 1, 0.2 at the end: forgot 0.9 - 0.2; task 1 rose: -0.1
    assert P.forgetting_per_task([[0.5], [0.9, 0.6], [0.2, 0.7, 1.0]]) == pytest.approx([70.0, -10.0])


def test_mean_std_over_runs_is_numpys_sample_std_and_cuts_to_the_shortest_run():
    rng = np.random.default_rng(2)
    runs = rng.normal(size=(3, 7))
    mean, std = P.mean_std(list(runs))
    np.testing.assert_allclose(mean, runs.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(std, runs.std(axis=0, ddof=1), atol=1e-12)
    mean, std = P.mean_std([runs[0], runs[1, :4]])
    np.testing.assert_allclose(mean, runs[:2, :4].mean(axis=0), atol=1e-12)
    np.testing.assert_array_equal(P.mean_std([runs[0]])[1], np.zeros(7))
    with pytest.raises(ValueError, match="at least one run"):
        P.mean_std([])


def test_accuracy_and_forgetting_series_per_method_equal_numpy_over_seeds():
    rng = np.random.default_rng(3)
    matrices = {"A": [triangle(rng, 4) for _ in range(3)], "B": [triangle(rng, 4) for _ in range(2)]}
    acc = P.accuracy_series(matrices)
    fgt = P.forgetting_series(matrices)
    for method, runs in matrices.items():
        curves = np.array([100.0 * np.nanmean(square(m), axis=1) for m in runs])
        np.testing.assert_allclose(acc[method][0], curves.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(acc[method][1], curves.std(axis=0, ddof=1), atol=1e-12)
        per_task = np.array([100.0 * (np.nanmax(square(m)[:-1, :-1], axis=0) - square(m)[-1, :-1]) for m in runs])
        with_mean = np.column_stack([per_task, per_task.mean(axis=1)])
        np.testing.assert_allclose(fgt[method][0], with_mean.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(fgt[method][1], with_mean.std(axis=0, ddof=1), atol=1e-12)
        # the last bar is the table's forgetting, mean over the seeds
        assert fgt[method][0][-1] == pytest.approx(100.0 * np.mean([forgetting(m) for m in runs]))
        assert acc[method][2] == fgt[method][2] == len(runs)


def test_free_dimensions_and_their_bands_over_layers_and_seeds():
    rng = np.random.default_rng(4)
    layers = ["vit.layers.0.attention.k_proj", "vit.layers.0.attention.v_proj", "vit.layers.0.mlp.fc1",
              "vit.layers.1.mlp.fc1"]
    caps = [capacity(rng, 6, layers) for _ in range(2)]
    names, free = P.free_dimensions(caps[0])
    assert names == layers
    np.testing.assert_array_equal(free, [[after[n][1] for n in layers] for after in caps[0]])
    frees = [P.free_dimensions(c)[1] for c in caps]
    lo, mid, hi = P.free_dimension_bands(frees)
    stacked = np.stack(frees)  # (seeds, T, layers)
    np.testing.assert_allclose(lo, stacked.min(axis=2).mean(axis=0))
    np.testing.assert_allclose(mid, np.median(stacked, axis=2).mean(axis=0))
    np.testing.assert_allclose(hi, stacked.max(axis=2).mean(axis=0))
    with pytest.raises(ValueError, match="only InfLoRA runs record it"):
        P.free_dimensions([])


def test_layers_with_equal_free_dimensions_share_one_line():
    names = ["vit.layers.0.attention.k_proj", "vit.layers.0.attention.v_proj", "vit.layers.0.mlp.fc1",
             "vit.layers.1.mlp.fc1"]
    free = np.array([[10.0, 10.0, 12.0, 12.0], [8.0, 8.0, 11.0, 9.0]])  # layer 1's fc1 differs at the 2nd task
    assert P.layer_groups(names, free) == [("0.attention.{k_proj, v_proj}", [0, 1]), ("0.mlp.fc1", [2]),
                                           ("1.mlp.fc1", [3])]


# ---------------------------------------------------------------------------------------------- the files
def quality_result(rng: np.random.Generator) -> dict:
    names = ["t0", "t1", "t2"]
    runs = {m: [{"task_names": names, "accuracy_matrix": triangle(rng, 3)} for _ in range(2)]
            for m in ("InfLoRA eigen", "sequential LoRA")}
    runs["joint LoRA"] = [{"task_names": names, "accuracies": [0.8, 0.7, 0.9], "final_accuracy": 0.8},
                          {"task_names": names, "accuracies": [0.7, 0.7, 0.9], "final_accuracy": 0.7667}]
    return {"seeds": [0, 1], "methods": list(runs), "task_names": names, "runs": runs}


def long_sequence_payload(rng: np.random.Generator, seed: int, n_tasks: int = 5) -> dict:
    layers = ["vit.layers.0.attention.k_proj", "vit.layers.0.attention.v_proj", "vit.layers.0.mlp.fc1"]
    runs = []
    for method in ("InfLoRA fixed", "InfLoRA adaptive", "sequential LoRA"):
        extra = {"capacity": capacity(rng, n_tasks, layers)} if method.startswith("InfLoRA") else {}
        runs.append({"method": method, "result": {"task_names": [f"perm{k}" for k in range(n_tasks)],
                                                  "accuracy_matrix": triangle(rng, n_tasks), "extra": extra}})
    return {"args": {"tasks": n_tasks, "r": 2, "energy_threshold": 0.99, "epochs": 1.0, "lr": 0.01, "seed": seed},
            "runs": runs}


def test_write_quality_plots_writes_accuracy_and_forgetting_pngs_next_to_the_json(tmp_path):
    paths = P.write_quality_plots(quality_result(np.random.default_rng(5)), tmp_path / "quality.json")
    assert [p.name for p in paths] == ["quality_accuracy.png", "quality_forgetting.png"]
    for path in paths:
        assert_png(path)


def test_write_long_sequence_plots_one_seed_and_pooled_seeds(tmp_path):
    rng = np.random.default_rng(6)
    one = P.write_long_sequence_plots(long_sequence_payload(rng, 0), tmp_path / "long_sequence_quick.json")
    assert [p.name for p in one] == ["long_sequence_quick_accuracy.png", "long_sequence_quick_free_dimension.png"]
    pooled = P.pool([long_sequence_payload(rng, 0), long_sequence_payload(rng, 1)])
    assert sorted((r["method"], r["seed"]) for r in pooled["runs"]) == sorted(
        (m, s) for m in ("InfLoRA fixed", "InfLoRA adaptive", "sequential LoRA") for s in (0, 1))
    many = P.write_long_sequence_plots(pooled, tmp_path / "pooled" / "long_sequence.json")
    for path in one + many:
        assert_png(path)


def test_a_long_sequence_without_accuracy_rows_or_capacity_writes_no_plot(tmp_path):
    payload = long_sequence_payload(np.random.default_rng(9), 0)
    payload["runs"] = [payload["runs"][2]]  # sequential LoRA only: no capacity
    assert [p.name for p in P.write_long_sequence_plots(payload, tmp_path / "a.json")] == ["a_accuracy.png"]
    payload["runs"][0]["result"]["accuracy_matrix"] = []  # stopped before the first task ended
    assert P.write_long_sequence_plots(payload, tmp_path / "b.json") == []


def test_pool_replaces_a_rerun_and_refuses_different_settings():
    rng = np.random.default_rng(7)
    first, rerun = long_sequence_payload(rng, 0), long_sequence_payload(rng, 0)
    pooled = P.pool([first, rerun])
    assert len(pooled["runs"]) == 3 and pooled["runs"][0]["result"] is rerun["runs"][0]["result"]
    other = long_sequence_payload(rng, 1, n_tasks=4)
    with pytest.raises(ValueError, match="different settings"):
        P.pool([first, other])


def test_command_line_redraws_each_folder_and_pools_long_sequence_seeds(tmp_path):
    rng = np.random.default_rng(8)
    (tmp_path / "quality").mkdir()
    (tmp_path / "quality" / "quality.json").write_text(json.dumps(quality_result(rng)))
    for seed in (0, 1):
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "long_sequence.json").write_text(json.dumps(long_sequence_payload(rng, seed)))
    written = P.main([str(tmp_path / "quality"), str(tmp_path / "seed0")])
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "quality/quality_accuracy.png", "quality/quality_forgetting.png",
        "seed0/long_sequence_accuracy.png", "seed0/long_sequence_free_dimension.png"}
    pooled = P.main([str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--out", str(tmp_path / "both")])
    assert [p.name for p in pooled] == ["long_sequence_accuracy.png", "long_sequence_free_dimension.png"]
    assert all(p.parent == tmp_path / "both" for p in pooled)
    with pytest.raises(SystemExit, match="no quality.json or long_sequence.json"):
        P.main([str(tmp_path / "both")])
