"""Several processes on CPU over gloo (DDP; FSDP2 ``fully_shard``; DeepSpeed ZeRO-2 when installed): every rank
designs the same B_t and memory, equal to one process's; the adapter is saved once and loads back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from continual_fixtures import bert, inflora_bert
from launch import run_worker
from peft import PeftModel
from safetensors.torch import load_file
from sharded_worker import local_batches

from peft_inflora.distributed import ShardedAdapterError, adapter_parameters, all_reduce_gradients


@pytest.mark.multiprocess
def test_under_fsdp_every_process_stops_the_statistics_pass_after_the_same_batch(tmp_path):
    """Process 0's batches hold 10 real tokens, process 1's 2; the budget is 20 tokens per process. Stopping each
    process on its own count (2 forwards against 10) deadlocks FSDP2, whose forwards are collectives: the first
    process to reach its budget stops all of them."""
    run_worker("budget_distributed_worker.py", tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert (r0["local_count"], r1["local_count"]) == (20, 4)  # two forwards each: 2 x 10 and 2 x 2 real tokens
    assert r0["count"] == r1["count"] == 24  # and the all-reduced statistics agree


@pytest.mark.multiprocess
def test_two_processes_design_identically_and_like_one_process(tmp_path):
    run_worker("distributed_worker.py", tmp_path / "two", timeout=600)
    run_worker("distributed_worker.py", tmp_path / "one", processes=1, timeout=600)

    for task in (0, 1):
        r0 = load_file(tmp_path / "two" / f"design-task{task}-rank0.safetensors")
        r1 = load_file(tmp_path / "two" / f"design-task{task}-rank1.safetensors")
        for name in r0:  # all-reduced statistics: the ranks agree bit for bit
            assert torch.equal(r0[name], r1[name]), name
    # task 1 is designed before any training: two shards summed == one process over all data (float32 sums of
    # the same tokens in another order: equal to ~1e-6; rows compared as a subspace, sign-free)
    single = load_file(tmp_path / "one" / "design-task0-rank0.safetensors")
    r0 = load_file(tmp_path / "two" / "design-task0-rank0.safetensors")
    for name in single:
        a, b = single[name].double(), r0[name].double()
        torch.testing.assert_close(a.T @ a, b.T @ b, atol=1e-5, rtol=0)
    f0 = load_file(tmp_path / "two" / "final-rank0.safetensors")
    f1 = load_file(tmp_path / "two" / "final-rank1.safetensors")
    for key in f0:  # DDP keeps the replicas identical: trained A_t, folded past and memory
        assert torch.equal(f0[key], f1[key]), key


# ---------------------------------------------------------------------------------------------- sharded parameters
def _fsdp2_missing() -> Optional[str]:
    """Why FSDP2 cannot run here (None when it can)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError as err:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard): {err}"
    return None


def _deepspeed_missing() -> Optional[str]:
    """Why DeepSpeed cannot run here (None when it can)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (optional; `pip install deepspeed` runs ZeRO-2 on its CPU accelerator)"
    return None


def _run_sharded_worker(mode: str, out: Path, processes: int) -> None:
    run_worker("sharded_worker.py", mode, out, processes=processes, timeout=600)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The reference: the same two tasks in one process, no wrapper, batches of 8."""
    out = tmp_path_factory.mktemp("one-process")
    _run_sharded_worker("single", out, processes=1)
    return out


