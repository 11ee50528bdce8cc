"""Capacity planning: the capacity report, the capped memory update and ``adaptive_threshold``.

Specification: after every task each layer reports its memory's dimension, its free dimension and the energy threshold
its memory update used. With ``adaptive_threshold=True`` and ``total_tasks=T``, after task t (0-based) no layer's
memory spans more than ``d_in - r (T - t - 1)`` dimensions, so every task of the sequence gets its full rank; where the
cap bites, the recorded threshold is the energy the capped memory really keeps, below the schedule.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_model import D_IN, MLP, layer, make_mlp_model, run_tasks, subspace_batches

from peft_inflora import InfLoRAConfig, SubspaceWarning
from peft_inflora.subspace import Memory, captured_energy_ratio, memory_capacity, update_memory


T = 5


def wide_tasks(n: int = T, dim: int = 8) -> list[list[dict]]:
    """Each task's inputs span a random 8-dimensional subspace of R^16: a few tasks fill the memory."""
    return [subspace_batches(100 + k, dim=dim) for k in range(n)]


def covariance(batches: list[dict]) -> torch.Tensor:
    X = torch.cat([b["x"] for b in batches]).double()
    return X.T @ X / X.shape[0]


# ----------------------------------------------------------------------------- the capped memory update
def test_memory_capacity_reserves_r_directions_per_remaining_task():
    assert memory_capacity(16, 3, tasks_left=2) == 10
    assert memory_capacity(16, 3, tasks_left=0) == 16
    assert memory_capacity(16, 3, tasks_left=9) == 0  # never negative


@pytest.mark.parametrize("kind", ["gpm", "dualgpm"])
def test_a_capped_update_keeps_the_leading_directions_of_the_uncapped_one(kind):
    C = covariance(subspace_batches(7, dim=10))
    empty = Memory(torch.zeros(D_IN, 0, dtype=torch.float64), "basis")
    full = update_memory(empty, C, 1.0, kind=kind)
    capped = update_memory(empty, C, 1.0, kind=kind, max_dimension=4)
    assert full.dimension == 10 and capped.dimension == 4
    # the capped memory is the top-4 eigenvectors of C (independent float64 numpy computation)
    eigvals, eigvecs = np.linalg.eigh(C.numpy())
    top = eigvecs[:, ::-1][:, :4]
    M = capped.basis.numpy() if capped.form == "basis" else np.linalg.svd(
        np.eye(D_IN) - capped.basis.numpy() @ capped.basis.numpy().T)[0][:, :4]
    np.testing.assert_allclose(M @ M.T, top @ top.T, atol=1e-10)
    # the energy it keeps ("squared": eigenvalues of C squared) is the top-4 share, below the threshold asked for
    e = np.sort(eigvals)[::-1] ** 2
    assert captured_energy_ratio(capped, C) == pytest.approx(e[:4].sum() / e.sum(), rel=1e-10)
    # a cap at or below the current dimension adds nothing
    assert update_memory(capped, covariance(subspace_batches(8, dim=10)), 1.0, kind=kind,
                         max_dimension=3).dimension == 4


# ----------------------------------------------------------------------------- the model
def test_capacity_report_gives_dimensions_rank_and_the_threshold_of_each_task():
    model = make_mlp_model(energy_threshold=0.9, total_tasks=4)
    assert [c.energy_threshold for c in model.capacity_report()] == [None, None]
    run_tasks(model, wide_tasks(2, dim=3))
    for c in model.capacity_report():
        assert c.d_in == (D_IN if c.layers == ["lin0"] else 12) and c.rank == 3 and c.tasks_done == 2
        assert c.free_dimension == c.d_in - c.memory_dimension
        assert c.energy_thresholds == pytest.approx([0.9, 0.925])  # eps_t = 0.9 + 0.1 t / 4
        assert c.energy_threshold == pytest.approx(0.925)
        assert c.can_host_next_task == (c.free_dimension >= 3)
        assert c.tasks_at_full_rank == c.free_dimension // 3


