"""Tiny synthetic continual-classification sequences and models for the trainer tests (importable by subprocesses).

Task k has ``classes[k]`` classes; an example of class c holds marker tokens of (k, c) among random filler, so every
task is learnable by a small BERT in a few steps and tasks occupy different token sets.
"""

from __future__ import annotations

import datasets
import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from peft_inflora import ContinualTask, ContinualTrainingArguments, InfLoRAConfig


VOCAB, SEQ = 96, 12


def bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def inflora_bert(num_labels: int = 2, seed: int = 0, **config_kwargs):
    kwargs = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    kwargs.update(config_kwargs)
    return get_peft_model(bert(num_labels, seed), InfLoRAConfig(**kwargs))


def task_dataset(task: int, num_classes: int, n: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    for i in range(n):
        marker = 1 + (task * 3 + int(labels[i])) % 9
        ids[i, :3] = marker
    lengths = torch.randint(SEQ - 4, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "label": labels.tolist()})


def tasks(classes=(2, 3, 2), n_train: int = 48, n_eval: int = 24) -> list[ContinualTask]:
    return [ContinualTask(f"t{k}", task_dataset(k, c, n_train, seed=100 + k), task_dataset(k, c, n_eval, seed=200 + k))
            for k, c in enumerate(classes)]


def training_args(output_dir, **overrides) -> ContinualTrainingArguments:
    kwargs = dict(output_dir=str(output_dir), num_train_epochs=2, per_device_train_batch_size=8,
                  per_device_eval_batch_size=16, learning_rate=5e-3, report_to="none", save_strategy="no",
                  logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return ContinualTrainingArguments(**kwargs)
