"""Continual supervised fine-tuning with TRL: :class:`ContinualSFTConfig` and :class:`ContinualSFTTrainer`.

``ContinualSFTTrainer(ContinualMixin, SFTTrainer)`` runs the continual task loop of :class:`~.loop.ContinualMixin`
over TRL's ``SFTTrainer``. A task's ``train_dataset`` is what ``SFTTrainer`` takes (conversational ``messages``,
prompt/completion (conversational or plain text), or, with ``assistant_only_loss=False``, plain ``text``), and goes
through ``SFTTrainer``'s own preparation (chat template, tokenization, completion and assistant masks -> ``labels``),
decided per task the way ``SFTTrainer`` decides it for its one ``train_dataset``. The statistics passes
(``begin_task`` / ``end_task``) read the trainer's own train dataloader with TRL's collator: the covariance is over
the non-padding tokens (``attention_mask``; every token of the flattened row with ``padding_free``) of the batches
that are trained, prompt tokens included (the gradient of ``A_t`` has a term ``x_n`` at every position, and the
completion reads the prompt through attention); the loss is on the completion tokens only.

Evaluation (one row of the accuracy matrix per task): greedy generations of the prompt -- the conversation without
its last (assistant) message, rendered by the chat template with ``add_generation_prompt=True``, or the ``prompt`` --
scored against the last assistant message or the ``completion`` by exact match, or by the trainer's
``answer_metric``.

Needs the ``trl`` extra: ``pip install "peft-inflora[trl]"``.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional


try:
    from trl import SFTConfig, SFTTrainer, is_conversational, is_conversational_from_value
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )
except ImportError as err:  # pragma: no cover - exercised in a subprocess without trl
    raise ImportError(
        "peft_inflora.trl needs TRL (the optional `trl` extra): pip install \"peft-inflora[trl]\"") from err

from datasets import Dataset, IterableDataset

from .arguments import ContinualArguments, ContinualTask
from .loop import ContinualMixin


__all__ = ["ContinualSFTConfig", "ContinualSFTTrainer"]


@dataclass
class ContinualSFTConfig(ContinualArguments, SFTConfig):
    """TRL's ``SFTConfig`` plus the continual options of :class:`~.arguments.ContinualArguments`, for
    :class:`ContinualSFTTrainer`. Three defaults differ from the parents': ``setting="generation"`` (the only
    setting: SFT trains language-modeling tasks), ``eval_answer_column="completion"`` (TRL's prompt/completion
    names) and ``assistant_only_loss=True`` (the loss covers the completions only, for conversational data too)."""

    setting: str = field(default="generation", metadata={
        "help": "The continual setting. SFT learns language-modeling tasks: generation (the only choice) evaluates "
                "every task by the exact match of greedy generations (or the trainer's answer_metric).",
        "choices": ["generation"]})
    eval_prompt_column: str = field(default="prompt", metadata={
        "help": "The column of a task's eval_dataset that holds the prompts, for eval datasets without a "
                "'messages' column (a conversational prompt is rendered with the chat template)."})
    eval_answer_column: str = field(default="completion", metadata={
        "help": "The column of a task's eval_dataset that holds the reference answers, for eval datasets without a "
                "'messages' column (a conversational completion: its last message's content)."})
    assistant_only_loss: bool = field(default=True, metadata={
        "help": "Compute the loss on the assistant turns of conversational datasets only (TRL's option; the "
                "continual default is True, so that with completion_only_loss the loss covers completions only). "
                "It needs a chat template with generation markers, or one TRL can patch. Not applied to "
                "plain-text prompt/completion data (completion_only_loss covers it); plain 'text' tasks need "
                "assistant_only_loss=False."})

    def _check_continual_arguments(self) -> None:
        if self.setting != "generation":
            raise ValueError(f"ContinualSFTTrainer learns language-modeling tasks: setting must be 'generation', got "
                             f"{self.setting!r} (for classification use ContinualTrainer with "
                             "ContinualTrainingArguments).")
        super()._check_continual_arguments()


def _content_text(message: Any) -> str:
    """The text of a message's content (a string, or a list of ``{"type": "text", "text": ...}`` parts)."""
    content = message.get("content", "") if isinstance(message, dict) else message
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