def test_the_fixed_schedule_runs_out_of_room_and_the_adaptive_one_does_not():
    fixed = make_mlp_model(energy_threshold=0.99, total_tasks=T)
    with pytest.warns(SubspaceWarning, match="directions are free"):
        run_tasks(fixed, wide_tasks()[:3])  # 8-dim tasks at 99 %: task 3 already finds fewer than r=3 free
    adaptive = make_mlp_model(energy_threshold=0.99, total_tasks=T, adaptive_threshold=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubspaceWarning)  # every task gets its full rank
        for t, batches in enumerate(wide_tasks()):
            ranks = adaptive.begin_task(batches, progress=False)
            assert set(ranks.values()) == {3}
            adaptive.end_task(batches, progress=False)
            for c in adaptive.capacity_report():
                assert c.memory_dimension <= memory_capacity(c.d_in, 3, T - t - 1)


def test_a_capped_task_records_the_energy_its_memory_really_keeps():
    model = make_mlp_model(energy_threshold=0.99, total_tasks=T, adaptive_threshold=True)
    lin0 = layer(model, "lin0")
    for t, batches in enumerate(wide_tasks()[:2]):
        model.begin_task(batches, progress=False)
        model.end_task(batches, progress=False)
        # lin0 reads the task's inputs as they are: recompute the kept energy independently
        memory = lin0.get_memory("default")
        kept = captured_energy_ratio(memory, covariance(batches))
        assert memory.dimension == memory_capacity(D_IN, 3, T - t - 1)  # 4, then 7: the cap bites
        recorded = lin0.energy_thresholds("default")[t]
        assert recorded == pytest.approx(kept, rel=1e-6) and recorded < 0.99 + 0.01 * t / T


def test_thresholds_are_saved_and_loaded_with_the_adapter(tmp_path):
    from peft import PeftModel

    model = make_mlp_model(energy_threshold=0.99, total_tasks=T, adaptive_threshold=True)
    run_tasks(model, wide_tasks()[:2])
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    assert [c.energy_thresholds for c in loaded.capacity_report()] == [
        c.energy_thresholds for c in model.capacity_report()]


def test_adaptive_threshold_needs_total_tasks():
    with pytest.raises(ValueError, match="needs total_tasks: set total_tasks"):
        InfLoRAConfig(r=2, adaptive_threshold=True)


# ----------------------------------------------------------------------------- the trainer
def _run(tmp_path, **config):
    from continual_fixtures import inflora_bert, tasks, training_args

    from peft_inflora import ContinualTrainer

    model = inflora_bert(num_labels=2, **config)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train_continual(tasks())
    return result, [w for w in caught if issubclass(w.category, SubspaceWarning)]


def test_the_trainer_logs_capacity_and_warns_with_numbers_before_a_layer_runs_out(tmp_path):
    result, caught = _run(tmp_path, energy_threshold=0.999, total_tasks=3)
    # tiny BERT (d_in = 32, r = 4): 99.9 % of the energy of random tokens needs most of the 32 directions
    assert len(result.extra["capacity"]) == 3
    for after_task in result.extra["capacity"]:
        for memory_dim, free_dim, threshold in after_task.values():
            assert memory_dim + free_dim == 32 and 0 < threshold <= 1
    messages = [str(w.message) for w in caught]
    assert any("InfLoRA capacity after task 1" in m and "of 32 dimensions" in m and "adaptive_threshold=True" in m
               for m in messages), messages


def test_with_adaptive_thresholds_every_task_keeps_room_and_nothing_is_predicted_short(tmp_path):
    result, caught = _run(tmp_path, energy_threshold=0.999, total_tasks=3, adaptive_threshold=True)
    assert not caught, [str(w.message) for w in caught]
    for t, after_task in enumerate(result.extra["capacity"]):
        assert all(free >= 4 * (3 - t - 1) for _, free, _ in after_task.values())
