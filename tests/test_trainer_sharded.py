"""The ContinualTrainer with parameter sharding, 2 processes over gloo on CPU (``trainer_sharded_worker.py``):
a model sharded with FSDP2 ``fully_shard`` before the trainer, DeepSpeed ZeRO-2 and ZeRO-3 through
``TrainingArguments(deepspeed=...)``, all like one process; Accelerate's ``fsdp=`` and a wrap that shards the head
refused before anything changes; a run killed after its first task resumes to the same adapter (FSDP2, ZeRO-3)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from continual_fixtures import bert, inflora_bert, tasks, training_args
from launch import free_port, run_worker, worker_env
from peft import PeftModel
from safetensors.torch import load_file

from peft_inflora import ContinualTrainer
from peft_inflora.continual import sharding


HERE = Path(__file__).parent
SEQUENCE = (2, 3)  # the worker's tasks (classes per task)


def _run(mode: str, out: Path, processes: int = 2, launcher: bool = False, **env: str) -> None:
    run_worker("trainer_sharded_worker.py", mode, out, processes=processes, launcher=launcher, **env)


def _missing(module: str) -> Optional[str]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    if module == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError as err:
            return f"torch {torch.__version__} has no FSDP2: {err}"
        try:
            sharding.check_transformers_for_fsdp2()
        except ValueError as err:
            return str(err).split(". ")[0]
    elif importlib.util.find_spec(module) is None:
        return f"{module} is not installed (optional; `pip install deepspeed` runs ZeRO on its CPU accelerator)"
    return None


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same two tasks (2 then 3 classes) in one process, no wrapper, batches of 8."""
    out = tmp_path_factory.mktemp("one-process")
    _run("single", out, processes=1)
    return out


def _record(out: Path, rank: int) -> dict:
    return json.loads((out / f"result-rank{rank}.json").read_text())


def _assert_like_one_process(two: Path, one: Path, head_atol: float, processes: int = 2) -> dict[str, float]:
    """Every rank holds the same adapter; it equals the one-process run (designs, memory, folded tasks to 1e-5, the
    trained head to ``head_atol``); the accuracy matrices are equal; process 0 alone wrote each task's checkpoint,
    and the last one holds the final adapter with its memory. Returns the largest difference to one process by kind
    of tensor."""
    ranks = [load_file(two / f"final-rank{rank}.safetensors") for rank in range(processes)]
    r0, single = ranks[0], load_file(one / "final-rank0.safetensors")
    assert all(r.keys() == single.keys() for r in ranks)
    assert any("inflora_memory" in k for k in single) and any("classifier.modules_to_save" in k for k in single)
    differences: dict[str, float] = {}
    for key in single:
        assert all(torch.equal(r0[key], r[key]) for r in ranks), key
        atol = head_atol if "classifier" in key else 1e-5
        torch.testing.assert_close(r0[key], single[key], atol=atol, rtol=0, msg=key)
        kind = next((part for part in key.split(".") if part.startswith("inflora_")), "head")
        if single[key].numel():
            differences[kind] = max(differences.get(kind, 0.0), (r0[key] - single[key]).abs().max().item())
    past = [v for k, v in single.items() if "inflora_past_A" in k]
    assert past and all(v.abs().max() > 1e-3 for v in past)  # trained away from zero: the comparison means something
    records = [_record(two, rank) for rank in range(processes)]
    assert all(record["error"] is None for record in records), records
    assert all(record["accuracy_matrix"] == _record(one, 0)["accuracy_matrix"] for record in records)
    assert json.loads((two / "saves-rank0.json").read_text()) == ["adapter_model.safetensors"] * 2
    assert all(json.loads((two / f"saves-rank{rank}.json").read_text()) == [] for rank in range(1, processes))
    first = load_file(two / "run" / "continual" / "after-task-01" / "adapter_model.safetensors")
    head = "base_model.model.classifier.modules_to_save.default.weight"
    assert torch.equal(r0[head][:2], first["base_model.model.classifier.weight"])  # task 1's rows frozen bit for bit
    loaded = PeftModel.from_pretrained(bert(num_labels=5), str(two / "run" / "continual" / "after-task-02"))
    state = loaded.state_dict()
    for key, tensor in r0.items():  # the last checkpoint loads back to exactly the trained adapter
        if "original_module" not in key:  # the base model's own head is not in the adapter
            assert torch.equal(state[key], tensor), key
    return differences


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("fsdp2") is not None, reason=str(_missing("fsdp2")))
def test_model_sharded_with_fsdp2_trains_like_one_process(tmp_path, one_process):
    _run("fsdp2", tmp_path)
    _assert_like_one_process(tmp_path, one_process, head_atol=1e-5)
    for rank in (0, 1):  # a wrap that shards the growing head is refused, naming the fix, before anything changes
        refused = _record(tmp_path, rank)["head_sharded"]
        assert refused["error"].startswith("ValueError") and "replicated_parameters" in refused["error"], refused
        assert refused["tasks_done"] == 0 and refused["task_in_progress"] is False
        steps = _record(tmp_path, rank)["save_steps"]  # Trainer checkpoints of a sharded model: refused
        assert steps["error"].startswith("ValueError") and "save_strategy='no'" in steps["error"], steps
        assert steps["tasks_done"] == 2
    assert not (tmp_path / "refused" / "continual").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("fsdp2") is not None, reason=str(_missing("fsdp2")))
