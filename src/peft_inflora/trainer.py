"""ContinualTrainer: a ``transformers.Trainer`` that learns a sequence of tasks with an InfLoRA adapter.

For each task ``t``: ``begin_task`` over the task's training data (through the Trainer's own, Accelerate-prepared
dataloader, so under DDP each process sees its shard and the statistics are all-reduced), ``train()`` with a fresh
optimizer and scheduler, ``end_task``, then evaluation on every task seen so far, giving row ``t`` of the accuracy
matrix. The Trainer's training loop is not copied: the class only overrides ``compute_loss`` (loss over the current
task's classes), ``create_optimizer`` (old head rows frozen bit for bit) and ``push_to_hub`` (adapter, memory and
a model card of the sequence).

Task types:
* ``"class_incremental"`` (default): tasks bring their own labels ``0..C_t-1``; they are mapped to one global label
  space (task t's classes follow task t-1's), the head is sized to all classes, training uses cross-entropy over
  the current task's classes only, evaluation predicts among all classes seen so far.
* ``"task_incremental"``: as above, but evaluation predicts among the evaluated task's own classes.
* ``"generation"``: causal-LM or seq2seq instruction tasks; the loss is the model's (labels -100 on prompts, see
  :func:`tokenize_instruction_dataset`); evaluation is the exact match of greedy generations with the ``answer``
  column of the eval set (or a user ``compute_metrics(predictions, references) -> float``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import set_seed

from .hub import HubPushError, task_revision_names
from .metrics import RESULT_FILE, ContinualResult
from .model import SubspaceWarning

TASK_TYPES = ("class_incremental", "task_incremental", "generation")
LOSS_CLASSES = ("task", "seen")
CONTINUAL_DIR = "continual"
# What push_to_hub uploads from output_dir (the per-task checkpoints under continual/ stay local).
RUN_FILES = ("README.md", RESULT_FILE, "*.png")  # the model card, the result and its plots
HUB_FILES = ("adapter_config.json", "adapter_model.safetensors") + RUN_FILES
# Written into continual/after-task-NN/ once that state is on its Hub branch (push_task_revisions=True).
TASK_REVISION_RECORD = "hub_revision.json"


@dataclass
class ContinualTask:
    """One task of a sequence.

    Args:
        name: a short name (used in file names, logs and the model card).
        train_dataset: the task's training data (a ``datasets.Dataset`` or torch dataset of model inputs). For
            classification it carries local labels ``0..C-1`` in a ``labels`` (or ``label``) column.
        eval_dataset: the task's test data, same format (for generation: a ``prompt`` and an ``answer`` column).
        label_names: the task's class names (classification); inferred from a ``ClassLabel`` feature or the labels
            present when omitted.
    """

    name: str
    train_dataset: Any
    eval_dataset: Any = None
    label_names: Optional[Sequence[str]] = None


class ContinualCallback(TrainerCallback):
    """A ``TrainerCallback`` with two more events, called by :class:`ContinualTrainer` around every task."""

    def on_task_begin(self, args, state, control, task: ContinualTask, task_index: int, **kwargs):
        """After ``begin_task`` (B_t designed), before training the task."""

    def on_task_end(self, args, state, control, task: ContinualTask, task_index: int, result: ContinualResult,
                    **kwargs):
        """After ``end_task`` and the evaluation of every task seen so far (``result`` has the new row)."""


def _label_column(dataset: Any) -> Optional[str]:
    names = getattr(dataset, "column_names", None) or []
    return "labels" if "labels" in names else "label" if "label" in names else None


def _num_task_classes(task: ContinualTask) -> int:
    if task.label_names is not None:
        return len(task.label_names)
    column = _label_column(task.train_dataset)
    if column is None:
        raise ValueError(f"Task '{task.name}' has no 'labels' or 'label' column: pass label_names or add labels.")
    feature = task.train_dataset.features.get(column)
    if getattr(feature, "names", None):
        return len(feature.names)
    return int(max(task.train_dataset[column])) + 1


def _to_global_labels(dataset: Any, offset: int, num_classes: int, task_name: str) -> Any:
    """Shift a task's local labels ``0..C-1`` to the global ids ``offset..offset+C-1`` (column ``labels``)."""
    if dataset is None:
        return None
    column = _label_column(dataset)
    if column is None:
        raise ValueError(f"Task '{task_name}': the dataset has no 'labels' or 'label' column.")
    labels = dataset[column]
    if len(labels) and (min(labels) < 0 or max(labels) >= num_classes):
        raise ValueError(f"Task '{task_name}': labels must be in 0..{num_classes - 1} (the task's own classes), "
                         f"got {min(labels)}..{max(labels)}.")
    if column == "label":
        dataset = dataset.rename_column("label", "labels")
    if hasattr(dataset, "cast_column"):  # a ClassLabel feature would refuse the shifted ids
        import datasets

        dataset = dataset.cast_column("labels", datasets.Value("int64"))
    return dataset.map(lambda batch: {"labels": [y + offset for y in batch["labels"]]}, batched=True,
                       desc=f"global labels for {task_name}")


