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
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_llama

import peft_inflora  # noqa: F401  (registers INFLORA with PEFT for PeftModel.from_pretrained)


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


@pytest.mark.parametrize("precision", ["BF16", "FP16"])
def test_zero3_16_bit_training_trains_a_t_in_16_bits_and_keeps_the_method_exact_in_float32(tmp_path, precision):
    """``bf16=True`` with ``"bf16": {"enabled": "auto"}`` (a 7B run's usual set-up), or ``fp16=True`` with
    ``"fp16": {"enabled": "auto"}`` (DeepSpeed's fp16 optimizer, dynamic loss scaling): DeepSpeed trains the model,
    A_t included, in 16 bits; the memory and the past factors stay float32, so task 2's designed rows are orthogonal
    to task 1's memory (float32 accuracy) and the memory orthonormal; both processes stay identical and the
    checkpoint loads. Measured: bf16 |B_2 M_1| <= 1.9e-7, |M^T M - I| <= 3.1e-8; fp16 2.8e-7, 4.0e-8 (fp32 ZeRO-3:
    1.6e-7, 2.9e-8)."""
    run_worker("generation_sharded_worker.py", "sft_zero3", tmp_path, **{precision: "1"})
    dtype = {"BF16": "torch.bfloat16", "FP16": "torch.float16"}[precision]
    r0, r1 = load_file(tmp_path / "final-rank0.safetensors"), load_file(tmp_path / "final-rank1.safetensors")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[key], r1[key]) for key in r0)
    record = _record(tmp_path, 0)
    assert record["error"] is None, record["error"]
    assert record["accuracy_matrix"][0] == [1.0] and record["accuracy_matrix"][1][1] == 1.0
    assert [probe["A_t"]["dtype"] for probe in record["partitioned"]] == [dtype] * 2
    assert [probe["base"]["dtype"] for probe in record["partitioned"]] == [dtype] * 2
    continual = tmp_path / "run" / "continual"
    first = load_file(continual / "after-task-01" / "adapter_model.safetensors")
    second = load_file(continual / "after-task-02" / "adapter_model.safetensors")
    memories = [key for key in first if key.endswith("inflora_memory")]
    assert len(memories) == 8  # q/k/v share one memory per block, gate/up another: 4 input groups x 2 blocks
    for key in memories:
        layer = key[: -len("inflora_memory")]
        m1, m2, past_b = first[key], second[key], second[layer + "inflora_past_B"]
        assert m1.dtype == m2.dtype == past_b.dtype == torch.float32
        r1_, r2_ = second[layer + "inflora_task_ranks"].tolist()
        b2 = past_b[r1_: r1_ + r2_].double()  # task 2's designed rows (r x d_in)
        assert (b2 @ m1.double()).abs().max() < 1e-5, key
        eye = torch.eye(m2.shape[1], dtype=torch.float64)
        assert (m2.double().T @ m2.double() - eye).abs().max() < 1e-5, key
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(continual / "after-task-02")).state_dict()
    for key, tensor in r0.items():
        if "inflora_A" not in key:  # the empty 16-bit A_t of the finished task is cast to the model's float32
            assert torch.equal(loaded[key], tensor), key


def test_zero3_sft_run_killed_inside_a_task_resumes_from_its_trainer_checkpoint_bit_for_bit(tmp_path):
    """``save_strategy="steps"`` (every 4 steps): both processes end after step 6 of task 2; the restart with
    ``resume_from_checkpoint=True`` reloads task 1's checkpoint, runs task 2's ``begin_task`` again and resumes
    DeepSpeed's engine from task 2's ``checkpoint-4`` (its first step is 5), and ends bit for bit where an
    uninterrupted run with the same checkpoints ends."""
    straight, out = tmp_path / "straight", tmp_path / "killed"
    run_worker("generation_sharded_worker.py", "sft_zero3", straight, SAVE_STEPS="4")
    run_worker("generation_sharded_worker.py", "sft_zero3", out, SAVE_STEPS="4", STOP_AT_STEP="2:6")
    continual = out / "run" / "continual"
    assert not (continual / "after-task-02").exists()
    assert sorted(p.name for p in (continual / "task-02-animals").iterdir()) == ["checkpoint-4"]
    run_worker("generation_sharded_worker.py", "sft_zero3", out, SAVE_STEPS="4", RESUME="1")
    assert _record(straight, 0)["first_steps"] == [1, 1]
    for rank in (0, 1):
        record = _record(out, rank)
        assert record["error"] is None and record["first_steps"] == [5], record
        assert record["accuracy_matrix"] == _record(straight, 0)["accuracy_matrix"]
        resumed, uninterrupted = load_file(out / f"final-rank{rank}.safetensors"), load_file(
            straight / f"final-rank{rank}.safetensors")
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            assert torch.equal(resumed[key], uninterrupted[key]), key
