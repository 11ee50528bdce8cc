"""``head_logits="cosine"``: while a task trains the head's logits are ``s cos(x, w_c)``; an aligned head is linear
again for the evaluation, an unaligned one stays cosine; bad options are refused before anything is built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from continual_fixtures import inflora_bert, tasks, training_args
from torch import nn
from transformers import HfArgumentParser

from peft_inflora import ContinualCallback, ContinualTrainer, ContinualTrainingArguments
from peft_inflora.continual.heads import CosineLogits, find_head


CLASSES = (2, 3)


def numpy_cosine_logits(x: np.ndarray, w: np.ndarray, scale: float) -> np.ndarray:
    """The independent float64 reference: s <x, w_c> / (||x|| ||w_c||)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    return scale * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T


def test_cosine_logits_equal_a_float64_reference_while_active_and_the_linear_head_otherwise():
    torch.manual_seed(0)
    head, x = nn.Linear(6, 4), torch.randn(5, 6)
    linear = head(x).detach()
    cosine = CosineLogits(scale=16.0)
    cosine.attach(head)
    np.testing.assert_allclose(head(x).detach().numpy(),
                               numpy_cosine_logits(x.numpy(), head.weight.detach().numpy(), 16.0),
                               rtol=1e-5, atol=1e-5)
    cosine.active = False
    assert torch.equal(head(x), linear)
    cosine.active = True
    cosine.detach()  # the hook is gone, not only switched off
    assert torch.equal(head(x), linear)


def test_attaching_to_a_grown_head_moves_the_hook():
    first, grown, x = nn.Linear(3, 2), nn.Linear(3, 4), torch.randn(2, 3)
    cosine = CosineLogits(scale=2.0)
    cosine.attach(first)
    cosine.attach(grown)
    assert torch.equal(first(x), nn.functional.linear(x, first.weight, first.bias))  # the old module is released
    np.testing.assert_allclose(grown(x).detach().numpy(),
                               numpy_cosine_logits(x.numpy(), grown.weight.detach().numpy(), 2.0),
                               rtol=1e-5, atol=1e-6)


class HeadProbe(ContinualCallback):
    """Records, after each task, the head's outputs on a batch of that task next to the head's inputs."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.records = trainer_ref, []

    def on_task_end(self, args, state, control, task=None, task_index=0, result=None, model=None, **kwargs):
        head = find_head(model)[1]
        seen = {}
        handle = head.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), logits=out.detach()))
        batch = self.trainer_ref[0].data_collator([task.eval_dataset[i] for i in range(4)])
        batch = {k: v for k, v in batch.items() if k != "labels"}
        model.eval()
        with torch.no_grad():
            model(**batch)
        handle.remove()
        self.records.append((seen["x"], seen["logits"], head.weight.detach().clone(), head.bias.detach().clone()))


def run(tmp_path, **overrides):
    ref: list = []
    probe = HeadProbe(ref)
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, **overrides), callbacks=[probe])
    ref.append(trainer)
    before = find_head(trainer.peft_model)[1].bias.detach().clone()
    result = trainer.train_continual(tasks(CLASSES))
    return trainer, result, probe.records, before


def test_without_alignment_the_head_is_trained_and_evaluated_as_a_cosine_head(tmp_path):
    trainer, result, records, bias_before = run(tmp_path, head_logits="cosine", classifier_alignment="none",
                                                cosine_scale=8.0)
    for x, logits, weight, bias in records:
        np.testing.assert_allclose(logits.numpy(), numpy_cosine_logits(x.numpy(), weight.numpy(), 8.0),
                                   rtol=1e-4, atol=1e-4)
    # the cosine logits never read the bias: its gradient is exactly zero, so it never moves from its zeros
    assert torch.equal(records[-1][3][: bias_before.numel()], bias_before)
    assert torch.count_nonzero(records[-1][3]) == 0
    assert len(result.accuracy_matrix) == 2


def test_with_alignment_the_aligned_head_is_evaluated_as_linear(tmp_path):
    trainer, result, records, _ = run(tmp_path, head_logits="cosine", classifier_alignment="authors")
    for x, logits, weight, bias in records:
        np.testing.assert_allclose(logits.numpy(), (x.double() @ weight.double().T + bias.double()).numpy(),
                                   rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(records[-1][3]) > 0  # alignment re-fits W x + b, bias included


def test_the_cosine_head_changes_the_training(tmp_path):
    linear = run(tmp_path / "linear", head_logits="linear", classifier_alignment="none")[2][0]
    cosine = run(tmp_path / "cosine", head_logits="cosine", classifier_alignment="none")[2][0]
    assert not torch.equal(linear[2], cosine[2])  # the trained rows differ


@pytest.mark.parametrize("overrides, head, alignment", [
    ({}, "cosine", "authors"),  # the default pair for class_incremental: the best measured
    ({"classifier_alignment": "none"}, "linear", None),  # the paper's head
    ({"classifier_alignment": "new_rows"}, "linear", "new_rows"),  # explicit choices are taken literally
    ({"classifier_alignment": "authors"}, "linear", "authors"),
    ({"head_logits": "linear"}, "linear", "new_rows"),  # auto alignment follows the head
    ({"head_logits": "cosine", "classifier_alignment": "new_rows"}, "cosine", "new_rows"),
    ({"setting": "task_incremental"}, "linear", None),
    ({"setting": "generation"}, "linear", None),
])
def test_auto_resolves_the_head_and_the_alignment_together(tmp_path, overrides, head, alignment):
    args = training_args(tmp_path, **overrides)
    assert (args.head_mode(), args.alignment_mode()) == (head, alignment)


def test_the_default_trainer_trains_a_cosine_head_and_evaluates_the_aligned_linear_head(tmp_path):
    trainer, result, records, bias_before = run(tmp_path)
    assert trainer._cosine is not None and not trainer._cosine.active  # aligned: linear at evaluation
    x, logits, weight, bias = records[0]  # after task 1 nothing is aligned yet (alignment starts at task 2)
    np.testing.assert_allclose(logits.numpy(), (x.double() @ weight.double().T + bias.double()).numpy(),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(bias[: bias_before.numel()], bias_before)  # task 1 trained cosine: the bias never moved


def test_head_logits_parses_with_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(ContinualTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--head_logits", "cosine",
                                                       "--cosine_scale", "10"])
    assert (args.head_logits, args.cosine_scale) == ("cosine", 10.0)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--head_logits", "angular"])


@pytest.mark.parametrize("overrides, match", [
    ({"head_logits": "angular"}, "head_logits must be one of"),
    ({"head_logits": "cosine", "setting": "generation"}, "setting='generation' has no classifier head"),
    ({"head_logits": "cosine", "cosine_scale": 0.0}, "cosine_scale must be a number > 0"),
    ({"head_logits": "cosine", "cosine_scale": True}, "cosine_scale must be a number > 0"),
])
def test_bad_head_options_are_refused_when_the_arguments_are_built(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        training_args(tmp_path, **overrides)