def test_accelerate_fsdp_settings_are_applied_by_the_trainer_and_train_like_one_process(tmp_path, one_process):
    """TrainingArguments(fsdp=True): the trainer keeps the plugin out of the Accelerator and shards the model itself
    with its settings (the auto-wrap policy's blocks, from BERT's _no_split_modules, then the transformers model as
    the root), leaving A_t and the head whole: the same results as the hand-made FSDP2 wrap."""
    _run("accelerate_fsdp", tmp_path)
    _assert_like_one_process(tmp_path, one_process, head_atol=1e-5)
    for rank in (0, 1):
        record = _record(tmp_path, rank)
        assert record["accelerator_fsdp"] is False  # Accelerate never wrapped the PeftModel
        assert record["fsdp_units"] == ["base_model.model", "base_model.model.bert.embeddings",
                                        "base_model.model.bert.encoder.layer.0",
                                        "base_model.model.bert.encoder.layer.1"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("fsdp2") is not None, reason=str(_missing("fsdp2")))
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_accelerate_fsdp_with_one_process_per_device_trains_like_the_same_device_without_fsdp(tmp_path, device):
    """``TrainingArguments(fsdp=True)`` launched by ``torchrun``, one process per device: on a GPU machine (NCCL) this
    is the set-up in which Accelerate would itself switch to FSDP (on CPUs it never does) unless the trainer keeps the
    plugin from it, and the mesh and collectives run on CUDA. It trains like one process on the same device
    without FSDP. On CPU: one process over gloo. On the GPU machine: every GPU (the one lent here has one), run by
    ``benchmarks/gpu_session.sh``; the differences it prints are the figures in docs/gpu.md."""
    processes = torch.cuda.device_count() if device == "cuda" else 1
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    _run("single", one, processes=1, DEVICE=device)
    _run("accelerate_fsdp", fsdp, processes=processes, launcher=True, DEVICE=device)
    differences = _assert_like_one_process(fsdp, one, head_atol=1e-5, processes=processes)
    record = _record(fsdp, 0)
    assert record["device"].startswith(device) and _record(one, 0)["device"].startswith(device)
    assert record["accelerator_fsdp"] is False  # the trainer applied the plugin's settings itself
    assert record["fsdp_units"] == ["base_model.model", "base_model.model.bert.embeddings",
                                    "base_model.model.bert.encoder.layer.0", "base_model.model.bert.encoder.layer.1"]
    print(f"\n{device} x {processes}, {record['distributed_type']}: max abs vs one process without FSDP "
          + json.dumps(differences))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("fsdp2") is not None, reason=str(_missing("fsdp2")))