def _assert_like_one_process(two: Path, one: Path) -> None:
    """(a) the two ranks agree bit for bit; (b) they equal the one-process run up to float reassociation;
    (c) process 0 alone wrote the adapter, which holds the gathered full state; (d) it loads and continues."""
    load = lambda folder, stem, rank=0: load_file(folder / f"{stem}-rank{rank}.safetensors")  # noqa: E731
    stems = [f"{kind}-task{t}" for kind in ("design", "trained", "memory") for t in (0, 1)] + ["logits", "gathered"]
    for stem in stems:  # (a) statistics all-reduced, replicated A_t updated with averaged gradients
        r0, r1 = load(two, stem, 0), load(two, stem, 1)
        assert r0.keys() == r1.keys() and r0, stem
        for name in r0:
            assert torch.equal(r0[name], r1[name]), (stem, name)
    for task in (0, 1):  # (b) designs and memory as subspaces (sign-free), trained A_t as values
        for stem, gram in ((f"design-task{task}", lambda m: m.T @ m), (f"memory-task{task}", lambda m: m @ m.T)):
            sharded, single = load(two, stem), load(one, stem)
            assert sharded.keys() == single.keys()
            for name in single:
                assert sharded[name].shape == single[name].shape, (stem, name)
                torch.testing.assert_close(gram(sharded[name].double()), gram(single[name].double()), atol=1e-5,
                                           rtol=0, msg=f"{stem} {name}")
        sharded, single = load(two, f"trained-task{task}"), load(one, f"trained-task{task}")
        for name in single:
            assert single[name].abs().max() > 1e-3  # trained away from zero: the comparison means something
            torch.testing.assert_close(sharded[name], single[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(load(two, "logits")["logits"], load(one, "logits")["logits"], atol=1e-5, rtol=0)

    # (c) one write, by process 0, of the whole (gathered) state
    assert json.loads((two / "saves-rank0.json").read_text()) == ["adapter_model.safetensors"]
    assert json.loads((two / "saves-rank1.json").read_text()) == []
    gathered = load(two, "gathered")
    loaded = PeftModel.from_pretrained(bert(), str(two / "adapter"))
    state = loaded.state_dict()
    assert any("classifier.modules_to_save" in k for k in gathered)  # the head was sharded by FSDP2
    for key, tensor in gathered.items():
        assert torch.equal(state[key], tensor), key
    # (d) the loaded adapter computes what the wrapped model computed, and continues the sequence
    probe = load_file(two / "logits-rank0.safetensors")["logits"]
    batch = {k: v for k, v in local_batches(1, 0, 1)[0].items() if k != "labels"}
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, probe, atol=1e-5, rtol=0)
    assert loaded.tasks_done() == 2
    ranks = loaded.begin_task(local_batches(0, 0, 1), progress=False)
    assert ranks and all(r > 0 for r in ranks.values())


def _assert_refused_unchanged(result: dict, error: str, words: tuple, in_progress: bool) -> None:
    assert result["error"] is not None and result["error"].startswith(error), result
    assert all(word in result["error"] for word in words), result
    assert result["task_in_progress"] is in_progress and result["tasks_done"] == 0, result


@pytest.mark.multiprocess
@pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))
def test_fsdp2_two_processes_design_train_and_save_like_one_process(tmp_path, one_process_run):
    _run_sharded_worker("fsdp2", tmp_path, processes=2)
    _assert_like_one_process(tmp_path, one_process_run)
    for rank in (0, 1):  # wrong wraps are refused before anything changes
        misuse = json.loads((tmp_path / f"misuse-rank{rank}.json").read_text())
        _assert_refused_unchanged(misuse["adapter_sharded"], "ShardedAdapterError", ("ignored_params",), False)
        _assert_refused_unchanged(misuse["peft_root"], "StatisticsError", ("base_model.model", "root"), False)


@pytest.mark.multiprocess
@pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))
def test_deepspeed_zero2_two_processes_like_one_process_and_zero3_refused(tmp_path, one_process_run):
    _run_sharded_worker("zero2", tmp_path, processes=2)
    _assert_like_one_process(tmp_path, one_process_run)
    for rank in (0, 1):
        misuse = json.loads((tmp_path / f"misuse-rank{rank}.json").read_text())
        _assert_refused_unchanged(misuse["zero3_end_task"], "ShardedAdapterError", ("ZeRO-3",), True)


def test_partitioned_adapter_parameter_is_refused_before_anything_changes():
    """A parameter partitioned by ZeRO-3 carries ``ds_id``: begin_task refuses it and leaves the state as it was."""
    model = inflora_bert()
    batch = {"input_ids": torch.randint(10, 90, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_parameters(model)[0].ds_id = 0
    with pytest.raises(ShardedAdapterError, match="ZeRO-3"):
        model.begin_task([batch], progress=False)
    assert not model.task_in_progress()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_adapter_parameters_and_gradient_average_without_distributed():
    """One process: every InfLoRA layer's A_t is listed; averaging is a no-op that reports the gradients seen."""
    model = inflora_bert()
    batch = {"input_ids": torch.randint(10, 90, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    model.begin_task([batch], progress=False)
    params = adapter_parameters(model)
    layers = model.base_model.inflora_layers()
    assert len(params) == len(layers) == 4
    assert {id(p) for p in params} == {id(layer.inflora_A["default"]) for layer in layers.values()}
    model(**batch).loss.backward()
    grads = [p.grad.clone() for p in params]
    assert all_reduce_gradients(params) == 4
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


# ------------------------------------------------------------------------------------ is torch.distributed running
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_is_distributed_is_true_exactly_while_a_process_group_runs(tmp_path):
    """The one test of "is torch.distributed running" that statistics, the sketch merge and saving use."""
    from peft_inflora.distributed import is_distributed, world_size

    assert not torch.distributed.is_initialized()  # nothing else in this process started one
    assert (is_distributed(), world_size()) == (False, 1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert (is_distributed(), world_size()) == (True, 1)
    finally:
        torch.distributed.destroy_process_group()
    assert (is_distributed(), world_size()) == (False, 1)
