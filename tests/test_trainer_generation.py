"""ContinualTrainer on generative tasks: loss on answer tokens only, exact match of greedy generations."""

from __future__ import annotations

import datasets
import pytest
import torch
from continual_fixtures import training_args
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_inflora import ContinualTask, ContinualTrainer, InfLoRAConfig, tokenize_instruction_dataset


WORDS = "colour of grass sky animal that barks meows ? green blue dog cat".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over a 13-word vocabulary: a tiny model learns fast."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]")


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(cfg)


def instruction_task(name: str, pairs: list[tuple[str, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "answer": [a for _, a in pairs]})


def test_tokenized_instructions_put_the_loss_on_answer_tokens_only(tokenizer):
    ds = tokenize_instruction_dataset(instruction_task("t", [("colour of grass ?", "green")]), tokenizer)
    row = ds[0]
    prompt_len = len(tokenizer("colour of grass ?")["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    answer = tokenizer.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
    assert answer == "green"
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])


def test_generation_tasks_are_learned_and_scored_by_exact_match(tokenizer, tmp_path):
    pairs_a = [("colour of grass ?", "green"), ("colour of sky ?", "blue")]
    pairs_b = [("animal that barks ?", "dog"), ("animal that meows ?", "cat")]
    tasks = []
    for name, pairs in (("colours", pairs_a), ("animals", pairs_b)):
        raw = instruction_task(name, pairs * 8)
        tasks.append(ContinualTask(name, tokenize_instruction_dataset(raw, tokenizer),
                                   instruction_task(name, pairs)))
    config = InfLoRAConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(tiny_llama(tokenizer), config)
    args = training_args(tmp_path, num_train_epochs=40, learning_rate=5e-2, per_device_train_batch_size=16,
                         setting="generation", generation_max_new_tokens=3)
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer,
                               data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    result = trainer.train_continual(tasks)
    assert result.accuracy_matrix[0][0] == 1.0  # both answers of task 1 memorised exactly
    assert result.accuracy_matrix[1][1] == 1.0
    assert all(a in (0.0, 0.5, 1.0) for row in result.accuracy_matrix for a in row)


def test_a_user_answer_metric_replaces_exact_match(tokenizer, tmp_path):
    seen = []

    def first_letter(predictions, references):
        seen.append((list(predictions), list(references)))
        return 0.25

    raw = instruction_task("t", [("colour of grass ?", "green")])
    model = get_peft_model(tiny_llama(tokenizer), InfLoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path, max_steps=1, setting="generation",
                                                               generation_max_new_tokens=2),
                               processing_class=tokenizer, answer_metric=first_letter,
                               data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    result = trainer.train_continual([ContinualTask("t", tokenize_instruction_dataset(raw, tokenizer), raw)])
    assert result.accuracy_matrix == [[0.25]]
    assert seen and seen[0][1] == ["green"] and len(seen[0][0]) == 1


def test_the_eval_columns_are_options_and_a_missing_one_is_refused_before_training(tokenizer, tmp_path):
    raw = instruction_task("t", [("colour of grass ?", "green")])
    renamed = raw.rename_columns({"prompt": "question", "answer": "gold"})
    train = tokenize_instruction_dataset(raw, tokenizer)
    model = get_peft_model(tiny_llama(tokenizer), InfLoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    args = training_args(tmp_path, max_steps=1, setting="generation", eval_prompt_column="question",
                         eval_answer_column="gold", generation_max_new_tokens=2)
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, data_collator=collator)
    with pytest.raises(ValueError, match=r"no column \['question', 'gold'\].*set eval_prompt_column"):
        trainer.train_task(ContinualTask("t", train, raw))  # eval data with the default column names
    assert model.tasks_done() == 0 and not model.task_in_progress() and not (tmp_path / "continual").exists()
    result = trainer.train_task(ContinualTask("t", train, renamed))
    assert result.num_learned == 1 and result.accuracy_matrix[0][0] in (0.0, 1.0)