def test_accelerate_launch_with_an_fsdp_config_trains_like_one_process(tmp_path, one_process):
    """`accelerate launch --use_fsdp` (its FSDP settings in FSDP_* variables, cpu_ram_efficient_loading on by
    default): process 1 starts from other weights, as from_pretrained leaves them there, and the trainer broadcasts
    process 0's before sharding."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
              str(free_port()), "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
              "TRANSFORMER_BASED_WRAP", "--fsdp_cpu_ram_efficient_loading", "true",
              str(HERE / "trainer_sharded_worker.py"), "accelerate_launch", str(tmp_path)]
    run = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=worker_env())
    assert run.returncode == 0, run.stderr[-4000:]
    _assert_like_one_process(tmp_path, one_process, head_atol=1e-5)
    assert _record(tmp_path, 1)["fsdp_units"] == ["base_model.model", "base_model.model.bert.embeddings",
                                                  "base_model.model.bert.encoder.layer.0",
                                                  "base_model.model.bert.encoder.layer.1"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("fsdp2") is not None, reason=str(_missing("fsdp2")))
@pytest.mark.parametrize("mode", ["fsdp2", "accelerate_fsdp"])
def test_fsdp2_run_killed_after_a_task_resumes_to_the_same_adapter(tmp_path, one_process, mode):
    _run(mode, tmp_path, STOP_AFTER_TASK="1")  # ends both processes (os._exit) after checkpoint 1
    continual = tmp_path / "run" / "continual"
    assert (continual / "after-task-01").is_dir() and not (continual / "after-task-02").exists()
    assert not (tmp_path / "result-rank0.json").exists()  # the first run never got past the kill
    _run(mode, tmp_path, RESUME="1")
    r0 = load_file(tmp_path / "final-rank0.safetensors")
    single = load_file(one_process / "final-rank0.safetensors")
    for key in single:
        torch.testing.assert_close(r0[key], single[key], atol=1e-5, rtol=0, msg=key)
    assert _record(tmp_path, 0)["accuracy_matrix"] == _record(one_process, 0)["accuracy_matrix"]
    assert json.loads((tmp_path / "saves-rank0.json").read_text()) == ["adapter_model.safetensors"]  # task 2 only


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("deepspeed") is not None, reason=str(_missing("deepspeed")))
def test_deepspeed_zero2_trainer_like_one_process(tmp_path, one_process):
    """The DeepSpeed config holds the optimizer (the Trainer's is a DummyOptim): a new engine per task trains the
    new A_t, and the frozen head rows stay bit for bit (the comparison with one process would catch either)."""
    _run("zero2", tmp_path)
    # DeepSpeed's optimizer leaves the head within 4.4e-5 of one process; the new-rows alignment after each task
    # (SGD on samples of statistics of those features) amplifies that to 7.9e-4 (measured). Both ranks stay equal.
    _assert_like_one_process(tmp_path, one_process, head_atol=2e-3)


def _assert_partitioned(record: dict) -> None:
    """The worker's probe after the first optimizer step of each task: ``A_t``, the head and a base weight were
    ZeRO-3 placeholders on this process (no local data, half of the elements in its slice)."""
    probes = record["partitioned"]
    assert len(probes) == len(SEQUENCE), probes
    assert probes[0]["hooks"] > 0 and all(p["hooks"] == probes[0]["hooks"] for p in probes), probes  # not doubled
    for probe in probes:
        for name in ("A_t", "head", "base"):
            held = probe[name]
            assert held["status"] == "ZeroParamStatus.NOT_AVAILABLE" and held["data"] == 0, (name, probe)
            assert held["slice"] * 2 == held["whole"], (name, probe)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("deepspeed") is not None, reason=str(_missing("deepspeed")))
def test_deepspeed_zero3_trainer_like_one_process(tmp_path, one_process):
    """ZeRO-3 with every parameter partitioned (``stage3_param_persistence_threshold: 0``): A_t, the head and the base
    model are placeholders outside a forward on both processes, and the run still equals one process (as ZeRO-2:
    the same optimizer, the same whole-tensor steps at every task boundary)."""
    _run("zero3", tmp_path)
    for rank in (0, 1):
        _assert_partitioned(_record(tmp_path, rank))
    # measured: memory 6.0e-8, past_A 8.3e-7, past_B 1.7e-7, head weight 5.3e-4, head bias 7.9e-4 (the alignment
    # amplifies the optimizer's float differences, as under ZeRO-2); both ranks bit-identical
    _assert_like_one_process(tmp_path, one_process, head_atol=2e-3)


def _zero3_like_one_process_with(tmp_path: Path, head_atol: float, atol: float = 1e-5, **env: str) -> Path:
    """The worker with ``env`` in one process (``tmp_path/single``, returned) and under ZeRO-3 (``tmp_path``): both
    ranks bit-identical, within ``atol`` of one process (the head within ``head_atol``), the same accuracy matrix."""
    single = tmp_path / "single"
    _run("single", single, processes=1, **env)
    _run("zero3", tmp_path, **env)
    r0, r1 = load_file(tmp_path / "final-rank0.safetensors"), load_file(tmp_path / "final-rank1.safetensors")
    one = load_file(single / "final-rank0.safetensors")
    assert r0.keys() == r1.keys() == one.keys()
    for key in one:
        assert torch.equal(r0[key], r1[key]), key
        torch.testing.assert_close(r0[key], one[key], atol=head_atol if "classifier" in key else atol, rtol=0,
                                   msg=key)
    assert _record(tmp_path, 0)["accuracy_matrix"] == _record(single, 0)["accuracy_matrix"]
    return single


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("deepspeed") is not None, reason=str(_missing("deepspeed")))
def test_deepspeed_zero3_with_the_default_cosine_head_and_alignment_like_one_process(tmp_path):
    """The class-incremental default (cosine logits while a task trains, every head row re-fitted after it): the
    cosine hook and the alignment read the partitioned head inside the gathers. Measured: at most 1.1e-7 from one
    process (past_A), head 2.4e-7; both ranks bit-identical."""
    _zero3_like_one_process_with(tmp_path, head_atol=1e-5, HEAD_LOGITS="auto")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("deepspeed") is not None, reason=str(_missing("deepspeed")))
def test_deepspeed_zero3_with_class_statistics_from_an_extra_pass_like_one_process(tmp_path):
    """``class_statistics_source="extra_pass"``: after each task the alignment's class statistics come from one more
    eval-mode pass over the task's batches, each process its own, through the partitioned model (the engine's
    gathering hooks), summed over processes; the aligned head and the adapter then equal one process's."""
    single = _zero3_like_one_process_with(tmp_path, head_atol=2e-3, CLASS_STATISTICS_SOURCE="extra_pass")
    statistics = load_file(tmp_path / "run" / "continual" / "after-task-02" / "class_statistics.safetensors")
    reference = load_file(single / "run" / "continual" / "after-task-02" / "class_statistics.safetensors")
    assert torch.equal(statistics["counts"], reference["counts"])  # every example once, over both processes
    torch.testing.assert_close(statistics["means"], reference["means"], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("deepspeed") is not None, reason=str(_missing("deepspeed")))
