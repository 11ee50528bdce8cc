"""Classifier alignment inside the continual trainer: the options, what alignment changes (the head, nothing else),
class statistics from the last training epoch's own forwards, their file next to the adapter, and a sequence
continued from a saved folder equal to the uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from continual_fixtures import bert, inflora_bert, tasks, training_args
from peft import PeftModel
from transformers import HfArgumentParser

from peft_inflora import ContinualCallback, ContinualTask, ContinualTrainer, ContinualTrainingArguments
from peft_inflora.continual import (
    CLASS_STATISTICS_FILE,
    ClassStatistics,
    collect_class_statistics,
    load_class_statistics,
)
from peft_inflora.continual.checkpoint import checkpoint_dir
from peft_inflora.continual.heads import find_head
from peft_inflora.continual.hub import HUB_FILES


CLASSES = (2, 3, 2)


def head_of(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    head = find_head(trainer.peft_model)[1]
    return head.weight.detach().clone(), head.bias.detach().clone()


def backbone_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model but the classifier head (its copies in modules_to_save and the original)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "classifier" not in k}


def full_state(model) -> dict[str, torch.Tensor]:
    """Every tensor but the head's unused original (a downloaded model's is the base model's own random init)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "original_module" not in k}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run(tmp_path, **overrides):
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, **overrides))
    result = trainer.train_continual(tasks(CLASSES))
    return trainer, result


# ---------------------------------------------------------------------------------------------- the options
def test_the_alignment_options_parse_with_hf_argument_parser_and_resolve_their_defaults(tmp_path):
    parser = HfArgumentParser(ContinualTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--classifier_alignment", "authors", "--alignment_epochs", "3",
        "--alignment_samples_per_class", "64", "--alignment_lr", "0.05", "--alignment_mean_decay", "false",
        "--alignment_logit_temperature", "0.2", "--class_statistics_storage", "shared", "--class_statistics_rank",
        "4", "--class_statistics_source", "extra_pass"])
    assert (args.alignment_mode(), args.alignment_epochs, args.alignment_samples_per_class, args.alignment_lr,
            args.alignment_decay(), args.alignment_logit_temperature, args.class_statistics_storage,
            args.class_statistics_rank, args.class_statistics_source) == \
        ("authors", 3, 64, 0.05, False, 0.2, "shared", 4, "extra_pass")
    with pytest.raises(SystemExit):  # argparse knows the choices
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--classifier_alignment", "ncm"])
    # defaults: the best measured head for class_incremental (a cosine head, then the authors' alignment; with a
    # linear head the new rows only), nothing where alignment does not apply
    assert training_args(tmp_path).alignment_mode() == "authors"
    assert training_args(tmp_path, head_logits="linear").alignment_mode() == "new_rows"
    assert not training_args(tmp_path, head_logits="linear").alignment_decay()  # new_rows: no mean decay
    assert training_args(tmp_path, classifier_alignment="authors").alignment_decay()  # the authors' code
    assert training_args(tmp_path, setting="task_incremental").alignment_mode() is None
    assert training_args(tmp_path, setting="generation").alignment_mode() is None
    assert training_args(tmp_path, classifier_alignment="none").alignment_mode() is None
    assert training_args(tmp_path).class_statistics_storage == "lowrank"
    assert training_args(tmp_path).class_statistics_source == "last_epoch"


