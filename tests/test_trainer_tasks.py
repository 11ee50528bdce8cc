"""One task at a time: train_task, train_continual as its loop, restarts, downloads, train(), one output_dir, the
options as HfArgumentParser fields saved with the run, and the Seq2Seq variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import datasets
import pytest
import torch
from continual_fixtures import bert, inflora_bert, tasks, training_args
from peft import PeftModel, get_peft_model
from transformers import HfArgumentParser, TrainingArguments

from peft_inflora import (
    ContinualCallback,
    ContinualResult,
    ContinualSeq2SeqTrainer,
    ContinualSeq2SeqTrainingArguments,
    ContinualTask,
    ContinualTrainer,
    ContinualTrainingArguments,
    InfLoRAConfig,
    tokenize_instruction_dataset,
)
from peft_inflora.continual import ContinualArguments


HERE = Path(__file__).parent
CLASSES = (2, 3, 2)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "inflora" in k or "modules_to_save" in k}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The whole sequence with train_continual: (result, adapter state)."""
    args = training_args(tmp_path_factory.mktemp("ref"), num_train_epochs=1)
    trainer = ContinualTrainer(model=inflora_bert(), args=args)
    result = trainer.train_continual(tasks(CLASSES))
    return result, adapter_state(trainer.peft_model)


# ---------------------------------------------------------------------------------------------- the options
def test_every_continual_option_parses_with_hf_argument_parser_and_shows_in_help(tmp_path):
    parser = HfArgumentParser(ContinualTrainingArguments)
    help_text = parser.format_help()
    for f in fields(ContinualArguments):
        assert f"--{f.name}" in help_text and f.metadata["help"]
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--setting", "task_incremental", "--loss_classes", "seen",
        "--generation_max_new_tokens", "7", "--eval_prompt_column", "question", "--eval_answer_column", "gold",
        "--push_to_hub", "--hub_model_id", "me/x", "--push_task_revisions", "--task_revision_base", "dev",
        "--eval_metric", "rouge", "--eval_metric_key", "rougeL"])
    # the head's options: tests/test_trainer_alignment.py and tests/test_cosine_head.py
    alignment = ("classifier_alignment", "alignment_", "class_statistics_", "head_logits", "cosine_scale")
    assert {k: v for k, v in args.continual_dict().items() if not k.startswith(alignment)} == {
                                     "setting": "task_incremental", "loss_classes": "seen",
                                     "generation_max_new_tokens": 7, "eval_prompt_column": "question",
                                     "eval_answer_column": "gold", "eval_metric": "rouge", "eval_metric_key": "rougeL",
                                     "push_task_revisions": True, "task_revision_base": "dev"}
    assert json.loads(args.to_json_string())["setting"] == "task_incremental"  # saved by the Trainer's own files
    with pytest.raises(SystemExit):  # argparse knows the choices
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--setting", "SEQ_CLS"])


@pytest.mark.parametrize("overrides, match", [
    ({"setting": "SEQ_CLS"}, r"setting must be one of .*'SEQ_CLS' is a PEFT task_type: keep it in the PEFT config"),
    ({"setting": "generation", "loss_classes": "seen"}, "with setting='generation' the loss is the model's own"),
    ({"generation_max_new_tokens": 0}, "generation_max_new_tokens must be an int >= 1"),
    ({"eval_prompt_column": ""}, "eval_prompt_column must be a column name"),
])
def test_invalid_options_fail_when_the_arguments_are_made(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        training_args(tmp_path, **overrides)


def test_the_trainer_refuses_plain_training_arguments_and_the_old_keyword_options(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match=r"pass args=ContinualTrainingArguments\(\.\.\.\)"):
        ContinualTrainer(model=inflora_bert(), args=plain)
    with pytest.raises(TypeError, match=r"task_type are no longer trainer arguments.*setting=\.\.\."):
        ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path), task_type="class_incremental")
    assert not any(tmp_path.iterdir())


def test_the_options_are_saved_with_the_run(tmp_path):
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, max_steps=1, loss_classes="seen"))
    result = trainer.train_task(tasks((2,))[0])
    assert result.extra["continual_arguments"]["loss_classes"] == "seen"
    saved = json.loads((tmp_path / "continual" / "after-task-01" / "training_args.json").read_text())
    assert saved["loss_classes"] == "seen" and saved["setting"] == "class_incremental" and saved["max_steps"] == 1
    assert ContinualResult.from_json(tmp_path / "continual_result.json").extra["continual_arguments"] == \
        trainer.args.continual_dict()