def test_deepspeed_zero3_runs_the_sequential_lora_baseline_like_one_process(tmp_path):
    """The same loop with a PEFT LoRA model (the baseline users compare InfLoRA with): LoRA's factors, the head and a
    base weight partitioned, and the run equals one process. Measured: lora_A 5.9e-6, lora_B 1.1e-6 (the LoRA factors
    keep training across tasks, so DeepSpeed's Adam drifts further than InfLoRA's fresh A_t), head 8.0e-4."""
    _zero3_like_one_process_with(tmp_path, head_atol=2e-3, atol=5e-5, BASELINE="lora")
    for rank in (0, 1):
        probes = _record(tmp_path, rank)["partitioned"]
        assert len(probes) == len(SEQUENCE) and all(
            probe[name]["data"] == 0 and probe[name]["slice"] * 2 == probe[name]["whole"]
            for probe in probes for name in ("A_t", "head", "base")), probes
    assert any("lora_A" in key for key in load_file(tmp_path / "final-rank0.safetensors"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("deepspeed") is not None, reason=str(_missing("deepspeed")))
def test_deepspeed_zero3_run_killed_after_a_task_resumes_to_the_same_adapter(tmp_path, one_process):
    _run("zero3", tmp_path, STOP_AFTER_TASK="1")  # ends both processes (os._exit) after checkpoint 1
    continual = tmp_path / "run" / "continual"
    assert (continual / "after-task-01").is_dir() and not (continual / "after-task-02").exists()
    assert not (tmp_path / "result-rank0.json").exists()
    _run("zero3", tmp_path, RESUME="1")
    r0, r1 = load_file(tmp_path / "final-rank0.safetensors"), load_file(tmp_path / "final-rank1.safetensors")
    single = load_file(one_process / "final-rank0.safetensors")
    for key in single:
        assert torch.equal(r0[key], r1[key]), key
        torch.testing.assert_close(r0[key], single[key], atol=2e-3 if "classifier" in key else 1e-5, rtol=0,
                                   msg=key)
    assert _record(tmp_path, 0)["accuracy_matrix"] == _record(one_process, 0)["accuracy_matrix"]
    assert len(_record(tmp_path, 0)["partitioned"]) == 1  # the resumed run trained task 2 only, partitioned
    assert json.loads((tmp_path / "saves-rank0.json").read_text()) == ["adapter_model.safetensors"]  # task 2 only
    assert json.loads((tmp_path / "saves-rank1.json").read_text()) == []


def test_deepspeed_zero3_is_not_refused(tmp_path, monkeypatch):
    """What Accelerate sets on a GPU machine with a ZeRO-3 config (faked on the trainer): the sharding check lets it
    through (the 2-process tests above run it for real)."""
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path / "run"))
    trainer.is_deepspeed_enabled = True
    monkeypatch.setattr(type(trainer.accelerator.state), "deepspeed_plugin",
                        property(lambda state: SimpleNamespace(zero_stage=3)))
    sharding.check_sharding(trainer, trainer.peft_model)