class ContinualSFTTrainer(ContinualMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` that learns a sequence of tasks with an InfLoRA adapter (see the module docstring).

    ``train_continual(tasks)``, ``train_task(task)`` and ``train()`` are :class:`~.loop.ContinualMixin`'s. Every
    ``SFTTrainer`` argument works as usual; ``train_dataset`` and ``eval_dataset`` are optional and stay as given
    (``train()`` learns them as the next task; ``evaluate()`` prepares ``eval_dataset`` like ``SFTTrainer``).
    ``compute_metrics`` is what ``evaluate()`` reports; the accuracy matrix scores generations (exact match, or
    ``answer_metric(predictions, references) -> float``).
    """

    continual_arguments_class = ContinualSFTConfig

    def __init__(self, model: Any, args: Optional[ContinualSFTConfig] = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 **kwargs: Any) -> None:
        if args is None:
            args = ContinualSFTConfig(output_dir="trainer_output")
        if not isinstance(args, ContinualSFTConfig):
            raise TypeError(f"ContinualSFTTrainer needs args=ContinualSFTConfig(...) (every SFTConfig field plus the "
                            f"continual options), got {type(args).__name__}.")
        self._stop_token_checked = False
        # SFTTrainer decides the loss masks from its one train_dataset at construction; here they are decided for
        # every dataset it prepares (_prepare_dataset), so it is built on a tokenized one-row stand-in.
        stand_in = Dataset.from_dict({"input_ids": [[0]]})
        assistant_only_loss, args.assistant_only_loss = args.assistant_only_loss, False
        try:
            super().__init__(model, args, data_collator, stand_in, stand_in if eval_dataset is not None else None,
                             processing_class, **kwargs)
        finally:
            args.assistant_only_loss = assistant_only_loss
        if self._is_vision_dataset:  # pragma: no cover - the stand-in is text
            raise ValueError("ContinualSFTTrainer learns text tasks.")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset

    # ------------------------------------------------------------------ SFTTrainer hooks
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, packing: bool,
                         formatting_func: Any, dataset_name: str) -> Any:
        """``SFTTrainer._prepare_dataset`` with the loss options decided for this dataset (:meth:`_loss_options`),
        as ``SFTTrainer`` decides them for its ``train_dataset``."""
        completion_only, assistant_only, chat_template = self._loss_options(dataset, processing_class, args,
                                                                            formatting_func, dataset_name)
        options = copy.copy(args)
        options.assistant_only_loss = assistant_only
        saved = (self.completion_only_loss, self.chat_template)
        self.completion_only_loss, self.chat_template = completion_only, chat_template
        try:
            return super()._prepare_dataset(dataset, processing_class, options, packing, formatting_func,
                                            dataset_name)
        finally:
            self.completion_only_loss, self.chat_template = saved

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Optional[list[str]] = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """``SFTTrainer.evaluate`` (loss, ``compute_metrics``) on ``eval_dataset``, by default the trainer's
        ``eval_dataset``, which is kept as given and prepared here."""
        if eval_dataset is None:
            eval_dataset = self.eval_dataset
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    # ------------------------------------------------------------------ ContinualMixin data hooks
    def check_generation_eval_dataset(self, task: ContinualTask) -> None:
        """The task's datasets have an SFT format and its loss options apply (checked on the first rows)."""
        if not isinstance(task.train_dataset, (Dataset, IterableDataset)):
            raise TypeError(f"Task '{task.name}': train_dataset must be a datasets.Dataset or IterableDataset (what "
                            f"SFTTrainer takes), got {type(task.train_dataset).__name__}.")
        if not self._skip_prepare_dataset:
            self._loss_options(task.train_dataset, self.processing_class, self.args, self._formatting_func,
                               f"{task.name} train")
        first = next(iter(task.eval_dataset), None)
        if first is None:
            raise ValueError(f"Task '{task.name}': the eval_dataset is empty.")
        self._eval_pair(first, task.name)

    def prepare_train_dataset(self, dataset: Any, task: ContinualTask) -> Any:
        """The task's train_dataset through ``SFTTrainer``'s preparation (unless ``skip_prepare_dataset``)."""
        if self._skip_prepare_dataset:
            return dataset
        return self._prepare_dataset(dataset, self.processing_class, self.args, self.args.packing,
                                     self._formatting_func, f"{task.name} train")

    def generation_references(self, dataset: Any) -> tuple[list, list[str]]:
        """Prompt token ids (tokenized as SFTTrainer tokenizes prompts) and reference answers of every example."""
        prompts, references = [], []
        for example in dataset:
            prompt, reference = self._eval_pair(example, "eval")
            prompts.append(prompt)
            references.append(reference)
        return prompts, references

    # ------------------------------------------------------------------ formats
    def _loss_options(self, dataset: Any, processing_class: Any, args: Any, formatting_func: Any,
                      dataset_name: str) -> tuple[bool, bool, Optional[str]]:
        """``(completion_only_loss, assistant_only_loss, training chat template or None)`` for ``dataset``.

        ``completion_only_loss=None`` means: on for prompt/completion data (TRL's rule). ``assistant_only_loss``
        applies to conversational data; plain prompt/completion data has its completion mask; plain text data
        (or a ``formatting_func``, which makes text) has no completion, and is refused unless
        ``assistant_only_loss=False``."""
        sample = next(iter(dataset), None)
        if sample is None:
            raise ValueError(f"The {dataset_name} dataset is empty.")
        if "image" in sample or "images" in sample:
            raise ValueError(f"The {dataset_name} dataset holds images: ContinualSFTTrainer learns text tasks.")
        tokenized = "input_ids" in sample
        prompt_completion = "prompt" in sample and "completion" in sample
        completion_only = prompt_completion if args.completion_only_loss is None else bool(args.completion_only_loss)
        if completion_only and formatting_func is not None and not tokenized:
            raise ValueError("A formatting_func turns the data into plain text, which has no completion: apply it "
                             "before passing the dataset, or set completion_only_loss=False.")
        conversational = is_conversational(sample) or is_conversational_from_value(sample)
        if not args.assistant_only_loss or tokenized:
            return completion_only, False, None
        if formatting_func is not None or not (conversational or prompt_completion):
            raise ValueError(
                f"The {dataset_name} dataset is plain text (columns {sorted(sample)}), which has no completion, while "
                "assistant_only_loss=True (ContinualSFTConfig's default) keeps the loss on completions: give the task "
                "as conversational 'messages' or as 'prompt'/'completion', or set assistant_only_loss=False to train "
                "on every token.")
        if not conversational:
            return completion_only, False, None
        return completion_only, True, self._training_chat_template(processing_class)

    def _training_chat_template(self, processing_class: Any) -> Optional[str]:
        """The chat template with ``{% generation %}`` markers for the assistant mask: ``None`` when the tokenizer's
        own has them, else TRL's patched version of a known template."""
        template = getattr(processing_class, "chat_template", None)
        if not template:
            raise ValueError("Conversational tasks need a tokenizer with a chat_template (processing_class).")
        if has_generation_markers(template):
            patched = None
        else:
            try:
                patched = get_training_chat_template(processing_class)
            except ValueError as err:
                raise ValueError(f"{err} Or set assistant_only_loss=False to train on the whole conversation.") \
                    from err
        if not self._stop_token_checked:
            self._stop_token_checked = True
            if not is_chat_template_stop_token_trained(processing_class, chat_template=patched):
                warnings.warn("The chat template leaves the assistant's end-of-turn token out of the loss mask: the "
                              "model may not learn to stop, and exact-match evaluation then fails.", stacklevel=3)
        return patched

    def _eval_pair(self, example: dict, task_name: str) -> tuple[list[int], str]:
        """``(prompt token ids, reference)`` of one eval example: ``messages`` (the last one the assistant's answer)
        or ``eval_prompt_column`` / ``eval_answer_column`` (conversational or plain)."""
        tokenizer = self._tokenizer
        if is_conversational_from_value(example):
            raise ValueError(f"Task '{task_name}': give the eval data as ChatML 'messages' (role/content), not "
                             "from/value 'conversations'.")
        if "messages" in example and is_conversational(example):
            messages = example["messages"]
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"Task '{task_name}': the last message of every eval conversation must be the "
                                 "assistant's reference answer.")
            return self._chat_prompt_ids(messages[:-1], example), _content_text(messages[-1])
        prompt_column, answer_column = self.args.eval_prompt_column, self.args.eval_answer_column
        missing = [c for c in (prompt_column, answer_column) if c not in example]
        if missing:
            raise ValueError(f"Task '{task_name}': the eval_dataset has neither 'messages' nor the column(s) "
                             f"{missing} (it has {sorted(example)}); set eval_prompt_column / eval_answer_column.")
        prompt, answer = example[prompt_column], example[answer_column]
        if isinstance(prompt, list):
            ids = self._chat_prompt_ids(prompt, example)
        else:
            ids = tokenizer(text=prompt)["input_ids"]
        reference = _content_text(answer[-1]) if isinstance(answer, list) else str(answer)
        eos = tokenizer.eos_token
        if eos and reference.endswith(eos):
            reference = reference[: -len(eos)]
        return ids, reference

    def _chat_prompt_ids(self, messages: list, example: dict) -> list[int]:
        """The conversation so far plus the generation prompt, tokenized as SFTTrainer tokenizes prompts."""
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        template = self._training_chat_template(self.processing_class) if self.args.assistant_only_loss else None
        return self.processing_class.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=True, chat_template=template,
            tools=tools, **(example.get("chat_template_kwargs") or {}))["input_ids"]
