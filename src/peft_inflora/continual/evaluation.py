"""Evaluation of one task: classification accuracy among a range of classes, or generation exact match.

Classification: ``acc = mean_n [ lo + argmax_{c in [lo, hi)} logits[n, c] == y_n ]`` with ``logits`` of shape
``(N, num_classes)``; class-incremental evaluation takes ``[0, hi)`` (every class seen so far), task-incremental
evaluation the task's own ``[lo, hi)``. Generation: greedy answers to the task's prompts (the new tokens only),
scored by :func:`exact_match` or a user ``answer_metric(predictions, references) -> float``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .heads import ClassRange


AnswerMetric = Callable[[list[str], list[str]], float]

__all__ = ["AnswerMetric", "classification_accuracy", "exact_match", "generate_answers", "normalize_answer",
           "tokenize_instruction_dataset"]


def classification_accuracy(logits: Any, labels: Any, classes: ClassRange) -> float:
    """The accuracy of ``argmax`` over the logit columns ``classes = [lo, hi)`` against global ``labels``."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits, labels = torch.as_tensor(logits).float(), torch.as_tensor(labels).long()
    lo, hi = classes
    predictions = logits[:, lo:hi].argmax(-1) + lo
    return float((predictions == labels).float().mean())


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace collapsed, stripped: what :func:`exact_match` compares."""
    return " ".join(text.strip().lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference after :func:`normalize_answer`."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"exact_match needs as many predictions as references (> 0), got {len(predictions)} and "
                         f"{len(references)}.")
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(references)


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[Union[str, Sequence[int]]], *,
                     batch_size: int, max_new_tokens: int, device: Any, num_beams: int = 1) -> list[str]:
    """Greedy (or beam) answers to ``prompts``: decoder-only models left-padded, only the new tokens decoded.

    A prompt is a string (tokenized here, with the tokenizer's special tokens) or a list of token ids, used as is
    (e.g. a conversation rendered by the chat template, exactly as the training data was tokenized)."""
    was_training = model.training
    model.eval()
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left" if not is_enc_dec else padding_side
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i: i + batch_size])
            if isinstance(batch[0], str):
                enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            else:
                enc = tokenizer.pad({"input_ids": [list(ids) for ids in batch]}, return_tensors="pt").to(device)
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                 pad_token_id=tokenizer.pad_token_id)
            new_tokens = out if is_enc_dec else out[:, enc["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def score_answers(predictions: list[str], references: list[str], answer_metric: Optional[AnswerMetric]) -> float:
    """``answer_metric(predictions, references)`` if given, else :func:`exact_match`."""
    if answer_metric is not None:
        return float(answer_metric(predictions, references))
    return exact_match(predictions, references)


def tokenize_instruction_dataset(dataset: Any, tokenizer: Any, *, prompt_column: str = "prompt",
                                 answer_column: str = "answer", max_length: int = 256,
                                 is_encoder_decoder: bool = False) -> Any:
    """Tokenize prompt -> answer pairs for training with the loss on answer tokens only.

    Causal LM: ``input_ids = prompt + answer + eos``, ``labels`` = -100 on the prompt. Seq2seq: ``input_ids`` =
    prompt, ``labels`` = answer + eos. Pad with ``DataCollatorForSeq2Seq(tokenizer)``.
    """
    eos = tokenizer.eos_token or ""

    def encode(example: dict) -> dict:
        prompt, answer = example[prompt_column], example[answer_column]
        if is_encoder_decoder:
            enc = tokenizer(prompt, truncation=True, max_length=max_length)
            enc["labels"] = tokenizer(answer + eos, truncation=True, max_length=max_length,
                                      add_special_tokens=False)["input_ids"]
            return enc
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(answer + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenize instructions")