def test_an_accelerator_that_already_runs_fsdp_is_refused_before_training(tmp_path):
    """An Accelerator state with FSDP made before the trainer (faked here on the trainer) would wrap the PeftModel
    itself: refused at the first task, nothing trained, nothing written."""
    model = inflora_bert()
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path / "run"))
    trainer.is_fsdp_enabled, match = True, "already runs FSDP"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        trainer.train_continual(tasks((2,)))
    assert model.tasks_done() == 0 and not model.task_in_progress()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "run" / "continual").exists()  # no checkpoint, no result


# ---------------------------------------------------------------------------------------------- task boundaries
@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_process_failing_at_a_task_boundary_stops_every_process(tmp_path):
    """DDP, 2 processes, one launch, five cases (``boundary_failure_worker.py``): the failing process raises its
    own error, the other a DistributedStepError naming the step and the failing rank, within seconds (a hang would
    last until the gloo timeout); both hold the same state, the head and class statistics of the failed step are as
    they were, and output_dir holds no file of the failed step."""
    run_worker("boundary_failure_worker.py", tmp_path, timeout=420)
    expected = {  # case: (failing rank, step, tasks learned when it failed, head rows, classes with statistics)
        "prepare": (1, "train_task: checks and data preparation", 0, 2, []),
        "head": (1, "head of task 2 (growth, frozen rows)", 1, 2, [0, 1]),
        "alignment": (1, "classifier alignment after task 2", 2, 5, [0, 1]),
        "evaluation": (1, "evaluation after task 2 (scores)", 2, 5, [0, 1, 2, 3, 4]),
        "checkpoint": (0, "checkpoint after task 2", 2, 5, [0, 1, 2, 3, 4]),
    }
    for case, (failing, step, learned, rows, statistics) in expected.items():
        records = [json.loads((tmp_path / f"{case}-rank{rank}.json").read_text()) for rank in (0, 1)]
        own, other = records[failing], records[1 - failing]
        assert own["error"]["type"] == "InjectedFailure", (case, own)
        assert other["error"]["type"] == "DistributedStepError", (case, other)
        assert other["error"]["step"] == step and other["error"]["failed_ranks"] == [failing], (case, other)
        assert f"rank {failing} (InjectedFailure: {case} on rank {failing})" in other["error"]["message"]
        for record in records:
            assert record["seconds"] < 60, (case, record)
            assert (record["tasks_done"], record["trainer_tasks"], record["task_in_progress"]) == \
                (learned, learned, False), (case, record)
            assert len(record["head"]) == rows and record["statistics_classes"] == statistics, (case, record)
        assert records[0]["head"] == records[1]["head"], case  # the processes stay in step
        if case == "alignment":  # the head is the one the alignment started from, on both processes
            assert all(r["head"] == r["head_before_alignment"] for r in records)
        if learned == 2:  # the failure came after the task was learned: the error says so and how to go on
            assert "resume_from_checkpoint=True" in other["error"]["message"]
        continual = tmp_path / case / "continual"
        assert not (continual / "after-task-02").exists()
        if case == "prepare":
            assert not continual.exists()
        else:  # the checkpoint of task 1 is intact
            assert json.loads((continual / "after-task-01" / "progress.json").read_text())["tasks_done"] == 1


# ---------------------------------------------------------------------------------------------- Accelerate's FSDP
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(_missing("fsdp2") is not None or _missing("bitsandbytes") is not None,
                    reason=str(_missing("fsdp2") or _missing("bitsandbytes")))
