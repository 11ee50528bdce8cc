"""When one process fails in a collective step, every process raises, none hangs, and nothing changes anywhere.

Two processes over gloo (``tests/failure_worker.py``, one launch for every case): in each case one process fails in
``begin_task`` (its statistics pass, the checks, the design), ``end_task`` (its statistics pass, the checks, the
memory update, the fold) or ``save_adapter`` (gathering, writing). The failing process raises its own error; the
other a :class:`~peft_inflora.errors.DistributedStepError` naming the step and the failing rank. One process: the
agreement is a no-op that communicates nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from continual_fixtures import inflora_bert
from failure_worker import GLOO_TIMEOUT_S
from launch import run_worker

from peft_inflora import DistributedStepError
from peft_inflora.distributed import agree, check_agreement


# case -> (the failing rank, what it raises, words in its error, the step the other process's error names)
FAILURES = {
    "begin_bad_batch": (1, "StatisticsError", "must be a dict", "begin_task of task 1 (statistics pass)"),
    "begin_forward_error": (1, "StatisticsError", "could not run", "begin_task of task 1 (statistics pass)"),
    "begin_loader_error": (0, "OSError", "lost its file", "begin_task of task 1 (statistics pass)"),
    "begin_checks": (1, "RuntimeError", "check failed", "begin_task (checks)"),
    "begin_design": (1, "_LinAlgError", "eigh failed", "begin_task of task 1 (design of B_t)"),
    "begin_design_rank0": (0, "_LinAlgError", "eigh failed", "begin_task of task 1 (design of B_t)"),
    "end_nonfinite_shard": (1, "StatisticsError", "NaN or inf", "end_task of task 1 (statistics pass)"),
    "end_memory_solver": (1, "_LinAlgError", "eigh failed", "end_task of task 1 (memory update and fold)"),
    "end_fold": (0, "RuntimeError", "fold failed", "end_task of task 1 (memory update and fold)"),
    "end_diverged_a": (1, "ValueError", "training diverged", "end_task (checks)"),
    "save_unwritable": (0, "NotADirectoryError", "Not a directory", "save_adapter (process 0 writing the files)"),
    "save_gather": (1, "RuntimeError", "gathering the state failed", "save_adapter (gathering the state)"),
    "fsdp2_begin_bad_batch": (1, "StatisticsError", "must be a dict", "begin_task of task 1 (statistics pass)"),
    "fsdp2_end_nonfinite_shard": (1, "StatisticsError", "NaN or inf", "end_task of task 1 (statistics pass)"),
}
# successful steps between the failures: (tasks_done, task_in_progress) after each
SUCCESSES = {"begin_ok": (0, True), "end_ok": (1, False), "save_ok": (1, False), "begin_after_all": (1, True),
             "fsdp2_begin_ok": (0, True), "fsdp2_end_ok": (1, False)}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    """Every case's record on each rank: ``{rank: {case: record}}``."""
    out = tmp_path_factory.mktemp("failures")
    # a hang would end in the gloo timeout (GLOO_TIMEOUT_S per collective); the whole run must end well before this
    run_worker("failure_worker.py", out, timeout=180)
    result = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    result["out"] = out
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_one_process_fails_and_every_process_raises_with_nothing_changed(records, case):
    faulty, error_type, words, step = FAILURES[case]
    own, other = records[faulty][case], records[1 - faulty][case]
    assert (own["error_type"], own["faulty"]) == (error_type, faulty), own
    assert words in own["error"], own
    assert other["error_type"] == "DistributedStepError", other
    assert other["step"] == step and other["failed_ranks"] == [faulty], other
    assert f"{step} failed on 1 of 2 processes: rank {faulty} ({error_type}: " in other["error"], other
    assert words in other["error"] and "nothing was changed" in other["error"], other
    for record in (own, other):
        assert record["unchanged"], record  # state_dict, tasks_done and task_in_progress exactly as before
        assert record["in_sync"], record  # no collective left over: the next one matches on both processes
        assert record["elapsed_s"] < GLOO_TIMEOUT_S / 2, record  # raised at once, not after a timeout


@pytest.mark.multiprocess
def test_steps_after_the_failures_still_run_on_every_process(records):
    for case, (tasks_done, in_progress) in SUCCESSES.items():
        for rank in (0, 1):
            record = records[rank][case]
            assert record["error"] is None and record["in_sync"], (rank, record)
            assert (record["tasks_done"], record["task_in_progress"]) == (tasks_done, in_progress), (rank, record)
    # the failed saves wrote nothing; the successful one wrote the adapter once, from process 0
    assert records[0]["saved_files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert list((records["out"] / "x").iterdir()) == []  # process 1's folder of the failed save (PEFT makes it)


# ---------------------------------------------------------------------------------------------- one process
@pytest.fixture
def no_collectives(monkeypatch):
    """Fail any collective: one process must agree without communicating."""

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called without torch.distributed")

    for name in ("all_reduce", "all_gather_object", "barrier"):
        monkeypatch.setattr(torch.distributed, name, refuse)


def test_one_process_agreement_passes_the_error_through_unchanged(no_collectives):
    error = KeyError("the original")
    with pytest.raises(KeyError) as caught:
        with agree("some step"):
            raise error
    assert caught.value is error
    with agree("some step"):
        pass
    assert check_agreement("some step", stop=True) is True and check_agreement("some step") is False
    with pytest.raises(ValueError, match="bad"):
        check_agreement("some step", ValueError("bad"))


def test_one_process_lifecycle_and_save_communicate_nothing(no_collectives, tmp_path):
    from peft_inflora.distributed import save_adapter

    model = inflora_bert()
    batch = {"input_ids": torch.randint(10, 90, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    model.begin_task([batch], progress=False)
    model.end_task([batch], progress=False)
    save_adapter(model, tmp_path / "adapter")
    assert model.tasks_done() == 1 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_distributed_step_error_carries_the_step_and_the_failing_ranks():
    err = DistributedStepError("msg", step="end_task", failed_ranks=[1, 3], errors={1: "A: x", 3: "B: y"})
    assert isinstance(err, RuntimeError)
    assert (err.step, err.failed_ranks, err.errors) == ("end_task", (1, 3), {1: "A: x", 3: "B: y"})