def _grow_linear(linear: nn.Linear, out_features: int) -> nn.Linear:
    """A copy of ``linear`` with more output rows: old rows kept bit for bit, new rows initialised as transformers'
    heads are (normal, std 0.02; zero bias)."""
    grown = nn.Linear(linear.in_features, out_features, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        nn.init.normal_(grown.weight, std=0.02)
        grown.weight[: linear.out_features] = linear.weight
        if linear.bias is not None:
            grown.bias.zero_()
            grown.bias[: linear.out_features] = linear.bias
    grown.weight.requires_grad_(linear.weight.requires_grad)
    if grown.bias is not None:
        grown.bias.requires_grad_(linear.bias.requires_grad)
    return grown


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


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().split())


class ContinualTrainer(Trainer):
    """Trainer that runs a continual-learning sequence with an InfLoRA adapter (see the module docstring).

    Args:
        model: a ``PeftModel`` with an InfLoRA adapter (``get_peft_model(base, InfLoRAConfig(...))``). For
            classification the head must be in ``modules_to_save`` (e.g. ``["classifier"]``). With any other PEFT
            method (e.g. ``LoraConfig``) the same loop runs as plain sequential fine-tuning: a baseline.
        task_type: ``"class_incremental"``, ``"task_incremental"`` or ``"generation"``.
        generation_max_new_tokens: generation budget of the generation evaluation.
        answer_metric: for generation, ``f(predictions, references) -> float`` (default: normalized exact match).
        push_task_revisions: after every finished task (and its evaluation), push what :meth:`push_to_hub` pushes
            to the branch ``task-<k>-<name>`` of ``args.hub_model_id`` (``k`` 1-based, the name made a valid git ref,
            see :func:`peft_inflora.hub.task_revision_name`), created from ``args.hub_revision`` (default ``main``);
            at the end of :meth:`train_continual`, :meth:`push_to_hub` updates that revision too. Needs
            ``TrainingArguments(push_to_hub=True, hub_model_id=...)``. Only the main process uploads.
        All other arguments are ``transformers.Trainer``'s.
    """

    def __init__(self, *args: Any, task_type: str = "class_incremental", loss_classes: str = "task",
                 generation_max_new_tokens: int = 32,
                 answer_metric: Optional[Callable[[list[str], list[str]], float]] = None,
                 push_task_revisions: bool = False, **kwargs: Any) -> None:
        # before Trainer.__init__, which creates the Hub repository when push_to_hub is set
        self._check_push_task_revisions(push_task_revisions, kwargs.get("args", args[1] if len(args) > 1 else None))
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}.")
        if loss_classes not in LOSS_CLASSES:
            raise ValueError(f"loss_classes must be one of {LOSS_CLASSES}, got {loss_classes!r}.")
        super().__init__(*args, **kwargs)
        if not isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
            raise TypeError("ContinualTrainer needs a PeftModel: wrap the model with "
                            "`get_peft_model(model, InfLoRAConfig(...))` first.")
        self.task_type = task_type
        self.loss_classes = loss_classes
        self.generation_max_new_tokens = generation_max_new_tokens
        self.answer_metric = answer_metric
        self.push_task_revisions = push_task_revisions
        self.continual_result: Optional[ContinualResult] = None
        self._task_classes: Optional[tuple[int, int]] = None  # [lo, hi) of the task being trained
        self._class_ranges: list[tuple[int, int]] = []
        self._frozen_head: Optional[tuple[nn.Linear, torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = None
        if task_type != "generation":
            self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    # ------------------------------------------------------------------ model access
    @property
    def peft_model(self) -> PeftModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def _show_progress(self) -> bool:
        return self.is_world_process_zero() and not self.args.disable_tqdm

    @property
    def is_inflora(self) -> bool:
        """False for other PEFT methods, which the trainer runs as plain sequential fine-tuning (a baseline)."""
        return hasattr(self.peft_model.base_model, "begin_task")

    def _head(self) -> tuple[ModulesToSaveWrapper, nn.Linear]:
        """The classification head: the ``modules_to_save`` Linear whose outputs are the class logits."""
        num_labels = getattr(self.peft_model.config, "num_labels", None)
        candidates = []
        for name, module in self.peft_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                active = module.modules_to_save[self.peft_model.active_adapter]
                if isinstance(active, nn.Linear):
                    candidates.append((name, module, active))
        exact = [c for c in candidates if c[2].out_features == num_labels]
        chosen = exact or candidates
        if not chosen:
            raise ValueError(
                "Class-incremental training needs the classification head in `modules_to_save` (e.g. "
                "InfLoRAConfig(modules_to_save=['classifier']) for BERT, ['score'] for Llama): none was found."
            )
        return chosen[-1][1], chosen[-1][2]

    def _ensure_head_size(self, num_classes: int) -> None:
        wrapper, head = self._head()
        if head.out_features >= num_classes:
            return
        for key in list(wrapper.modules_to_save.keys()):
            module = wrapper.modules_to_save[key]
            if isinstance(module, nn.Linear):
                wrapper.modules_to_save[key] = _grow_linear(module, num_classes)
        if isinstance(wrapper.original_module, nn.Linear):
            wrapper.original_module = _grow_linear(wrapper.original_module, num_classes)
        self.peft_model.config.num_labels = num_classes
        for module in self.peft_model.modules():  # transformers heads keep their own copy for the loss
            if isinstance(getattr(module, "num_labels", None), int) and module is not self.peft_model:
                module.num_labels = num_classes

    # ------------------------------------------------------------------ Trainer hooks
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Classification: cross-entropy over the current task's classes only (``logits[:, lo:hi]``, the paper's
        loss, ``loss_classes="task"``), so other classes' head rows get exactly zero gradient; or over all classes
        seen so far (``logits[:, :hi]``, ``loss_classes="seen"``), where the frozen old rows still compete with the
        new ones. Generation: the model's own loss."""
        if self.task_type == "generation" or self._task_classes is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        lo, hi = self._task_classes
        if self.loss_classes == "seen":
            lo = 0
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = F.cross_entropy(logits[:, lo:hi].float(), labels - lo)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus a post-step hook that restores the head rows of every class outside the
        current task (weight decay or momentum would otherwise move them)."""
        optimizer = super().create_optimizer(model)
        if self._frozen_head is not None:
            head, weight, bias, frozen = self._frozen_head

            def restore_frozen_rows(opt, args, kwargs) -> None:
                with torch.no_grad():
                    head.weight[frozen] = weight[frozen]
                    if bias is not None:
                        head.bias[frozen] = bias[frozen]

            target = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it later; hook the real one
            target.register_step_post_hook(restore_frozen_rows)
        return optimizer

    # ------------------------------------------------------------------ the sequence
    def train_continual(self, tasks: Sequence[ContinualTask], resume_from_checkpoint: bool = False,
                        previous_result: Optional[ContinualResult | str | os.PathLike] = None) -> ContinualResult:
        """Learn ``tasks`` in order and return the :class:`ContinualResult` (accuracy matrix, A_T, A_avg, BWT,
        forgetting, times), also written to ``output_dir`` with plots.

        After every task the adapter (with its memory), the result so far and the task index are saved under
        ``output_dir/continual/``; ``resume_from_checkpoint=True`` continues after the last finished task.

        Continuing someone else's sequence: when the InfLoRA adapter has already learned ``k`` tasks (loaded with
        ``PeftModel.from_pretrained``), ``tasks`` is the whole sequence, the ``k`` learned tasks first (their
        classes keep their head rows and they are evaluated after every new task), and ``previous_result`` is the
        result saved with the adapter (a :class:`ContinualResult`, or a folder / Hub repo id holding
        ``continual_result.json``, see :meth:`ContinualResult.from_pretrained`). Training starts at task ``k``.

        With ``push_task_revisions=True`` every finished task is pushed to its branch ``task-<k>-<name>`` right after
        its local checkpoint is saved, and the end of the sequence to ``args.hub_revision`` (``main``). A failed upload
        raises :class:`~peft_inflora.hub.HubPushError` with the checkpoint saved: ``resume_from_checkpoint=True``
        first pushes the finished tasks whose branch is missing, then continues with the next task.
        """
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        if self.is_inflora and sharded:
            raise ValueError(
                "ContinualTrainer does not yet run InfLoRA under Accelerate's FSDP or DeepSpeed: they shard or "
                "partition the new A_t that begin_task creates for every task. Use DDP (plain `accelerate launch` / "
                "`torchrun`), or the hand-written FSDP2 / DeepSpeed ZeRO-1/2 loop of the README (peft_inflora."
                "distributed). Nothing was trained."
            )
        tasks = list(tasks)
        if not tasks:
            raise ValueError("`tasks` is empty: pass at least one ContinualTask.")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"Task names must be unique, got {names}.")
        branches = task_revision_names(names) if self.push_task_revisions else []  # bad names fail before training
        for task in tasks:
            if task.train_dataset is None:
                raise ValueError(f"Task '{task.name}' has no train_dataset.")
            if task.eval_dataset is None:
                raise ValueError(f"Task '{task.name}' has no eval_dataset: every task needs test data for the "
                                 "accuracy matrix.")
        learned = self.peft_model.tasks_done() if self.is_inflora else 0
        previous = self._previous_result(previous_result, names, learned)
        prepared = self._prepare_tasks(tasks)
        self.continual_result = ContinualResult(task_names=names, accuracy_matrix=[],
                                                extra={"task_type": self.task_type, "method": self._method_name()})
        start = 0
        if previous is not None:
            self.continual_result.accuracy_matrix = [list(row) for row in previous.accuracy_matrix]
            self.continual_result.train_seconds = list(previous.train_seconds)
            self.continual_result.statistics_seconds = list(previous.statistics_seconds)
            start = learned
        if resume_from_checkpoint:
            start = max(start, self._resume(names))
            if self.push_task_revisions:  # an upload that failed before the interruption
                self._push_missing_task_revisions(start, names, branches)
        out_dir = Path(self.args.output_dir)
        peft_model = self.peft_model
        base_output_dir = self.args.output_dir
        try:
            for index in range(start, len(tasks)):
                task, (train_ds, _) = tasks[index], prepared[index]
                set_seed(self.args.seed + index)
                self.args.output_dir = str(out_dir / CONTINUAL_DIR / f"task-{index + 1:02d}-{task.name}")
                self.train_dataset = train_ds
                if self.task_type != "generation":
                    self._task_classes = self._class_ranges[index]
                    self._freeze_head_outside(self._task_classes)
                t0 = time.perf_counter()
                if self.is_inflora:
                    peft_model.begin_task(self.get_train_dataloader(), progress=self._show_progress)
                stats_seconds = time.perf_counter() - t0
                self._call_task_event("on_task_begin", task=task, task_index=index)
                self.optimizer, self.lr_scheduler = None, None
                self.model_wrapped = self.model  # re-wrap (DDP) around this task's new A_t
                t0 = time.perf_counter()
                self.train()
                train_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                if self.is_inflora:
                    peft_model.end_task(self.get_train_dataloader(), progress=self._show_progress)
                stats_seconds += time.perf_counter() - t0
                if self.is_inflora:
                    self._report_capacity(index, len(tasks))
                self._task_classes, self._frozen_head = None, None
                row = [self._evaluate_task(tasks[j], prepared[j][1], seen=index) for j in range(index + 1)]
                self.continual_result.add_row(row, train_seconds=train_seconds, statistics_seconds=stats_seconds)
                self.args.output_dir = base_output_dir
                self._save_progress(index, names)
                self._call_task_event("on_task_end", task=task, task_index=index, result=self.continual_result)
                self.log({f"continual/accuracy_after_{task.name}": sum(row) / len(row)})
                if self.push_task_revisions:
                    self._push_task_revision(index, task.name, branches[index])
        finally:
            self.args.output_dir = base_output_dir
            self._task_classes, self._frozen_head = None, None
        self._write_result()
        if self.push_task_revisions:
            self._push_sequence_end(names)
        return self.continual_result

    def _report_capacity(self, index: int, n_tasks: int) -> None:
        """After task ``index`` (0-based) of ``n_tasks``: log the memory's fill (``capacity_report``) and warn, with
        numbers, when some layer will not have ``r`` free directions for every remaining task.

        Projection per layer: the memory grew by ``g = memory_dimension / tasks_done`` directions per task so far;
        the next task gets rank ``r`` while ``free >= r``, so about ``1 + (free - r) // g`` more tasks get their full
        rank (all of them when ``g = 0``). With ``adaptive_threshold`` the memory's growth is capped so that
        ``free >= r * tasks_left`` after every task: ``free // r`` tasks fit."""
        report = self.peft_model.capacity_report()
        remaining = n_tasks - index - 1
        self.continual_result.extra.setdefault("capacity", []).append(
            {c.layers[0]: [c.memory_dimension, c.free_dimension, c.energy_threshold] for c in report})
        self.log({"continual/min_free_dimension": min(c.free_dimension for c in report),
                  "continual/max_memory_fraction": max(c.memory_dimension / c.d_in for c in report)})
        if remaining <= 0:
            return
        config = self.peft_model.peft_config[self.peft_model.active_adapter]
        short = []
        for c in report:
            growth = c.memory_dimension / max(c.tasks_done, 1)
            if c.free_dimension < c.rank:
                fits = 0
            elif config.adaptive_threshold:
                fits = c.free_dimension // c.rank
            else:
                fits = remaining if growth == 0 else 1 + int((c.free_dimension - c.rank) // growth)
            if fits < remaining:
                short.append((fits, c, growth))
        if not short:
            return
        fits, c, growth = min(short, key=lambda item: item[0])
        advice = ("lower `energy_threshold`" if config.adaptive_threshold else
                  "set `adaptive_threshold=True` (with `total_tasks`) or lower `energy_threshold`")
        now = (f"it has only {c.free_dimension} free directions, fewer than r={c.rank}: the next task gets rank "
               f"{c.free_dimension} there" if fits == 0 else
               f"its memory grew by {growth:.1f} directions per task, so only about {fits} of the {remaining} "
               f"remaining tasks will find r={c.rank} free directions")
        warnings.warn(
            f"InfLoRA capacity after task {index + 1} ('{self.continual_result.task_names[index]}'): in "
            f"{len(short)} adapted layer(s), e.g. '{c.layers[0]}' (memory {c.memory_dimension} of {c.d_in} "
            f"dimensions, threshold {c.energy_threshold:.4f}), {now}. To keep room for later tasks, {advice}.",
            SubspaceWarning, stacklevel=2)

    def _method_name(self) -> str:
        """The label of this run in tables, plots and the JSON: "InfLoRA", or e.g. "sequential LORA" for a baseline."""
        if self.is_inflora:
            return "InfLoRA"
        peft_type = self.peft_model.peft_config[self.peft_model.active_adapter].peft_type
        return f"sequential {getattr(peft_type, 'value', peft_type)}"

    def _previous_result(self, previous: Optional[ContinualResult | str | os.PathLike], names: list[str],
                         learned: int) -> Optional[ContinualResult]:
        """Check a continuation before anything changes: the adapter's ``learned`` tasks must be the first tasks
        of ``names`` and match ``previous``'s."""
        if learned == 0:
            if previous is not None:
                raise ValueError("previous_result was given, but the adapter has not learned any task yet: load the "
                                 "adapter that goes with it (PeftModel.from_pretrained), or drop previous_result.")
            return None
        if previous is None:
            raise ValueError(
                f"The adapter has already learned {learned} task(s). To continue its sequence pass the whole "
                f"sequence (the {learned} learned tasks first, then the new ones) and "
                "previous_result=ContinualResult.from_pretrained(<the adapter's folder or Hub repo id>); to start a "
                "new sequence, start from a fresh adapter (get_peft_model).")
        if not isinstance(previous, ContinualResult):
            previous = ContinualResult.from_pretrained(previous)
        if previous.num_learned != learned:
            raise ValueError(f"previous_result holds {previous.num_learned} learned task(s) but the adapter has "
                             f"learned {learned}: pass the result saved together with this adapter.")
        if list(previous.task_names[:learned]) != names[:learned] or len(names) <= learned:
            raise ValueError(f"The adapter learned {list(previous.task_names[:learned])}; `tasks` must start with "
                             f"those tasks, in that order, and add at least one new task (got {names}).")
        return previous

    def _prepare_tasks(self, tasks: list[ContinualTask]) -> list[tuple[Any, Any]]:
        if self.task_type == "generation":
            return [(t.train_dataset, t.eval_dataset) for t in tasks]
        prepared, offset = [], 0
        self._class_ranges = []
        for task in tasks:
            n = _num_task_classes(task)
            prepared.append((_to_global_labels(task.train_dataset, offset, n, task.name),
                             _to_global_labels(task.eval_dataset, offset, n, task.name)))
            self._class_ranges.append((offset, offset + n))
            offset += n
        self._ensure_head_size(offset)
        return prepared

    def _freeze_head_outside(self, classes: tuple[int, int]) -> None:
        _, head = self._head()
        frozen = torch.ones(head.out_features, dtype=torch.bool, device=head.weight.device)
        frozen[classes[0]: classes[1]] = False
        bias = head.bias.detach().clone() if head.bias is not None else None
        self._frozen_head = (head, head.weight.detach().clone(), bias, frozen)

    def _call_task_event(self, event: str, **kwargs: Any) -> None:
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self.args, self.state, self.control, model=self.peft_model, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def _evaluate_task(self, task: ContinualTask, eval_dataset: Any, seen: int) -> float:
        """Accuracy on one task after learning tasks ``0..seen``."""
        if self.task_type == "generation":
            return self._evaluate_generation(eval_dataset)
        output = self.predict(eval_dataset, metric_key_prefix=f"eval_{task.name}")
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        logits = torch.as_tensor(logits).float()
        labels = torch.as_tensor(output.label_ids).long()
        if self.task_type == "class_incremental":
            lo, hi = 0, self._class_ranges[seen][1]
        else:
            index = next(i for i, t in enumerate(self._class_ranges) if t[0] <= int(labels[0]) < t[1])
            lo, hi = self._class_ranges[index]
        predictions = logits[:, lo:hi].argmax(-1) + lo
        return float((predictions == labels).float().mean())

    @torch.no_grad()
    def _evaluate_generation(self, eval_dataset: Any) -> float:
        tokenizer = self.processing_class
        if tokenizer is None:
            raise ValueError("Generation evaluation needs the tokenizer: pass processing_class=tokenizer.")
        model = self.peft_model
        was_training = model.training
        model.eval()
        is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left" if not is_enc_dec else padding_side
        predictions: list[str] = []
        prompts, answers = list(eval_dataset["prompt"]), list(eval_dataset["answer"])
        batch_size = self.args.per_device_eval_batch_size
        try:
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True).to(self.args.device)
                enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out = model.generate(**enc, max_new_tokens=self.generation_max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                new_tokens = out if is_enc_dec else out[:, enc["input_ids"].shape[1]:]
                predictions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            tokenizer.padding_side = padding_side
            model.train(was_training)
        if self.answer_metric is not None:
            return float(self.answer_metric(predictions, answers))
        return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)) / len(answers)

    # ------------------------------------------------------------------ checkpoints
    def _save_progress(self, index: int, names: list[str]) -> None:
        """Atomically save the adapter after task ``index`` and the progress record (write to a temporary folder,
        then rename), so a crash never leaves a checkpoint that loads wrong."""
        if not self.args.should_save:
            return
        root = Path(self.args.output_dir) / CONTINUAL_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"after-task-{index + 1:02d}"
        tmp = root / f".after-task-{index + 1:02d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.peft_model.save_pretrained(str(tmp))
        self.continual_result.to_json(str(tmp / RESULT_FILE))
        (tmp / "progress.json").write_text(json.dumps({"tasks_done": index + 1, "task_names": names[: index + 1]}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._write_result()

    def _resume(self, names: list[str]) -> int:
        root = Path(self.args.output_dir) / CONTINUAL_DIR
        done = sorted(root.glob("after-task-[0-9][0-9]")) if root.is_dir() else []
        if not done:
            return 0
        last = done[-1]
        progress = json.loads((last / "progress.json").read_text())
        if progress["task_names"] != names[: progress["tasks_done"]]:
            raise ValueError(f"The checkpoint in {last} learned tasks {progress['task_names']}, which is not the "
                             f"start of the given sequence {names}: resume with the same tasks in the same order.")
        adapter = self.peft_model.active_adapter
        weights = load_peft_weights(str(last))
        set_peft_model_state_dict(self.peft_model, weights, adapter_name=adapter)
        saved = ContinualResult.from_json(str(last / RESULT_FILE))
        self.continual_result.accuracy_matrix = saved.accuracy_matrix
        self.continual_result.train_seconds = saved.train_seconds
        self.continual_result.statistics_seconds = saved.statistics_seconds
        return int(progress["tasks_done"])

    def _write_result(self, folder: Optional[str | os.PathLike] = None,
                      result: Optional[ContinualResult] = None) -> None:
        """Write ``result`` (default: the run's) and its plots into ``folder`` (default: ``output_dir``)."""
        result = result if result is not None else self.continual_result
        if not self.args.should_save or result is None or not result.accuracy_matrix:
            return
        out = Path(folder if folder is not None else self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.to_json(str(out / RESULT_FILE))
        result.plot_accuracy_matrix(str(out / "accuracy_matrix.png"))
        result.plot_accuracy_curve(str(out / "accuracy_curve.png"))

    # ------------------------------------------------------------------ Hub
    def create_model_card(self, model_name: Optional[str] = None, **kwargs: Any) -> None:
        """README.md for the Hub: the tasks learned, the continual metrics and the accuracy matrix, and how to load
        the adapter and continue the sequence."""
        if not self.is_world_process_zero():
            return
        text = self._model_card_text(self.continual_result, model_name or Path(self.args.output_dir).name)
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.args.output_dir) / "README.md").write_text(text, encoding="utf-8")

    def _model_card_text(self, result: Optional[ContinualResult], model_name: str,
                         revision: Optional[str] = None) -> str:
        """The model card for ``result``; with ``revision``, the card of that per-task branch."""
        base = getattr(self.peft_model.peft_config[self.peft_model.active_adapter], "base_model_name_or_path", None)
        lines = ["---", "library_name: peft", "tags:", "- inflora", "- continual-learning", "- peft"]
        if base:
            lines.append(f"base_model: {base}")
        lines += ["---", "", f"# {model_name}", "",
                  "An [InfLoRA](https://arxiv.org/abs/2404.00228) adapter trained with "
                  "[peft-inflora](https://pypi.org/project/peft-inflora/) on a sequence of tasks.", ""]
        if result is not None and result.accuracy_matrix:
            done = len(result.accuracy_matrix)
            if revision is not None:
                lines += [f"This revision (`{revision}`) holds the adapter after task {done} "
                          f"({result.task_names[done - 1]}); the repository's other `task-<k>-<name>` branches hold "
                          "the other points of the sequence.", ""]
            lines += [f"Tasks learned ({done}): " + ", ".join(result.task_names[:done]), "",
                      result.summary_table(), ""]
        load_from = f'REPO_ID, revision="{revision}"' if revision is not None else "REPO_ID"
        num_labels = getattr(self.peft_model.config, "num_labels", None)
        lines += ["## Usage", "", "```python",
                  "import peft_inflora  # registers the InfLoRA method with PEFT: required before loading",
                  "from peft import PeftModel", "",
                  f"base = ...  # {base or 'the base model'}"
                  + (f", with num_labels={num_labels}" if self.task_type != "generation" and num_labels else ""),
                  f"model = PeftModel.from_pretrained(base, {load_from}, is_trainable=True)",
                  "model.begin_task(next_task_batches)  # continue the sequence", "```", ""]
        return "\n".join(lines)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None, private: Optional[bool] = None,
                    **kwargs: Any) -> Any:
        """Push the adapter (with its memory), the continual result, the plots and a model card to
        ``args.hub_model_id``; the per-task checkpoints under ``continual/`` stay local."""
        from huggingface_hub import HfApi

        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._write_result()
        self.create_model_card(**kwargs)
        return HfApi(token=token).upload_folder(
            repo_id=self.hub_model_id, folder_path=self.args.output_dir, commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
            allow_patterns=list(HUB_FILES), run_as_future=not blocking,
        )

    def save_for_hub(self, folder: str | os.PathLike, model_name: Optional[str] = None) -> Path:
        """Write exactly what :meth:`push_to_hub` uploads (adapter with memory, result, plots, model card) into a
        local ``folder``, which then works as a repository for ``PeftModel.from_pretrained(base, folder)`` and
        ``ContinualResult.from_pretrained(folder)``: the offline stand-in for the Hub."""
        folder = Path(folder)
        self.save_model(str(folder))
        if self.is_world_process_zero():
            self._write_result()
            self.create_model_card(model_name=model_name or folder.name)
            for pattern in RUN_FILES:  # save_model wrote the adapter files
                for file in Path(self.args.output_dir).glob(pattern):
                    if file.is_file() and file.parent.resolve() != folder.resolve():
                        shutil.copy2(file, folder / file.name)
        return folder

    # ------------------------------------------------------------------ per-task Hub revisions
    @staticmethod
    def _check_push_task_revisions(push_task_revisions: Any, args: Any) -> None:
        """``push_task_revisions=True`` needs ``push_to_hub`` and ``hub_model_id`` in the ``TrainingArguments``."""
        if not isinstance(push_task_revisions, bool):
            raise ValueError(
                f"push_task_revisions must be True or False, got {push_task_revisions!r}: True pushes the state after "
                "every task to its own branch task-<k>-<name> of args.hub_model_id (branches, not tags: a branch can "
                "be uploaded to directly and updated when a failed push is retried).")
        if not push_task_revisions:
            return
        missing = [] if args is not None and args.push_to_hub else ["push_to_hub=True"]
        if args is None or not args.hub_model_id:
            missing.append("hub_model_id='<user or org>/<repo>'")
        if missing:
            raise ValueError(
                "push_task_revisions=True pushes each finished task to a branch of the Hub repository "
                f"args.hub_model_id: set TrainingArguments({', '.join(missing)}), or drop push_task_revisions.")

    def _push_task_revision(self, index: int, task_name: str, branch: str) -> None:
        """Push the checkpoint after task ``index`` (``continual/after-task-NN``: adapter with memory, result so far)
        with its plots and model card to ``branch``, created from ``args.hub_revision`` (``main``) if missing;
        exactly the files :meth:`push_to_hub` uploads. Main process only. Records the push in the checkpoint."""
        if not self.is_world_process_zero():
            return
        from huggingface_hub import HfApi

        checkpoint = Path(self.args.output_dir) / CONTINUAL_DIR / f"after-task-{index + 1:02d}"
        try:
            with tempfile.TemporaryDirectory(prefix="inflora-hub-") as staging:
                result = ContinualResult.from_json(str(checkpoint / RESULT_FILE))
                for pattern in HUB_FILES:  # the adapter files and the result
                    for file in checkpoint.glob(pattern):
                        shutil.copy2(file, Path(staging) / file.name)
                self._write_result(staging, result)  # plots
                name = f"{self.hub_model_id.split('/')[-1]} (after task {index + 1}: {task_name})"
                (Path(staging) / "README.md").write_text(self._model_card_text(result, name, revision=branch),
                                                         encoding="utf-8")
                api = HfApi(token=self.args.hub_token)
                api.create_branch(self.hub_model_id, branch=branch, revision=self.args.hub_revision, exist_ok=True)
                commit = api.upload_folder(repo_id=self.hub_model_id, folder_path=staging, revision=branch,
                                           commit_message=f"After task {index + 1}: {task_name}",
                                           allow_patterns=list(HUB_FILES))
        except Exception as exc:
            raise HubPushError(
                f"Pushing the state after task {index + 1} ('{task_name}') to branch '{branch}' of "
                f"{self.hub_model_id} failed ({type(exc).__name__}: {exc}). Nothing is lost: the adapter and the "
                f"result after this task are saved in {checkpoint}. Fix the cause (network, a token with write "
                "access, ...) and call train_continual(tasks, resume_from_checkpoint=True) with the same output_dir: "
                "it pushes the finished tasks whose branch is missing, then continues with the next task."
            ) from exc
        record = {"repo_id": self.hub_model_id, "revision": branch, "commit": getattr(commit, "oid", None)}
        (checkpoint / TASK_REVISION_RECORD).write_text(json.dumps(record), encoding="utf-8")

    def _push_missing_task_revisions(self, start: int, names: list[str], branches: list[str]) -> None:
        """On resume: push every local checkpoint of the first ``start`` tasks that is not yet on its branch of
        this repository (an upload failed, or the run before had ``push_task_revisions`` off)."""
        if not self.is_world_process_zero():
            return
        for index in range(start):
            checkpoint = Path(self.args.output_dir) / CONTINUAL_DIR / f"after-task-{index + 1:02d}"
            if not (checkpoint / RESULT_FILE).is_file():
                continue  # learned before this run's output_dir (a downloaded adapter): not ours to push
            record_file = checkpoint / TASK_REVISION_RECORD
            record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
            if record.get("repo_id") != self.hub_model_id or record.get("revision") != branches[index]:
                self._push_task_revision(index, names[index], branches[index])

    def _push_sequence_end(self, names: list[str]) -> None:
        """After the last task: :meth:`push_to_hub` to ``args.hub_revision`` (``main``), on every process (it saves
        the model on all of them and uploads from the main one)."""
        done = len(self.continual_result.accuracy_matrix)
        try:
            self.push_to_hub(commit_message=f"After task {done}: {names[done - 1]} (end of the sequence)")
        except Exception as exc:
            raise HubPushError(
                f"The sequence is trained and every task is on its task-<k>-<name> branch, but pushing the final "
                f"state to {self.args.hub_revision or 'main'} of {self.hub_model_id} failed ({type(exc).__name__}: "
                f"{exc}). The final adapter and result are in {self.args.output_dir}: call trainer.push_to_hub() "
                "again once the cause is fixed."
            ) from exc
