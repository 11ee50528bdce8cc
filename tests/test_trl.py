"""ContinualSFTTrainer: TRL's SFTTrainer made continual. Tasks in SFT formats (conversational messages,
prompt/completion), the loss on completions only, statistics over the trainer's own batches, exact-match rows."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest


pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from chat_tokenizer import chat_tokenizer  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

import peft_inflora.model  # noqa: E402
from peft_inflora import ContinualTask, ContinualTrainingArguments, InfLoRAConfig  # noqa: E402
from peft_inflora.continual import ContinualArguments  # noqa: E402
from peft_inflora.trl import ContinualSFTConfig, ContinualSFTTrainer  # noqa: E402


# questions of different lengths, so that batches hold padding
COLOURS = [("colour of grass ?", "green"), ("colour of the sky ?", "blue"), ("colour of snow in winter ?", "white")]
ANIMALS = [("animal that barks ?", "dog"), ("the animal that meows ?", "cat"),
           ("animal that moos in the field ?", "cow")]


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def conversations(pairs) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}] for q, a in pairs]})


def prompt_completions(pairs, conversational: bool = False) -> datasets.Dataset:
    if conversational:
        return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q, _ in pairs],
                                           "completion": [[{"role": "assistant", "content": a}] for _, a in pairs]})
    return datasets.Dataset.from_dict({"prompt": [q for q, _ in pairs], "completion": [" " + a for _, a in pairs]})


def inflora_llama():
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(tiny_llama(seed=0), InfLoRAConfig(r=8, target_modules=targets))


def sft_config(output_dir, **overrides) -> ContinualSFTConfig:
    kwargs = dict(output_dir=str(output_dir), num_train_epochs=20, learning_rate=5e-2, per_device_train_batch_size=4,
                  per_device_eval_batch_size=8, generation_max_new_tokens=3, report_to="none", save_strategy="no",
                  logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, max_length=32)
    kwargs.update(overrides)
    return ContinualSFTConfig(**kwargs)


class StatisticsSpy:
    """Records, for every statistics pass (begin_task, end_task), the batches it read and the token count of each
    input group (wraps ``collect_statistics`` as model.py calls it)."""

    def __init__(self, monkeypatch):
        self.passes: list[tuple[list[dict], list[int]]] = []
        original = peft_inflora.model.collect_statistics

        def spy(model, layers, batches, **kwargs):
            read = []

            class Recorded:  # keeps len() for the pass's batch cap
                def __len__(self):
                    return len(batches)

                def __iter__(self):
                    for batch in batches:
                        read.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
                        yield batch

            groups = original(model, layers, Recorded(), **kwargs)
            self.passes.append((read, [int(g.accumulator.count.item()) for g in groups]))
            return groups

        monkeypatch.setattr(peft_inflora.model, "collect_statistics", spy)


@pytest.fixture(scope="module")
def two_chat_tasks(tokenizer, tmp_path_factory):
    """Two conversational tasks learned with train_continual; (trainer, result, statistics passes)."""
    monkeypatch = pytest.MonkeyPatch()
    spy = StatisticsSpy(monkeypatch)
    try:
        tasks = [ContinualTask("colours", conversations(COLOURS * 4), conversations(COLOURS)),
                 ContinualTask("animals", conversations(ANIMALS * 4), conversations(ANIMALS))]
        trainer = ContinualSFTTrainer(model=inflora_llama(), args=sft_config(tmp_path_factory.mktemp("chat")),
                                      processing_class=tokenizer)
        result = trainer.train_continual(tasks)
    finally:
        monkeypatch.undo()
    return trainer, result, spy.passes


# ---------------------------------------------------------------------------------------------- the config
def test_the_config_parses_with_hf_argument_parser_and_defaults_to_generation(tmp_path):
    parser = HfArgumentParser(ContinualSFTConfig)
    help_text = parser.format_help()
    for f in fields(ContinualArguments):
        assert f"--{f.name}" in help_text
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--generation_max_new_tokens", "5", "--eval_prompt_column", "question",
        "--max_length", "64", "--assistant_only_loss", "False", "--use_cpu"])
    assert (args.setting, args.generation_max_new_tokens, args.eval_prompt_column, args.eval_answer_column) == (
        "generation", 5, "question", "completion")
    assert args.max_length == 64 and args.assistant_only_loss is False  # SFTConfig's own fields parse alongside
    assert ContinualSFTConfig(output_dir=str(tmp_path), use_cpu=True).assistant_only_loss is True
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--setting", "class_incremental"])
    with pytest.raises(ValueError, match="setting must be 'generation'"):
        ContinualSFTConfig(output_dir=str(tmp_path), use_cpu=True, setting="class_incremental")


def test_the_trainer_needs_a_continual_sft_config(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="ContinualSFTConfig"):
        ContinualSFTTrainer(model=inflora_llama(), args=ContinualTrainingArguments(output_dir=str(tmp_path)),
                            processing_class=tokenizer)


# ---------------------------------------------------------------------------------------------- two chat tasks
def test_two_conversational_tasks_give_a_two_row_matrix_and_two_finished_tasks(two_chat_tasks):
    trainer, result, _ = two_chat_tasks
    assert len(result.accuracy_matrix) == 2 and len(result.accuracy_matrix[1]) == 2
    assert result.accuracy_matrix[0][0] == 1.0  # every answer of task 1, generated exactly after task 1
    assert result.accuracy_matrix[1][1] == 1.0
    assert trainer.peft_model.tasks_done() == 2 and not trainer.peft_model.task_in_progress()
    assert result.task_names == ["colours", "animals"]


def test_only_the_assistant_answer_carries_labels_in_the_trained_batches(two_chat_tasks, tokenizer):
    _, _, passes = two_chat_tasks
    eos = tokenizer.eos_token_id
    for batches, _ in passes:
        for batch in batches:
            assert set(batch) == {"input_ids", "attention_mask", "labels"}  # TRL's collator, not padding_free
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                real = ids[mask.bool()].tolist()
                # "[USER] <question words> [ASSISTANT] <answer> [EOS]": labels on the answer and [EOS] only
                assert real[0] == tokenizer.convert_tokens_to_ids("[USER]") and real[-1] == eos
                labelled = (labels != -100).nonzero().flatten().tolist()
                assert labelled == [len(real) - 2, len(real) - 1]
                assert labels[labelled].tolist() == real[-2:]
                assert real[-3] == tokenizer.convert_tokens_to_ids("[ASSISTANT]")


def test_the_statistics_count_every_non_padding_token_of_the_batches_they_read(two_chat_tasks):
    _, _, passes = two_chat_tasks
    assert len(passes) == 4  # begin_task and end_task of each task
    for batches, counts in passes:
        assert batches, "a statistics pass read no batch"
        non_padding = sum(int(b["attention_mask"].sum()) for b in batches)
        labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        assert counts and all(c == non_padding for c in counts)  # prompt tokens too, padding left out
        assert labelled < non_padding < padded  # (the batches do hold padding and prompt tokens)


def test_the_eval_prompt_is_the_trained_sequence_up_to_the_answer(two_chat_tasks, tokenizer):
    trainer = two_chat_tasks[0]
    task = ContinualTask("colours", conversations(COLOURS), conversations(COLOURS))
    prompts, references = trainer.generation_references(task.eval_dataset)
    assert references == [answer for _, answer in COLOURS]  # the last (assistant) message
    for prompt, row in zip(prompts, trainer.prepare_train_dataset(task.train_dataset, task)):
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert prompt == row["input_ids"][:start]  # chat template + generation prompt, nothing added twice
        assert prompt[-1] == tokenizer.convert_tokens_to_ids("[ASSISTANT]")


# ---------------------------------------------------------------------------------------------- prompt/completion
def test_prompt_completion_tasks_learned_one_at_a_time_with_train_task(tokenizer, tmp_path):
    trainer = ContinualSFTTrainer(model=inflora_llama(), args=sft_config(tmp_path), processing_class=tokenizer)
    plain = ContinualTask("colours", prompt_completions(COLOURS * 4), prompt_completions(COLOURS))
    chat = ContinualTask("animals", prompt_completions(ANIMALS * 4, conversational=True),
                         prompt_completions(ANIMALS, conversational=True))
    for task in (plain, chat):
        prepared = trainer.prepare_train_dataset(task.train_dataset, task)
        for row, (question, answer) in zip(prepared, COLOURS if task is plain else ANIMALS):
            labelled = [t for t in row["labels"] if t != -100]
            assert labelled == tokenizer(f"{answer} [EOS]", add_special_tokens=False)["input_ids"]
            assert len(row["labels"]) == len(row["input_ids"]) > len(labelled)
    first = trainer.train_task(plain)
    assert first.accuracy_matrix == [[1.0]] and trainer.peft_model.tasks_done() == 1
    second = trainer.train_task(chat)
    assert len(second.accuracy_matrix) == 2 and second.accuracy_matrix[1][1] == 1.0
    assert trainer.peft_model.tasks_done() == 2 and second.task_names == ["colours", "animals"]


def test_train_learns_the_trainers_own_datasets_and_evaluate_prepares_the_eval_dataset(tokenizer, tmp_path):
    train, test = conversations(COLOURS * 2), conversations(COLOURS)
    trainer = ContinualSFTTrainer(model=inflora_llama(), args=sft_config(tmp_path, max_steps=2),
                                  train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    assert trainer.train_dataset is train and trainer.eval_dataset is test  # kept as given, not the stand-in
    output = trainer.train()
    assert output.global_step == 2
    assert trainer.continual_result.task_names == ["task-1"] and len(trainer.continual_result.accuracy_matrix) == 1
    assert trainer.peft_model.tasks_done() == 1
    metrics = trainer.evaluate()  # the messages eval set, tokenized with its assistant mask
    assert metrics["eval_loss"] > 0 and trainer.eval_dataset is test


def test_padding_free_batches_count_every_token_of_the_flattened_row(tokenizer, tmp_path, monkeypatch):
    spy = StatisticsSpy(monkeypatch)
    trainer = ContinualSFTTrainer(model=inflora_llama(), args=sft_config(tmp_path, max_steps=1, padding_free=True,
                                                                         max_length=None),
                                  processing_class=tokenizer)
    trainer.train_task(ContinualTask("colours", conversations(COLOURS * 4), conversations(COLOURS)))
    assert len(spy.passes) == 2
    for batches, counts in spy.passes:
        assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 for b in batches)
        tokens = sum(b["input_ids"].numel() for b in batches)  # one row, no padding
        assert all(c == tokens for c in counts)
        assert sum(int((b["labels"] != -100).sum()) for b in batches) < tokens


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("make_task, match", [
    (lambda: ContinualTask("t", datasets.Dataset.from_dict({"text": ["colour of grass ? green"]}),
                           prompt_completions(COLOURS)), "plain text .* set assistant_only_loss=False"),
    (lambda: ContinualTask("t", conversations(COLOURS), datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "colour of sky ?"}]]})), "last message .* assistant"),
    (lambda: ContinualTask("t", conversations(COLOURS), datasets.Dataset.from_dict({"question": ["x"]})),
     "neither 'messages' nor the column"),
])
def test_bad_tasks_fail_before_anything_changes(tokenizer, tmp_path, make_task, match):
    trainer = ContinualSFTTrainer(model=inflora_llama(), args=sft_config(tmp_path), processing_class=tokenizer)
    with pytest.raises(ValueError, match=match):
        trainer.train_continual([make_task()])
    assert trainer.peft_model.tasks_done() == 0 and not trainer.peft_model.task_in_progress()
    assert trainer.continual_result is None


# ---------------------------------------------------------------------------------------------- optional extra
def test_peft_inflora_does_not_import_trl_and_peft_inflora_trl_names_the_extra_without_it():
    code = (
        "import sys\n"
        "import peft_inflora, peft_inflora.continual\n"
        "assert 'trl' not in sys.modules, 'import peft_inflora imported trl'\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'trl' or name.startswith('trl.'):\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import peft_inflora.trl\n"
        "except ImportError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    raise SystemExit('peft_inflora.trl imported without trl')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "peft-inflora[trl]"' in out.stdout
