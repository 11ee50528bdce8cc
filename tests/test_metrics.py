"""Specification tests for peft_inflora.continual (metrics, the result record, tables, plots).

Expected numbers are worked out by hand in this file (written as explicit arithmetic on the matrix entries, or
with the ``statistics`` module), never with the module's own code.
"""

import json
import math
import statistics

import numpy as np
import pytest

from peft_inflora.continual import (
    ContinualResult,
    average_incremental_accuracy,
    backward_transfer,
    compare_table,
    final_accuracy,
    forgetting,
    incremental_accuracies,
)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# a[i][j]: accuracy on task j after training task i. Task 0 improves while task 1 is learned (0.80 -> 0.90), so
# forgetting (which takes the max over earlier rows) differs from -BWT (which uses the diagonal).
TRIANGLE = [
    [0.80],
    [0.90, 0.60],
    [0.70, 0.50, 0.40],
]
# By hand:
#   A_T   = (0.70 + 0.50 + 0.40) / 3                              = 0.533333...
#   A_avg = (0.80 + (0.90 + 0.60) / 2 + (0.70 + 0.50 + 0.40) / 3) / 3 = (0.80 + 0.75 + 0.53333) / 3 = 0.694444...
#   BWT   = ((0.70 - 0.80) + (0.50 - 0.60)) / 2                     = -0.10
#   F     = ((max(0.80, 0.90) - 0.70) + (0.60 - 0.50)) / 2          = (0.20 + 0.10) / 2 = 0.15
A_T = (0.70 + 0.50 + 0.40) / 3
A_AVG = (0.80 + (0.90 + 0.60) / 2 + (0.70 + 0.50 + 0.40) / 3) / 3
BWT = ((0.70 - 0.80) + (0.50 - 0.60)) / 2
FORGET = ((0.90 - 0.70) + (0.60 - 0.50)) / 2

SQUARE_NONE = [
    [0.80, None, None],
    [0.90, 0.60, None],
    [0.70, 0.50, 0.40],
]
SQUARE_NAN = np.array([[0.80, np.nan, np.nan], [0.90, 0.60, np.nan], [0.70, 0.50, 0.40]])

NAMES = ["alpha", "beta", "gamma"]


def approx(x):
    return pytest.approx(x, abs=1e-12)


def assert_png(path, min_bytes=2000):
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:8] == PNG_MAGIC, "not a PNG file"
    assert len(data) > min_bytes, f"suspiciously small PNG ({len(data)} bytes)"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(pixels[..., :3].std()) > 0.01, "image is blank"


# ---------------------------------------------------------------------------------------------
# the four metrics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matrix", [TRIANGLE, SQUARE_NONE, SQUARE_NAN], ids=["triangle", "square-None", "square-NaN"])
def test_hand_computed_3x3(matrix):
    assert final_accuracy(matrix) == approx(A_T)
    assert average_incremental_accuracy(matrix) == approx(A_AVG)
    assert backward_transfer(matrix) == approx(BWT)
    assert forgetting(matrix) == approx(FORGET)
    # Literal values as a second check of the arithmetic above.
    assert final_accuracy(matrix) == pytest.approx(0.5333333333)
    assert average_incremental_accuracy(matrix) == pytest.approx(0.6944444444)
    assert backward_transfer(matrix) == pytest.approx(-0.10)
    assert forgetting(matrix) == pytest.approx(0.15)


def test_incremental_accuracies_is_the_row_means():
    assert incremental_accuracies(TRIANGLE) == [approx(0.80), approx(0.75), approx(A_T)]


def test_forgetting_max_excludes_the_last_row():
    # Task 0 ends above its only earlier measurement: forgetting is negative (0.5 - 0.6), not clipped to 0 and not
    # 0 (which a max that also ranged over the last row would give).
    assert forgetting([[0.5], [0.6, 0.9]]) == approx(-0.1)
    assert backward_transfer([[0.5], [0.6, 0.9]]) == approx(0.1)