@pytest.mark.parametrize("overrides, match", [
    ({"classifier_alignment": "ncm"}, "classifier_alignment must be one of"),
    ({"setting": "generation", "classifier_alignment": "new_rows"}, "generation has no classifier head"),
    ({"setting": "task_incremental", "classifier_alignment": "authors"},
     "task_incremental evaluates each task among its own classes"),
    ({"alignment_epochs": 0}, "alignment_epochs must be an int >= 1"),
    ({"alignment_samples_per_class": 2.5}, "alignment_samples_per_class must be an int >= 1"),
    ({"alignment_lr": 0.0}, "alignment_lr must be a number > 0"),
    ({"alignment_mean_decay": "yes"}, "alignment_mean_decay must be True, False or None"),
    ({"alignment_logit_temperature": -1.0}, "or None to turn the logit normalisation off"),
    ({"class_statistics_storage": "diagonal"}, "class_statistics_storage must be one of"),
    ({"class_statistics_rank": 0}, "class_statistics_rank must be an int >= 1"),
    ({"class_statistics_source": "test_set"}, "class_statistics_source must be one of"),
])
def test_invalid_alignment_options_fail_when_the_arguments_are_made(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        training_args(tmp_path, **overrides)


# ---------------------------------------------------------------------------------------------- what alignment changes
class HeadAfterTask(ContinualCallback):
    def __init__(self) -> None:
        self.heads = []

    def on_task_end(self, args, state, control, model=None, **kwargs):
        head = find_head(model)[1]
        self.heads.append(head.weight.detach().clone())


@pytest.mark.parametrize("mode", ["new_rows", "authors"])
def test_alignment_changes_only_the_head_and_new_rows_only_the_new_tasks_rows(tmp_path, mode):
    plain, plain_result = run(tmp_path / "plain", classifier_alignment="none")
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path / mode, classifier_alignment=mode))
    after = HeadAfterTask()
    trainer.add_callback(after)
    result = trainer.train_continual(tasks(CLASSES))
    # the backbone, the adapter and its memory are bit-identical to a run without alignment on the same seed
    assert_same(backbone_state(trainer.peft_model), backbone_state(plain.peft_model))
    assert result.accuracy_matrix[0] == plain_result.accuracy_matrix[0]  # nothing to align after the first task
    weight, plain_weight = head_of(trainer)[0], head_of(plain)[0]
    first, second, third = slice(0, 2), slice(2, 5), slice(5, 7)
    assert not torch.equal(weight[third], plain_weight[third])  # the last task's rows were aligned
    if mode == "new_rows":
        assert torch.equal(weight[first], plain_weight[first])  # the first task's rows are as trained
        assert torch.equal(after.heads[2][second], after.heads[1][second])  # older rows never move again
    else:
        assert not torch.equal(weight[first], plain_weight[first])  # the authors re-train every seen row
    assert trainer.class_statistics.tasks.tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_alignment_refuses_to_continue_a_checkpoint_without_class_statistics(tmp_path):
    seq = tasks(CLASSES)
    first = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, classifier_alignment="none"))
    first.train_task(seq[0])
    model = inflora_bert()
    before = full_state(model)
    aligned = ContinualTrainer(model=model, args=training_args(tmp_path))  # alignment on by default
    with pytest.raises(ValueError, match=r"holds no class statistics \(class_statistics.safetensors\) for classes "
                                         r"\[0, 1\].*classifier_alignment='none'"):
        aligned.train_task(seq[1], previous_tasks=seq[:1])
    assert model.tasks_done() == 0 and aligned.continual_tasks == []  # refused before anything changed
    assert_same(full_state(model), before)


