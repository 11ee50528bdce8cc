"""Task scores through ``evaluate``: the shipped accuracy / exact_match modules (offline, equal to numpy), a user's
metric per task (an evaluate module from a local path, a function), the run-wide ``eval_metric``, and refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from continual_fixtures import inflora_bert, tasks, training_args

from peft_inflora import ContinualTask, ContinualTrainer
from peft_inflora.continual.evaluation import (
    SHIPPED_METRICS_DIR,
    TaskMetric,
    classification_accuracy,
    exact_match,
    load_metric,
)


HERE = Path(__file__).parent
ROOT = HERE.parent

OFFLINE_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from peft_inflora.continual.evaluation import classification_accuracy, exact_match, load_metric
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(37, 9)).astype(np.float32)
    labels = rng.integers(2, 6, size=37)
    reference = float(np.mean(np.argmax(logits[:, 2:6], axis=-1) + 2 == labels))
    accuracy = classification_accuracy(logits, labels, (2, 6))
    module = load_metric("accuracy").compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])
    em = exact_match([" Green", "dog  house", "cat"], ["green", "Dog house", "dog"])
    print(json.dumps({"accuracy": accuracy, "reference": reference, "module": module, "em": em,
                      "loaded": sorted(m for m in sys.modules if m.startswith("evaluate_modules"))}))
""")


def test_the_shipped_metrics_load_offline_with_an_empty_cache_and_equal_numpy(tmp_path):
    """A fresh HF cache, every Hub switch offline and the Hub endpoint pointing nowhere: nothing can be fetched."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-c", OFFLINE_CHECK], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["accuracy"] == out["reference"]  # bit for bit: the same float64 mean
    assert out["module"] == {"accuracy": 0.75}
    assert out["em"] == pytest.approx(2 / 3)
    assert any("accuracy" in m for m in out["loaded"]) and any("exact_match" in m for m in out["loaded"])


def test_the_shipped_modules_are_evaluate_metrics_with_one_import_per_line():
    for name in ("accuracy", "exact_match"):
        script = SHIPPED_METRICS_DIR / name / f"{name}.py"
        imports = [line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert imports and all("," not in line for line in imports)
        assert type(load_metric(name)).__mro__[1].__name__ == "Metric"
        assert load_metric(name).name == name


def test_the_wheel_ships_the_metric_modules(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("peft_inflora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("accuracy", "exact_match"):
        assert f"peft_inflora/continual/evaluate_metrics/{name}/{name}.py" in names


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_accuracy_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    logits, labels = rng.normal(size=(50, 7)), rng.integers(0, 7, size=50)
    for classes in ((0, 7), (0, 4), (3, 7)):
        lo, hi = classes
        assert classification_accuracy(logits, labels, classes) == float(
            np.mean(np.argmax(logits[:, lo:hi], axis=-1) + lo == labels))


def test_exact_match_normalises_case_and_whitespace_and_refuses_empty_input():
    assert exact_match(["A  b ", "c"], ["a b", "d"]) == 0.5
    with pytest.raises(ValueError, match="as many predictions as references"):
        exact_match([], [])


# ---------------------------------------------------------------------------------------------- in the trainer
@pytest.fixture(scope="module")
def user_metric_script(tmp_path_factory) -> Path:
    """A user's own evaluate module in a local folder: the fraction of even predictions (not accuracy)."""
    folder = tmp_path_factory.mktemp("metrics") / "even_rate"
    folder.mkdir()
    (folder / "even_rate.py").write_text(textwrap.dedent('''
        import datasets
        import evaluate


        class EvenRate(evaluate.Metric):
            def _info(self):
                return evaluate.MetricInfo(description="even", citation="", inputs_description="",
                                           features=datasets.Features({"predictions": datasets.Value("int64"),
                                                                       "references": datasets.Value("int64")}))

            def _compute(self, predictions, references):
                return {"even_rate": sum(p % 2 == 0 for p in predictions) / len(predictions), "count": 0}
    '''))
    return folder