def test_forgetting_max_ranges_over_rows_from_j_on():
    # Old task 1's max must be over rows 1..T-2 only (row 0 has no entry for it); old task 0's over rows 0..T-2.
    matrix = [[0.2], [0.3, 0.9], [0.1, 0.8, 0.7], [0.0, 0.6, 0.5, 0.4]]
    expected = ((0.3 - 0.0) + (0.9 - 0.6) + (0.7 - 0.5)) / 3
    assert forgetting(matrix) == approx(expected)
    assert backward_transfer(matrix) == approx(((0.0 - 0.2) + (0.6 - 0.9) + (0.5 - 0.7)) / 3)


def test_single_task():
    for matrix in ([[0.75]], ((0.75,),), np.array([[0.75]])):
        assert final_accuracy(matrix) == 0.75
        assert average_incremental_accuracy(matrix) == 0.75
        assert backward_transfer(matrix) == 0.0
        assert forgetting(matrix) == 0.0
    result = ContinualResult(["only"], [[0.75]])
    assert (result.final_accuracy, result.backward_transfer, result.forgetting) == (0.75, 0.0, 0.0)


def test_metrics_return_python_floats():
    for fn in (final_accuracy, average_incremental_accuracy, backward_transfer, forgetting):
        assert type(fn(TRIANGLE)) is float


@pytest.mark.parametrize(
    "matrix, message",
    [
        ([], "empty"),
        (None, "empty"),
        ([[0.5, 0.5]], "above the diagonal"),  # 1 x 2 rectangle with a value for task 1 before it was learned
        ([[0.5], [0.5]], "neither lower-triangular"),  # row 1 too short
        ([[0.5], [0.5, 0.5, 0.5]], "neither lower-triangular"),  # ragged
        ([[0.5, 0.1], [0.5, 0.5]], "above the diagonal"),  # square with a value for a task not yet learned
        ([[0.5], [0.5, 1.5]], "outside"),
        ([[-0.1]], "outside"),
        ([[85.0]], "percentages"),
        ([[0.5], [None, 0.5]], "must be a real number"),
        ([[0.5], [float("nan"), 0.5]], "missing"),
        ([[0.5], ["0.5", 0.5]], "must be a real number"),
        ([0.5], "sequence of rows"),
    ],
)
def test_invalid_matrices_raise_value_error(matrix, message):
    for fn in (final_accuracy, average_incremental_accuracy, backward_transfer, forgetting):
        with pytest.raises(ValueError, match=message):
            fn(matrix)
    if matrix not in ([], None):
        with pytest.raises(ValueError, match=message):
            ContinualResult(["a", "b", "c"], matrix)


def test_non_square_rectangle_with_fewer_columns_than_rows_is_rejected():
    with pytest.raises(ValueError, match="neither lower-triangular"):
        final_accuracy([[0.5, None], [0.5, 0.5], [0.5, 0.5]])


# ---------------------------------------------------------------------------------------------
# ContinualResult
# ---------------------------------------------------------------------------------------------
def test_result_properties_match_hand_values_and_store_the_triangle():
    result = ContinualResult(NAMES, SQUARE_NONE)
    assert result.accuracy_matrix == TRIANGLE  # stored as the lower triangle
    assert result.final_accuracy == approx(A_T)
    assert result.average_incremental_accuracy == approx(A_AVG)
    assert result.backward_transfer == approx(BWT)
    assert result.forgetting == approx(FORGET)
    assert result.num_tasks == 3 and result.num_learned == 3
    square = result.square_matrix()
    assert square.shape == (3, 3)
    assert np.isnan(square[0, 1]) and np.isnan(square[0, 2]) and np.isnan(square[1, 2])
    assert square[2, 1] == 0.50


def test_partial_matrix_metrics_use_the_rows_present():
    # 2 of 3 tasks learned. By hand on [[0.80], [0.90, 0.60]]:
    #   A_T = (0.90 + 0.60) / 2 = 0.75; A_avg = (0.80 + 0.75) / 2 = 0.775; BWT = 0.90 - 0.80 = 0.10;
    #   F = max(0.80) - 0.90 = -0.10
    for matrix in ([[0.80], [0.90, 0.60]], [[0.80, None, None], [0.90, 0.60, None]]):
        result = ContinualResult(NAMES, matrix)
        assert result.num_learned == 2 and result.num_tasks == 3
        assert result.final_accuracy == approx((0.90 + 0.60) / 2)
        assert result.average_incremental_accuracy == approx((0.80 + (0.90 + 0.60) / 2) / 2)
        assert result.backward_transfer == approx(0.90 - 0.80)
        assert result.forgetting == approx(0.80 - 0.90)
    assert final_accuracy([[0.80, None, None], [0.90, 0.60, None]]) == approx(0.75)