# ---------------------------------------------------------------------------------------------- the statistics
class RecordingTrainer(ContinualTrainer):
    """Keeps every training forward's head input with its labels, task and epoch (independently of the trainer's
    own recorder), to recompute the statistics directly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows, self._pending = [], None
        self.add_callback(_HookHead(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._pending = (inputs["labels"].clone(), self._current[0] - 1, float(self.state.epoch))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class _HookHead(ContinualCallback):
    def __init__(self, trainer) -> None:
        self.trainer, self.handle = trainer, None

    def on_task_begin(self, args, state, control, model=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()

        def hook(module, inputs):
            if self.trainer._pending is not None and module.training:
                labels, task, epoch = self.trainer._pending
                self.trainer.rows.append((inputs[0].detach().double().numpy(), labels.numpy(), task, epoch))
                self.trainer._pending = None

        self.handle = find_head(model)[1].register_forward_pre_hook(hook)


def test_last_epoch_statistics_equal_a_direct_computation_on_the_same_features(tmp_path):
    epochs = 2
    trainer = RecordingTrainer(model=inflora_bert(), args=training_args(
        tmp_path, num_train_epochs=epochs, class_statistics_storage="full"))
    seq = tasks(CLASSES)
    trainer.train_continual(seq)
    stats = trainer.class_statistics
    assert stats.storage == "full" and stats.classes.tolist() == list(range(7))
    for index in range(len(stats)):
        c, task = int(stats.classes[index]), int(stats.tasks[index])
        rows = [(x, y) for x, y, t, e in trainer.rows if t == task and e >= epochs - 1]  # the last epoch only
        x = np.concatenate([x for x, _ in rows])
        y = np.concatenate([y for _, y in rows])
        mine = x[y == c]
        assert int(stats.counts[index]) == mine.shape[0] == sum(1 for label in seq[task].train_dataset["label"]
                                                                if label + [0, 2, 5][task] == c)
        np.testing.assert_allclose(stats.means[index].numpy(), mine.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.covariances[index].numpy(), np.cov(mine, rowvar=False, ddof=1),
                                   rtol=1e-9, atol=1e-12)
    assert stats.means.dtype == torch.float64


def test_extra_pass_statistics_of_the_last_task_equal_an_eval_pass_after_training(tmp_path):
    trainer, _ = run(tmp_path, class_statistics_source="extra_pass", class_statistics_storage="full")
    head = find_head(trainer.peft_model)[1]
    direct = collect_class_statistics(trainer.peft_model, head, _loader(tasks(CLASSES)[2], offset=5))
    classes, counts, means, covs = direct.moments()
    stats = trainer.class_statistics
    last = stats.tasks == 2
    assert stats.classes[last].tolist() == classes == [5, 6]
    assert torch.equal(stats.counts[last], counts)
    torch.testing.assert_close(stats.means[last], means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.covariances[last], covs, rtol=1e-8, atol=1e-10)


def _loader(task: ContinualTask, offset: int):
    dataset = task.train_dataset.map(lambda b: {"labels": [y + offset for y in b["label"]]}, batched=True)
    dataset = dataset.remove_columns(["label"]).with_format("torch")
    return torch.utils.data.DataLoader(dataset, batch_size=8)


# ---------------------------------------------------------------------------------------------- files and continuation
def test_the_statistics_are_saved_next_to_the_adapter_and_load_back_bit_for_bit(tmp_path):
    trainer, _ = run(tmp_path / "run")
    stats = trainer.class_statistics
    assert CLASS_STATISTICS_FILE in HUB_FILES  # push_to_hub and the per-task pushes upload it
    saved = load_class_statistics(checkpoint_dir(tmp_path / "run", 3))
    assert saved.storage == "lowrank" and saved.rank == 16 and isinstance(saved, ClassStatistics)
    assert_same(saved.state_dict(), stats.state_dict())
    assert load_class_statistics(checkpoint_dir(tmp_path / "run", 1)).classes.tolist() == [0, 1]  # task 1 only
    folder = trainer.save_for_hub(str(tmp_path / "repo"))
    assert_same(load_class_statistics(folder).state_dict(), stats.state_dict())
    plain = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path / "plain", classifier_alignment="none"))
    plain.train_task(tasks(CLASSES)[0])
    assert load_class_statistics(checkpoint_dir(tmp_path / "plain", 1)) is None  # nothing written without alignment


@pytest.mark.parametrize("mode, storage", [("new_rows", "lowrank"), ("authors", "full")])
def test_a_sequence_continued_from_output_dir_or_a_saved_folder_equals_the_uninterrupted_run(
        tmp_path, mode, storage):
    options = dict(classifier_alignment=mode, class_statistics_storage=storage)
    reference, ref_result = run(tmp_path / "ref", **options)
    seq = tasks(CLASSES)
    # 1. restart in the same output_dir after two tasks
    first = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path / "restart", **options))
    first.train_task(seq[0])
    first.train_task(seq[1])
    restarted = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path / "restart", **options))
    result = restarted.train_continual(seq, resume_from_checkpoint=True)
    assert result.accuracy_matrix == ref_result.accuracy_matrix
    assert_same(full_state(restarted.peft_model), full_state(reference.peft_model))  # head bit-identical
    # 2. a saved folder (the Hub stand-in), continued by a fresh trainer elsewhere
    uploader = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path / "up", **options))
    uploader.train_task(seq[0])
    uploader.train_task(seq[1])
    repo = uploader.save_for_hub(str(tmp_path / "repo"))
    downloaded = PeftModel.from_pretrained(bert(num_labels=5), repo, is_trainable=True)
    continuer = ContinualTrainer(model=downloaded, args=training_args(tmp_path / "down", **options))
    result = continuer.train_task(seq[2], previous_tasks=seq[:2], previous_result=repo)
    assert result.accuracy_matrix == ref_result.accuracy_matrix
    assert_same(full_state(downloaded), full_state(reference.peft_model))
