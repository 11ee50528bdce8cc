"""Evaluation of one task: classification accuracy among a range of classes, or a score of generated answers,
through ``evaluate`` metric modules.

Classification: ``prediction_n = lo + argmax_{c in [lo, hi)} logits[n, c]`` with ``logits`` of shape
``(N, num_classes)``; class-incremental evaluation takes ``[0, hi)`` (every class seen so far), task-incremental
evaluation the task's own ``[lo, hi)``; the score is ``accuracy = mean_n [prediction_n == y_n]``. Generation: greedy
answers to the task's prompts (the new tokens only), scored by ``exact_match`` (after :func:`normalize_answer`).

``accuracy`` and ``exact_match`` are ``evaluate.Metric`` modules shipped in this package
(``continual/evaluate_metrics/<name>/<name>.py``), so ``evaluate.load`` reads them from disk, offline. Any other
metric replaces them per task (:class:`TaskMetric`): an ``evaluate`` module or its name / local path (``"rouge"``
needs a network the first time), or a function ``f(predictions, references) -> float | dict``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from .heads import ClassRange


AnswerMetric = Callable[[list[str], list[str]], float]
# what scores a task: an evaluate module, its name or local path, or f(predictions, references) -> float | dict
MetricLike = Union[str, os.PathLike, Any, Callable[[Any, Any], Any]]

SHIPPED_METRICS_DIR = Path(__file__).with_name("evaluate_metrics")
SHIPPED_METRICS = ("accuracy", "exact_match")

__all__ = ["SHIPPED_METRICS", "AnswerMetric", "MetricLike", "TaskMetric", "classification_accuracy",
           "classification_predictions", "exact_match", "generate_answers", "load_metric", "normalize_answer",
           "tokenize_instruction_dataset"]


@functools.lru_cache(maxsize=None)
def _load(name_or_path: str) -> Any:
    import evaluate

    return evaluate.load(name_or_path, keep_in_memory=True)


def load_metric(name_or_path: Union[str, os.PathLike]) -> Any:
    """``evaluate.load`` with the shipped modules first: ``"accuracy"`` and ``"exact_match"`` (or a path to a
    folder holding ``<name>/<name>.py``) load from disk with no network; any other name goes to ``evaluate.load``
    (a Hub metric such as ``"rouge"`` is downloaded once, then cached by evaluate). Loaded once per process."""
    name = os.fspath(name_or_path)
    if name in SHIPPED_METRICS:
        name = str(SHIPPED_METRICS_DIR / name)
    return _load(name)


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace collapsed, stripped: what ``exact_match`` compares."""
    return " ".join(text.strip().lower().split())


class TaskMetric:
    """How one task is scored: ``score(predictions, references) -> float`` in [0, 1] (an entry of the matrix).

    Args:
        metric: ``None`` (the shipped ``default``), an ``evaluate`` module, its name or local path (see
            :func:`load_metric`), or ``f(predictions, references) -> float | dict``. ``predictions`` are the
            predicted global class ids (classification, after the argmax among the classes of the setting) or the
            generated answers (generation); ``references`` the labels or reference answers.
        key: the entry of the metric's result dict that is the task's score (default: the metric's name, else the
            only entry), e.g. ``"rougeL"`` for ``"rouge"``.
        default: the shipped metric used when ``metric`` is ``None``: ``"accuracy"`` or ``"exact_match"``.
    """

    def __init__(self, metric: Optional[MetricLike] = None, key: Optional[str] = None,
                 default: str = "accuracy") -> None:
        metric = default if metric is None else metric
        if isinstance(metric, (str, os.PathLike)):
            metric = load_metric(metric)
        if not callable(metric) and not hasattr(metric, "compute"):
            raise TypeError(f"A task metric is an evaluate module, its name or path, or a function f(predictions, "
                            f"references) -> float | dict; got {type(metric).__name__}.")
        self.metric, self.key = metric, key

    @property
    def name(self) -> str:
        """``<metric>`` or ``<metric>:<key>``: how the card and the result name it."""
        metric = self.metric
        base = getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__
        return f"{base}:{self.key}" if self.key else str(base)

    def __call__(self, predictions: Any, references: Any) -> float:
        if hasattr(self.metric, "compute"):
            value = self.metric.compute(predictions=list(predictions), references=list(references))
        else:
            value = self.metric(predictions, references)
        if isinstance(value, dict):
            key = self.key or getattr(self.metric, "name", None)
            if key not in value:
                if self.key is None and len(value) == 1:
                    key = next(iter(value))
                else:
                    raise ValueError(f"Metric {self.name} returned {sorted(value)}: name the entry that is the task's "
                                     "score with metric_key= (ContinualTask) or eval_metric_key= (the arguments).")
            value = value[key]
        value = float(np.asarray(value).mean()) if isinstance(value, (list, tuple, np.ndarray)) else float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"Metric {self.name} gave {value!r}: the accuracy matrix holds scores in [0, 1] (a "
                             "metric in percent must be divided by 100, e.g. with a function metric).")
        return value


def classification_predictions(logits: Any, classes: ClassRange) -> np.ndarray:
    """``lo + argmax`` over the logit columns ``classes = [lo, hi)``: the predicted global class ids ``(N,)``."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    lo, hi = classes
    return (torch.as_tensor(logits).float()[:, lo:hi].argmax(-1) + lo).numpy()


def classification_accuracy(logits: Any, labels: Any, classes: ClassRange,
                            metric: Optional[TaskMetric] = None) -> float:
    """The accuracy (or ``metric``) of :func:`classification_predictions` against the global ``labels``."""
    metric = metric if metric is not None else TaskMetric(default="accuracy")
    return metric(classification_predictions(logits, classes), np.asarray(labels).astype(np.int64))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference after :func:`normalize_answer` (the shipped
    ``exact_match`` evaluate module)."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"exact_match needs as many predictions as references (> 0), got {len(predictions)} and "
                         f"{len(references)}.")
    return TaskMetric(default="exact_match")(list(predictions), list(references))


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


def score_answers(predictions: list[str], references: list[str],
                  answer_metric: Optional[Union[AnswerMetric, TaskMetric]] = None) -> float:
    """``answer_metric(predictions, references)`` if given, else the shipped ``exact_match``."""
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