# ---------------------------------------------------------------------------------------------- one task at a time
def test_train_task_one_at_a_time_is_train_continual(tmp_path, reference):
    ref_result, ref_state = reference
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, num_train_epochs=1))
    for k, task in enumerate(tasks(CLASSES)):
        result = trainer.train_task(task)
        assert result.num_learned == k + 1 and result.task_names == ["t0", "t1", "t2"][: k + 1]
        assert [t.name for t in trainer.continual_tasks] == ["t0", "t1", "t2"][: k + 1]
    assert result.accuracy_matrix == ref_result.accuracy_matrix
    assert_same_state(adapter_state(trainer.peft_model), ref_state)  # bit for bit


def test_train_task_continues_after_a_restart_from_output_dir(tmp_path, reference):
    ref_result, ref_state = reference
    seq = tasks(CLASSES)
    first = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, num_train_epochs=1))
    first.train_task(seq[0])
    first.train_task(seq[1])
    # a new process: a fresh model, a new trainer, the same output_dir
    model = inflora_bert()
    before = adapter_state(model)
    restarted = ContinualTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1))
    with pytest.raises(ValueError, match=r"learned \['t0', 't1'\].*pass previous_tasks=\[ContinualTask"):
        restarted.train_task(seq[2])
    with pytest.raises(ValueError, match="not the start of the given sequence"):
        restarted.train_task(seq[2], previous_tasks=[seq[1], seq[0]])
    assert model.tasks_done() == 0 and not model.task_in_progress()  # refused before anything changed
    assert_same_state(adapter_state(model), before)
    eval_only = [ContinualTask(t.name, None, t.eval_dataset) for t in seq[:2]]  # no training data needed
    result = restarted.train_task(seq[2], previous_tasks=eval_only)
    assert model.tasks_done() == 3 and result.accuracy_matrix == ref_result.accuracy_matrix
    assert_same_state(adapter_state(model), ref_state)


def test_train_task_continues_a_downloaded_adapter_and_its_result(tmp_path, reference):
    ref_result, ref_state = reference
    seq = tasks(CLASSES)
    uploader = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path / "up", num_train_epochs=1))
    uploader.train_task(seq[0])
    uploader.train_task(seq[1])
    repo = uploader.save_for_hub(tmp_path / "repo")
    downloaded = PeftModel.from_pretrained(bert(num_labels=5), repo, is_trainable=True)
    continuer = ContinualTrainer(model=downloaded, args=training_args(tmp_path / "down", num_train_epochs=1))
    with pytest.raises(ValueError, match="previous_result=ContinualResult.from_pretrained"):
        continuer.train_task(seq[2], previous_tasks=seq[:2])
    result = continuer.train_task(seq[2], previous_tasks=seq[:2], previous_result=repo)
    assert downloaded.tasks_done() == 3 and result.accuracy_matrix == ref_result.accuracy_matrix
    assert_same_state(adapter_state(downloaded), ref_state)


# ---------------------------------------------------------------------------------------------- train()
def test_train_learns_train_dataset_as_the_next_task_and_returns_the_train_output(tmp_path):
    seq = tasks((2, 3))
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, num_train_epochs=1),
                               train_dataset=seq[0].train_dataset, eval_dataset=seq[0].eval_dataset)
    output = trainer.train()
    assert output.global_step == 6 and output.training_loss > 0  # 48 examples, batches of 8, one epoch
    assert trainer.continual_result.task_names == ["task-1"] and trainer.peft_model.tasks_done() == 1
    assert trainer.train_dataset is seq[0].train_dataset  # the user's data, not the relabelled copy
    trainer.train_dataset, trainer.eval_dataset = seq[1].train_dataset, seq[1].eval_dataset
    trainer.train()
    assert trainer.continual_result.task_names == ["task-1", "task-2"]
    assert [len(row) for row in trainer.continual_result.accuracy_matrix] == [1, 2]


@pytest.mark.parametrize("case, match", [
    ("no eval_dataset", r"pass both .* or call\s+trainer.train_task"),
    ("mid-task checkpoint", "not from a given checkpoint path"),
])
def test_train_refuses_before_anything_changes(tmp_path, case, match):
    seq = tasks((2,))
    model = inflora_bert()
    before = adapter_state(model)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1),
                               train_dataset=seq[0].train_dataset,
                               eval_dataset=None if case == "no eval_dataset" else seq[0].eval_dataset)
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3") if case != "no eval_dataset" else None)
    assert model.tasks_done() == 0 and trainer.continual_result is None and not (tmp_path / "continual").exists()
    assert_same_state(adapter_state(model), before)