def test_more_rows_than_tasks_is_rejected():
    with pytest.raises(ValueError, match="only 2 tasks"):
        ContinualResult(["a", "b"], TRIANGLE)


def test_empty_result_has_no_metrics():
    result = ContinualResult(NAMES)
    assert result.accuracy_matrix == [] and result.metrics() == {}
    with pytest.raises(ValueError, match="empty"):
        result.final_accuracy
    with pytest.raises(ValueError, match="task_names is empty"):
        ContinualResult([])


def test_add_row_builds_the_matrix():
    result = ContinualResult(NAMES)
    for row in TRIANGLE:
        result.add_row(row)
    assert result.accuracy_matrix == TRIANGLE
    assert result.final_accuracy == approx(A_T)
    assert result.forgetting == approx(FORGET)


def test_add_row_with_timings():
    result = ContinualResult(NAMES)
    result.add_row([0.8], train_seconds=12.5, statistics_seconds=0.5)
    result.add_row(np.array([0.9, 0.6]), train_seconds=10, statistics_seconds=0.25)
    assert result.train_seconds == [12.5, 10.0]
    assert result.statistics_seconds == [0.5, 0.25]


@pytest.mark.parametrize(
    "row, message",
    [
        ([0.9], "exactly 2 accuracies"),  # too short
        ([0.9, 0.6, 0.5], "exactly 2 accuracies"),  # too long
        ([0.9, 1.2], "outside"),
        ([0.9, -0.01], "outside"),
        ([0.9, 60.0], "percentages"),
        ([0.9, float("nan")], "missing"),
        ([0.9, None], "must be a real number"),
        ("ab", "not a string"),
        (0.9, "sequence of numbers"),
    ],
)
def test_add_row_validation(row, message):
    result = ContinualResult(NAMES, [[0.8]], train_seconds=[1.0])
    with pytest.raises(ValueError, match=message):
        result.add_row(row)
    assert result.accuracy_matrix == [[0.8]], "a rejected row must leave the matrix unchanged"


