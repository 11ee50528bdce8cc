"""The generation setting under DeepSpeed ZeRO-3, 2 processes over gloo on CPU (``generation_sharded_worker.py``):
TRL's SFTTrainer made continual and the ContinualTrainer with ``setting="generation"`` train two instruction tasks
on a tiny Llama with every parameter partitioned, evaluate them by greedy generation (``generate`` with
``synced_gpus``: both processes step together through the gathered layers), and end like one process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from launch import run_worker
from safetensors.torch import load_file


pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not torch.distributed.is_gloo_available(),
    reason="DeepSpeed (optional: `pip install deepspeed`) and torch.distributed's gloo are needed")]

# Measured, both runs against one process: ZeRO-3 memory <= 4.9e-4, past_A <= 1.5e-3, past_B <= 2.5e-5; ZeRO-2
# (the same optimizer, nothing partitioned) memory <= 5.4e-4, past_A <= 2.3e-3, past_B <= 1.8e-5. DeepSpeed's Adam
# at lr 5e-2 for 8 epochs drifts from torch's by that much; ZeRO-3 adds nothing to it.
ATOL = 5e-3


def _record(out: Path, rank: int) -> dict:
    return json.loads((out / f"result-rank{rank}.json").read_text())


def _assert_like_one_process(two: Path, one: Path, generations: int) -> None:
    """Both processes hold the same adapter, within ATOL of one process's; they generated the same answers as one
    process (the last ``generations`` evaluations), ``generate`` ran with ``synced_gpus`` on both and without in one
    process; A_t and a base weight were partitioned while each task trained; process 0 alone wrote each checkpoint."""
    r0, r1 = load_file(two / "final-rank0.safetensors"), load_file(two / "final-rank1.safetensors")
    single = load_file(one / "final-rank0.safetensors")
    assert r0.keys() == r1.keys() == single.keys()
    past = [v for k, v in single.items() if "inflora_past_A" in k and v.numel()]
    assert past and all(v.abs().max() > 1e-2 for v in past)  # trained away from zero: the comparison means something
    for key in single:
        assert torch.equal(r0[key], r1[key]), key
        torch.testing.assert_close(r0[key], single[key], atol=ATOL, rtol=0, msg=key)
    reference = _record(one, 0)
    assert reference["error"] is None and all(not any(g["synced_gpus"]) for g in reference["generations"])
    for rank in (0, 1):
        record = _record(two, rank)
        assert record["error"] is None, record["error"]
        assert record["accuracy_matrix"] == reference["accuracy_matrix"]
        answers = [g["answers"] for g in record["generations"]]
        assert answers == [g["answers"] for g in reference["generations"]][-generations:]
        assert all(g["prompts"] == 6 and g["synced_gpus"] == [True, True] for g in record["generations"])
        for probe in record["partitioned"]:  # placeholders outside the forward: half of each tensor per process
            for held in probe.values():
                assert held["status"] == "ZeroParamStatus.NOT_AVAILABLE" and held["data"] == 0, probe
                assert held["slice"] * 2 == held["whole"], probe
    assert json.loads((two / "saves-rank1.json").read_text()) == []
    learned = json.loads((two / "run" / "continual" / "after-task-02" / "progress.json").read_text())["tasks_done"]
    assert learned == 2


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft-one-process")
    run_worker("generation_sharded_worker.py", "sft_single", out, processes=1)
    return out


def test_trl_sft_trainer_under_zero3_learns_and_generates_like_one_process(tmp_path, sft_single):
    """ContinualSFTTrainer (SFTConfig's defaults, gradient checkpointing on; fp32) with a
    DeepSpeed ZeRO-3 config in its arguments."""
    run_worker("generation_sharded_worker.py", "sft_zero3", tmp_path)
    _assert_like_one_process(tmp_path, sft_single, generations=3)
    assert len(_record(tmp_path, 0)["partitioned"]) == 2
    assert json.loads((tmp_path / "saves-rank0.json").read_text()) == ["adapter_model.safetensors"] * 2
    result = _record(sft_single, 0)["accuracy_matrix"]
    assert result[0] == [1.0] and result[1][1] == 1.0  # the comparison is between runs that learned their tasks


def test_continual_trainer_generation_setting_under_zero3_like_one_process(tmp_path):
    """ContinualTrainer(setting="generation"): prompt/answer pairs, DataCollatorForSeq2Seq, exact-match answers."""
    single = tmp_path / "single"
    run_worker("generation_sharded_worker.py", "trainer_single", single, processes=1)
    run_worker("generation_sharded_worker.py", "trainer_zero3", tmp_path)
    _assert_like_one_process(tmp_path, single, generations=3)
    assert json.loads((tmp_path / "saves-rank0.json").read_text()) == ["adapter_model.safetensors"] * 2


def test_zero3_sft_run_killed_after_a_task_resumes_like_one_process(tmp_path, sft_single):
    """Both processes end (``os._exit``) after task 1's checkpoint; the restart with ``resume_from_checkpoint=True``
    trains task 2 only, partitioned, and ends where the uninterrupted one-process run ends."""
    run_worker("generation_sharded_worker.py", "sft_zero3", tmp_path, STOP_AFTER_TASK="1")
    continual = tmp_path / "run" / "continual"
    assert (continual / "after-task-01").is_dir() and not (continual / "after-task-02").exists()
    run_worker("generation_sharded_worker.py", "sft_zero3", tmp_path, RESUME="1")
    _assert_like_one_process(tmp_path, sft_single, generations=2)  # the evaluations after task 2 only
    assert len(_record(tmp_path, 0)["partitioned"]) == 1
    assert json.loads((tmp_path / "saves-rank0.json").read_text()) == ["adapter_model.safetensors"]