def test_bad_tasks_fail_before_anything_changes(tmp_path):
    seq = tasks((2, 2))
    model = inflora_bert()
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path, max_steps=1))
    trainer.train_task(seq[0])
    state = adapter_state(model)
    with pytest.raises(ValueError, match=r"'t0' is already learned"):
        trainer.train_task(seq[0])
    with pytest.raises(ValueError, match="has no eval_dataset"):
        trainer.train_task(ContinualTask("t1", seq[1].train_dataset, None))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.0"):
        trainer.train_task(ContinualTask("t1", seq[1].train_dataset, seq[1].eval_dataset, label_names=["a"]))
    assert model.tasks_done() == 1 and not model.task_in_progress() and trainer.continual_result.num_learned == 1
    assert_same_state(adapter_state(model), state)
    assert [p.name for p in (tmp_path / "continual").iterdir()] == ["after-task-01"]  # no checkpoint of a t1


def test_an_exception_while_training_aborts_the_task_and_it_can_be_learned_again(tmp_path):
    class Boom(ContinualCallback):
        armed = True

        def on_step_end(self, args, state, control, **kwargs):
            if Boom.armed:
                Boom.armed = False
                raise RuntimeError("boom")

    model = inflora_bert()
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path, max_steps=2), callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train_task(tasks((2,))[0])
    assert model.tasks_done() == 0 and not model.task_in_progress() and trainer.continual_tasks == []
    assert trainer.train_task(tasks((2,))[0]).num_learned == 1


# ---------------------------------------------------------------------------------------------- callbacks
def test_callbacks_see_one_output_dir_and_the_trainer_checkpoints_go_to_a_task_folder(tmp_path):
    seen = []

    class Recorder(ContinualCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(("train_begin", args.output_dir))

        def on_save(self, args, state, control, **kwargs):
            seen.append(("save", args.output_dir))

        def on_task_begin(self, args, state, control, task, task_index, **kwargs):
            seen.append(("task_begin", args.output_dir))

        def on_task_end(self, args, state, control, task, task_index, result, **kwargs):
            seen.append(("task_end", args.output_dir))

    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = ContinualTrainer(model=inflora_bert(), args=args, callbacks=[Recorder()])
    trainer.train_continual(tasks((2, 2)))
    assert {event for event, _ in seen} == {"train_begin", "save", "task_begin", "task_end"}
    assert {folder for _, folder in seen} == {str(tmp_path)}
    for k, name in ((1, "t0"), (2, "t1")):
        task_folder = tmp_path / "continual" / f"task-{k:02d}-{name}"
        assert (task_folder / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------- layers
def test_import_peft_inflora_loads_no_application_machinery():
    code = ("import sys, peft_inflora\n"
            "heavy = [m for m in ('peft_inflora.continual', 'transformers.trainer', 'matplotlib', 'datasets', "
            "'evaluate') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert peft_inflora.ContinualTrainer.__module__ == 'peft_inflora.continual.trainer'\n"
            "assert 'matplotlib' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- seq2seq
def test_the_seq2seq_variant_learns_a_tiny_generation_task(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = "colour of grass sky ? green blue".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]",
                                        unk_token="[UNK]")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    model = get_peft_model(T5ForConditionalGeneration(config), InfLoRAConfig(r=4, target_modules=["q", "v", "o"]))
    pairs = {"prompt": ["colour of grass ?", "colour of sky ?"], "answer": ["green", "blue"]}
    raw = datasets.Dataset.from_dict({k: v * 8 for k, v in pairs.items()})
    train = tokenize_instruction_dataset(raw, tokenizer, is_encoder_decoder=True)
    args = ContinualSeq2SeqTrainingArguments(
        output_dir=str(tmp_path), setting="generation", generation_max_new_tokens=3, num_train_epochs=30,
        learning_rate=5e-2, per_device_train_batch_size=16, report_to="none", save_strategy="no",
        logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = ContinualSeq2SeqTrainer(model=model, args=args, processing_class=tokenizer,
                                      data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
    result = trainer.train_task(ContinualTask("colours", train, datasets.Dataset.from_dict(pairs)))
    assert result.accuracy_matrix == [[1.0]] and model.tasks_done() == 1
    assert result.extra["setting"] == "generation"