def test_each_task_can_have_its_own_metric_and_the_matrix_holds_its_scores(tmp_path, user_metric_script):
    seen = {}

    def half_right(predictions, references):
        seen.setdefault("calls", []).append((np.asarray(predictions).copy(), np.asarray(references).copy()))
        return {"half": float(np.mean(np.asarray(predictions) == np.asarray(references))) / 2}

    seq = tasks((2, 3))
    seq[0].metric, seq[0].metric_key = half_right, "half"
    seq[1].metric, seq[1].metric_key = str(user_metric_script), "even_rate"
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, num_train_epochs=1))
    result = trainer.train_continual(seq)
    # task 0 after each task: half of numpy's accuracy on the predictions the metric received
    for row, (predictions, references) in zip(result.accuracy_matrix, seen["calls"]):
        assert row[0] == float(np.mean(predictions == references)) / 2
        assert set(np.unique(references)) <= {0, 1}
    predictions = trainer.predict(trainer._eval_datasets[1]).predictions
    even = np.argmax(predictions[:, :5], axis=-1)
    assert result.accuracy_matrix[1][1] == float(np.mean(even % 2 == 0))
    assert result.extra["tasks"]["t0"]["metric"] == "half_right:half"
    assert result.extra["tasks"]["t1"]["metric"] == "even_rate:even_rate"
    card = (tmp_path / "continual" / "after-task-02" / "README.md").read_text()
    assert "| `t0` | 2 (global 0..1) | 48 | 24 | half_right:half | learned |" in card


def test_the_default_scores_equal_numpy_on_the_trainer_predictions(tmp_path):
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, num_train_epochs=1))
    result = trainer.train_continual(tasks((2, 3)))
    for j, (lo, hi) in enumerate([(0, 5), (0, 5)]):
        output = trainer.predict(trainer._eval_datasets[j])
        expected = float(np.mean(np.argmax(output.predictions[:, lo:hi], axis=-1) == output.label_ids))
        assert result.accuracy_matrix[1][j] == expected
    assert result.extra["tasks"]["t0"]["metric"] == "accuracy"


def test_eval_metric_names_the_run_wide_metric(tmp_path, user_metric_script):
    args = training_args(tmp_path, num_train_epochs=1, eval_metric=str(user_metric_script),
                         eval_metric_key="even_rate")
    trainer = ContinualTrainer(model=inflora_bert(), args=args)
    result = trainer.train_continual(tasks((2,)))
    predictions = np.argmax(trainer.predict(trainer._eval_datasets[0]).predictions[:, :2], axis=-1)
    assert result.accuracy_matrix[0][0] == float(np.mean(predictions % 2 == 0))


@pytest.mark.parametrize("overrides, match", [
    ({"eval_metric_key": "rougeL"}, "set eval_metric too"),
    ({"eval_metric": ""}, "eval_metric must be a name"),
])
def test_bad_metric_options_are_refused_in_the_arguments(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        training_args(tmp_path, **overrides)


def test_a_metric_that_does_not_load_fails_before_training(tmp_path):
    model = inflora_bert()
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1))
    seq = tasks((2, 2))
    seq[1].metric = str(tmp_path / "no_such_metric")
    with pytest.raises(FileNotFoundError):
        trainer.train_continual(seq)
    assert model.tasks_done() == 0 and not (tmp_path / "continual").exists()


def test_a_score_outside_zero_one_or_an_ambiguous_dict_is_refused_with_a_hint(user_metric_script):
    with pytest.raises(ValueError, match=r"scores in \[0, 1\]"):
        TaskMetric(lambda p, r: 42.0)([0], [0])
    with pytest.raises(ValueError, match="metric_key="):
        TaskMetric(lambda p, r: {"precision": 0.5, "recall": 1.0})([0, 1], [0, 1])  # two entries, no key
    with pytest.raises(TypeError, match="evaluate module"):
        TaskMetric(3)
    assert ContinualTask("t", metric=TaskMetric()).metric is not None
