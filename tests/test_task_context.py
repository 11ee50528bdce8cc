"""``with model.task(batches):`` runs one task: begin_task on entry, end_task on normal exit, abort_task when the block
raises (the memory and the finished tasks untouched, the exception re-raised as it was).

On a tiny random BERT; ``peft_model.task`` reaches ``InfLoRAModel.task`` through PEFT's attribute forwarding.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import model_outputs, text_classification_batches, tiny_bert, train_steps

from peft_inflora import InfLoRAConfig, InfLoRAModel, StatisticsError, TaskLifecycleError


class Boom(Exception):
    """Raised inside the ``with`` block by the tests."""


def make_model(fold: str = "adapter"):
    # no task_type: the classifier stays frozen, so everything a task may change is InfLoRA state (and, with
    # fold="base", the base weights)
    config = InfLoRAConfig(r=4, target_modules=["query", "value"], fold=fold, statistics_max_tokens=None)
    return get_peft_model(tiny_bert(seed=0), config)


def batches(task: int) -> list[dict]:
    return text_classification_batches(seed=task, n_batches=3)


def learn_first_task(model) -> None:
    model.begin_task(batches(0), progress=False)
    train_steps(model, batches(0))
    model.end_task(batches(0), progress=False)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict (base weights, design, past factors, memory, ranks, thresholds)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed[:5]}"


def memory_dimensions(model) -> dict[str, int]:
    return {n: layer.get_memory("default").dimension for n, layer in model.base_model.inflora_layers().items()}


# ---------------------------------------------------------------------------------------------- normal exit
def test_normal_exit_ends_the_task_exactly_like_begin_train_end():
    with_block, by_hand = make_model(), make_model()
    for model in (with_block, by_hand):
        learn_first_task(model)
    before = memory_dimensions(with_block)

    with with_block.task(batches(1), progress=False) as ranks:
        assert with_block.task_in_progress()
        train_steps(with_block, batches(1))
    by_hand_ranks = by_hand.begin_task(batches(1), progress=False)
    train_steps(by_hand, batches(1))
    by_hand.end_task(batches(1), progress=False)

    assert ranks == by_hand_ranks and set(ranks.values()) == {4}
    assert with_block.tasks_done() == 2 and not with_block.task_in_progress()
    after = memory_dimensions(with_block)
    assert all(after[n] >= before[n] for n in before) and any(after[n] > before[n] for n in before)
    assert_bit_identical(snapshot(by_hand), snapshot(with_block))


def test_the_first_task_can_be_learned_in_a_block():
    model = make_model()
    with model.task(batches(0), progress=False):
        train_steps(model, batches(0))
    assert model.tasks_done() == 1 and all(d > 0 for d in memory_dimensions(model).values())


# ---------------------------------------------------------------------------------------------- an exception inside
@pytest.mark.parametrize("fold", ["adapter", "base"])
def test_an_exception_inside_aborts_the_task_and_is_re_raised(fold):
    model = make_model(fold)
    learn_first_task(model)
    before, outputs_before = snapshot(model), model_outputs(model, batches(0))
    error = Boom("training failed")

    with pytest.raises(Boom) as raised:
        with model.task(batches(1), progress=False):
            train_steps(model, batches(1))  # the branch moves: the outputs on task 1's data change
            raise error

    assert raised.value is error  # the very exception, not a wrapper
    assert not model.task_in_progress() and model.tasks_done() == 1
    assert_bit_identical(before, snapshot(model))  # memory, finished tasks, base weights: as before the block
    assert torch.equal(outputs_before, model_outputs(model, batches(0)))
    with model.task(batches(1), progress=False):  # and the task can be learned again
        train_steps(model, batches(1))
    assert model.tasks_done() == 2


def test_keyboard_interrupt_inside_aborts_too():
    model = make_model()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        with model.task(batches(0), progress=False):
            raise KeyboardInterrupt
    assert not model.task_in_progress()
    assert_bit_identical(before, snapshot(model))


def test_a_block_that_aborted_the_task_itself_is_not_aborted_twice():
    model = make_model()
    with pytest.raises(Boom):  # not the TaskLifecycleError a second abort_task would raise
        with model.task(batches(0), progress=False):
            model.abort_task()
            raise Boom
    assert not model.task_in_progress() and model.tasks_done() == 0


# ---------------------------------------------------------------------------------------------- a failing begin_task
def _count_aborts(monkeypatch) -> list:
    calls = []
    original = InfLoRAModel.abort_task

    def spy(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InfLoRAModel, "abort_task", spy)
    return calls


def test_a_failing_begin_task_changes_nothing_and_runs_no_block_and_no_abort(monkeypatch):
    model = make_model()
    learn_first_task(model)
    before, aborts = snapshot(model), _count_aborts(monkeypatch)
    with pytest.raises(StatisticsError, match="empty"):
        with model.task([], progress=False):
            pytest.fail("the block ran although begin_task failed")
    assert aborts == []
    assert not model.task_in_progress() and model.tasks_done() == 1
    assert_bit_identical(before, snapshot(model))


def test_a_block_opened_while_a_task_is_in_progress_leaves_that_task_alone(monkeypatch):
    """begin_task refuses (a task is in progress): the task begun by hand must not be aborted by the block."""
    model = make_model()
    model.begin_task(batches(0), progress=False)
    train_steps(model, batches(0))
    before, aborts = snapshot(model), _count_aborts(monkeypatch)
    with pytest.raises(TaskLifecycleError, match="already in progress"):
        with model.task(batches(1), progress=False):
            pytest.fail("the block ran although begin_task failed")
    assert aborts == [] and model.task_in_progress()
    assert_bit_identical(before, snapshot(model))  # the trained A_t of the task in progress included


def test_a_one_shot_iterator_is_refused_before_anything_changes(monkeypatch):
    model = make_model()
    before, aborts = snapshot(model), _count_aborts(monkeypatch)
    with pytest.raises(StatisticsError, match="iterator .* list of batches or a DataLoader"):
        with model.task(iter(batches(0)), progress=False):
            pytest.fail("the block ran")
    assert aborts == [] and not model.task_in_progress()
    assert_bit_identical(before, snapshot(model))


# ---------------------------------------------------------------------------------------------- a failing end_task
def test_a_failing_end_task_keeps_the_task_in_progress():
    """end_task changes nothing when it fails (here: a diverged A_t), so the task stays open to be aborted."""
    model = make_model()
    with pytest.raises(ValueError, match="NaN or inf"):
        with model.task(batches(0), progress=False):
            train_steps(model, batches(0))
            with torch.no_grad():
                next(iter(model.base_model.inflora_layers().values())).inflora_A["default"].fill_(float("nan"))
    assert model.task_in_progress() and model.tasks_done() == 0
    model.abort_task()
    assert not model.task_in_progress()