def test_a_4bit_base_sharded_with_the_fsdp_plugin_keeps_its_packed_weights_whole_and_learns_a_task(tmp_path):
    """QLoRA-style FSDP: the packed uint8 4-bit weights stay whole (their quant_state would not survive the DTensor
    conversion), the rest is sharded; the logits do not change through the sharding, and both processes learn the
    same task bit for bit (designs and memory from all-reduced statistics, A_t from averaged gradients)."""
    import transformers

    folder = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(folder)
    run_worker("quantized_fsdp_worker.py", folder, tmp_path)
    records = [json.loads((tmp_path / f"record-rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["four_bit_weight"] == "Params4bit"  # not a DTensor
        assert record["logits_change"] == 0.0
        assert record["units"] == ["base_model.model", "base_model.model.model.layers.0",
                                   "base_model.model.model.layers.1"]
        assert record["tasks_done"] == 1
    r0, r1 = (load_file(tmp_path / f"adapter-rank{rank}.safetensors") for rank in (0, 1))
    assert r0.keys() == r1.keys() and any("inflora_memory" in k for k in r0)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key


@pytest.mark.parametrize("fsdp_config, match", [
    ({"version": 1}, "FSDP2 only"),
    ({"activation_checkpointing": True}, "CheckpointWrapper"),
    ({"cpu_offload": True}, "cpu_offload"),
])
def test_fsdp_settings_the_loop_cannot_follow_are_refused_when_the_trainer_is_made(tmp_path, fsdp_config, match):
    model = inflora_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_args(tmp_path / "run", fsdp=True, fsdp_config=fsdp_config)
    with pytest.raises(ValueError, match=match):
        ContinualTrainer(model=model, args=args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not sharding.is_fsdp2_sharded(model) and not (tmp_path / "run").exists()


def test_fsdp_with_a_transformers_that_would_wrap_the_sharded_model_in_ddp_is_refused(tmp_path, monkeypatch):
    """transformers < 5.19 wraps an FSDP2-sharded model in DDP (its broadcast fails on the DTensors: seen with 5.17):
    Accelerate's FSDP settings are refused when the trainer is made, before the model is sharded, and a model
    sharded before the trainer when training starts, before anything is trained."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    model = inflora_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_args(tmp_path / "run", fsdp=True)
    plugin_args = dict(args.fsdp_plugin_args)
    with pytest.raises(ValueError, match=r"needs transformers>=5\.19 \(installed: 5\.17\.0\).*Nothing was changed"):
        ContinualTrainer(model=model, args=args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not sharding.is_fsdp2_sharded(model) and args.fsdp_plugin_args == plugin_args

    trainer = ContinualTrainer(model=model, args=training_args(tmp_path / "run"))
    monkeypatch.setattr(sharding, "is_fsdp2_sharded", lambda module: True)  # as if fully_shard ran before
    with pytest.raises(ValueError, match=r"needs transformers>=5\.19"):
        trainer.train_continual(tasks(SEQUENCE))
    assert model.tasks_done() == 0 and model.task_in_progress() is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_accelerate_launch_fsdp_config_is_read_from_the_environment(tmp_path, monkeypatch):
    """accelerate launch with an FSDP config sets ACCELERATE_USE_FSDP and FSDP_* variables, not the arguments."""
    args = training_args(tmp_path / "run")
    assert sharding.fsdp_plugin_from(args) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    plugin = sharding.fsdp_plugin_from(args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    monkeypatch.delenv("FSDP_VERSION")  # Accelerate's default is FSDP1
    with pytest.raises(ValueError, match="FSDP2 only"):
        ContinualTrainer(model=inflora_bert(), args=args)


@pytest.mark.skipif(_missing("fsdp2") is not None, reason=str(_missing("fsdp2")))
def test_the_fsdp_request_is_given_back_to_the_arguments_and_environment_when_the_trainer_fails(tmp_path,
                                                                                              monkeypatch):
    """One process: the Trainer itself refuses fsdp outside distributed training, after the continual trainer kept
    the plugin from the Accelerator; the arguments and the environment hold the request again afterwards."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    args = training_args(tmp_path / "run", fsdp=True)
    plugin_args = dict(args.fsdp_plugin_args)
    with pytest.raises(ValueError, match="distributed training"):
        ContinualTrainer(model=inflora_bert(), args=args)
    assert args.fsdp_plugin_args == plugin_args and "ACCELERATE_USE_FSDP" not in os.environ