def test_add_row_beyond_the_last_task_and_misaligned_timings():
    result = ContinualResult(["a", "b"], [[0.8], [0.7, 0.6]])
    with pytest.raises(ValueError, match="already have a row"):
        result.add_row([0.1, 0.2, 0.3])
    result = ContinualResult(NAMES, [[0.8]])  # no timing recorded for task 0
    with pytest.raises(ValueError, match="train_seconds has 0 entries"):
        result.add_row([0.7, 0.6], train_seconds=3.0)
    assert result.accuracy_matrix == [[0.8]] and result.train_seconds == []
    with pytest.raises(ValueError, match=">= 0"):
        ContinualResult(NAMES, [[0.8]], train_seconds=[-1.0])
    with pytest.raises(ValueError, match="only 3 tasks"):
        ContinualResult(NAMES, [[0.8]], statistics_seconds=[1.0, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
def _reject_constant(name):
    raise AssertionError(f"non-standard JSON constant {name} in the file")


@pytest.mark.parametrize("matrix", [SQUARE_NAN, [[0.1 + 0.2], [1 / 3, 2 / 3]]], ids=["full", "partial"])
def test_json_round_trip_is_exact_and_nan_free(tmp_path, matrix):
    result = ContinualResult(
        NAMES,
        matrix,
        train_seconds=[1.25, 2 / 7],
        statistics_seconds=[0.1],
        extra={"method": "InfLoRA", "seed": 3, "config": {"r": 10, "lr": 5e-4, "targets": ["q", "v"]}},
    )
    path = result.to_json(tmp_path / "sub" / "result.json")
    text = open(path, encoding="utf-8").read()
    assert "NaN" not in text and "null" not in text
    data = json.loads(text, parse_constant=_reject_constant)
    assert [len(row) for row in data["accuracy_matrix"]] == list(range(1, result.num_learned + 1))
    loaded = ContinualResult.from_json(path)
    assert loaded == result
    assert loaded.accuracy_matrix == result.accuracy_matrix  # bit-exact floats (e.g. 0.1 + 0.2, 1/3)
    assert loaded.extra["config"]["lr"] == 5e-4
    assert ContinualResult.from_dict(result.to_dict()) == result


def test_json_metrics_entry_is_informational(tmp_path):
    result = ContinualResult(NAMES, TRIANGLE)
    data = json.loads(open(result.to_json(tmp_path / "r.json")).read())
    assert data["metrics"]["forgetting"] == approx(FORGET)
    data["metrics"]["forgetting"] = 99.0  # ignored on load: metrics are recomputed from the matrix
    assert ContinualResult.from_dict(data).forgetting == approx(FORGET)


def test_json_rejects_nan_in_extra_and_foreign_records(tmp_path):
    result = ContinualResult(NAMES, TRIANGLE, extra={"loss": float("nan")})
    with pytest.raises(ValueError, match="strict JSON"):
        result.to_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="format"):
        ContinualResult.from_dict({"format": "something-else", "task_names": ["a"]})


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def test_summary_table_contents():
    result = ContinualResult(NAMES, TRIANGLE, extra={"method": "InfLoRA-test"})
    table = result.summary_table()
    lines = table.splitlines()
    assert "InfLoRA-test" in lines[0] and "3 of 3" in lines[0]
    assert "| after task | 1: alpha | 2: beta | 3: gamma |" in lines
    assert "| 1: alpha | 80.00 |  |  |" in lines
    assert "| 2: beta | 90.00 | 60.00 |  |" in lines
    assert "| 3: gamma | 70.00 | 50.00 | 40.00 |" in lines
    # 100 * A_T = 53.333.., 100 * A_avg = 69.444.., 100 * BWT = -10, 100 * F = 15.
    assert "| final accuracy A_T (%) | 53.33 |" in lines
    assert "| average incremental accuracy A_avg (%) | 69.44 |" in lines
    assert "| backward transfer BWT (pp) | -10.00 |" in lines
    assert "| forgetting F (pp) | 15.00 |" in lines
    assert "| 3: gamma | 70.0 | 50.0 | 40.0 |" in result.summary_table(digits=1).splitlines()


def test_summary_table_partial_and_empty():
    partial = ContinualResult(NAMES, [[0.8], [0.9, 0.6]]).summary_table()
    assert "2 of 3" in partial
    assert "| 2: beta | 90.00 | 60.00 |  |" in partial.splitlines()
    assert not any(line.startswith("| 3: gamma |") for line in partial.splitlines())  # no row for task 3 yet
    assert "| final accuracy A_T (%) | 75.00 |" in partial.splitlines()
    single = ContinualResult(["x"], [[1.0]]).summary_table()
    assert "| backward transfer BWT (pp) | 0.00 |" in single.splitlines()
    tiny_drop = ContinualResult(["x", "y"], [[0.5], [0.499999, 0.5]]).summary_table()  # BWT = -1e-6
    assert "| backward transfer BWT (pp) | 0.00 |" in tiny_drop.splitlines()  # rounds to 0.00, never "-0.00"
    empty = ContinualResult(NAMES).summary_table()
    assert "| final accuracy A_T (%) | n/a |" in empty.splitlines()


def test_summary_table_escapes_pipes_in_names():
    table = ContinualResult(["a|b"], [[0.5]]).summary_table()
    assert "1: a\\|b" in table


def _seed_run(d, x, y, seed):
    # 2 tasks: a = [[d], [x, y]]  =>  A_T = (x + y) / 2, A_avg = (d + (x + y) / 2) / 2, BWT = x - d, F = d - x
    return ContinualResult(["t1", "t2"], [[d], [x, y]], extra={"method": "m", "seed": seed})


def test_compare_table_mean_and_std_over_three_seeds():
    runs = [_seed_run(0.8, 0.6, 0.8, 0), _seed_run(0.9, 0.8, 0.8, 1), _seed_run(1.0, 1.0, 1.0, 2)]
    # Per-seed values in % by hand: A_T 70, 80, 100; A_avg 75, 85, 100; BWT -20, -10, 0; F 20, 10, 0.
    a_t = [70.0, 80.0, 100.0]
    a_avg = [75.0, 85.0, 100.0]
    bwt = [-20.0, -10.0, 0.0]
    forget = [20.0, 10.0, 0.0]
    single = ContinualResult(["t1", "t2"], [[0.5], [0.25, 0.75]])  # A_T 50, A_avg 50, BWT -25, F 25
    table = compare_table({"InfLoRA": runs, "baseline": single})
    lines = table.splitlines()
    assert lines[0] == "| method | runs | A_T (%) | A_avg (%) | BWT (pp) | forgetting (pp) |"

    def fmt(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"  # sample std (n - 1)

    expected = f"| InfLoRA | 3 | {fmt(a_t)} | {fmt(a_avg)} | {fmt(bwt)} | {fmt(forget)} |"
    assert expected in lines
    # The same row with literal numbers: mean 83.33, stdev sqrt(((70-83.33)^2 + (80-83.33)^2 + (100-83.33)^2) / 2).
    assert "| InfLoRA | 3 | 83.33 ± 15.28 | 86.67 ± 12.58 | -10.00 ± 10.00 | 10.00 ± 10.00 |" in lines
    assert "| baseline | 1 | 50.00 | 50.00 | -25.00 | 25.00 |" in lines


def test_compare_table_population_std_and_validation():
    runs = [_seed_run(0.8, 0.6, 0.8, 0), _seed_run(0.9, 0.8, 0.8, 1), _seed_run(1.0, 1.0, 1.0, 2)]
    table = compare_table({"m": runs}, ddof=0)
    assert f"{statistics.pstdev([-20.0, -10.0, 0.0]):.2f}" == "8.16"
    assert "-10.00 ± 8.16" in table
    assert "| m | 1 | 70.00 | 75.00 | -20.00 | 20.00 |" in compare_table({"m": runs[:1]}).splitlines()
    with pytest.raises(ValueError, match="at least one method"):
        compare_table({})
    with pytest.raises(ValueError, match="empty list"):
        compare_table({"m": []})
    with pytest.raises(ValueError, match="different numbers"):
        compare_table({"m": [runs[0], ContinualResult(["t1", "t2"], [[0.5]])]})


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def test_plot_accuracy_matrix_writes_a_png(tmp_path):
    result = ContinualResult(NAMES, TRIANGLE)
    path = result.plot_accuracy_matrix(tmp_path / "plots" / "matrix.png")
    assert path == str(tmp_path / "plots" / "matrix.png")
    assert_png(path)
    partial = ContinualResult(NAMES, [[0.8], [0.9, 0.6]])
    assert_png(partial.plot_accuracy_matrix(str(tmp_path / "partial.png")))
    with pytest.raises(ValueError, match="no row"):
        ContinualResult(NAMES).plot_accuracy_matrix(tmp_path / "empty.png")


def test_plot_accuracy_curve_writes_a_png(tmp_path):
    result = ContinualResult(NAMES, TRIANGLE)
    seeds = [ContinualResult(NAMES, [[0.7], [0.6, 0.5], [0.5, 0.4, 0.3]]) for _ in range(2)]
    seeds.append(ContinualResult(NAMES, [[0.75], [0.65, 0.55], [0.45, 0.35, 0.35]]))
    others = {"seq-LoRA": ContinualResult(NAMES, [[0.9], [0.1, 0.9]]), "seeds": seeds}
    path = result.plot_accuracy_curve(tmp_path / "curve.png", others=others)
    assert path == str(tmp_path / "curve.png")
    assert_png(path)
    alone = result.plot_accuracy_curve(tmp_path / "alone.png")
    assert_png(alone)
    assert open(path, "rb").read() != open(alone, "rb").read()  # the other methods were drawn


def test_constant_matrix():
    # A_avg of a constant matrix is that constant, exactly as a mean of equal floats.
    matrix = [[0.5], [0.5, 0.5], [0.5, 0.5, 0.5]]
    assert average_incremental_accuracy(matrix) == 0.5 and final_accuracy(matrix) == 0.5
    assert math.isclose(backward_transfer(matrix), 0.0) and forgetting(matrix) == 0.0
