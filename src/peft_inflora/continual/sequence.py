"""The sequence learned so far, for the continual trainers: found (trainer memory, a downloaded adapter plus its
result, or ``output_dir``'s last ``continual/after-task-NN``), checked, then adopted, together with the class
statistics that classifier alignment needs for the classes already learned; and the next task checked against it
(its data, its class range, ``prepare_train_dataset``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

from .arguments import ContinualTask
from .checkpoint import SequenceSoFar, load_adapter_state, resolve_sequence
from .head_alignment import CLASS_STATISTICS_FILE, load_class_statistics
from .heads import ClassRange, ensure_head_size, find_head, num_task_classes, to_global_labels
from .revisions import task_revision_names


__all__ = ["SequenceMixin"]


class SequenceMixin:
    """The sequence half of :class:`~.loop.ContinualMixin` (it reads and sets the trainer's ``continual_tasks``,
    ``_eval_datasets``, ``_class_ranges``, ``continual_result`` and ``_head_alignment``)."""

    def _resolve(self, previous_tasks: Optional[Sequence[ContinualTask]], previous_result: Any, resume: bool,
                 prefix_of_sequence: bool = False) -> SequenceSoFar:
        """Find the sequence learned so far (see :meth:`train_task`) and check it; changes nothing."""
        memory = None
        if self.continual_tasks:
            memory = SequenceSoFar("memory", list(self.continual_tasks), list(self._eval_datasets),
                                   list(self._class_ranges), self.continual_result)
        return resolve_sequence(
            memory=memory, learned=self.peft_model.tasks_done() if self.is_inflora else 0,
            output_dir=self.args.output_dir, previous_tasks=previous_tasks, previous_result=previous_result,
            resume=resume, classification=self._classification, prefix_of_sequence=prefix_of_sequence)

    @property
    def class_statistics(self) -> Any:
        """The stored class statistics (:class:`~.alignment.ClassStatistics`) of the classes seen so far, or
        ``None`` (alignment off, or no task yet)."""
        return self._head_alignment.statistics

    def load_class_statistics(self, source: Union[str, os.PathLike], revision: Optional[str] = None) -> None:
        """Read the class statistics saved with an adapter (a folder, or a Hub repo id at ``revision``) before
        continuing its sequence, where ``previous_result`` does not say where it came from (with a folder or repo id
        as ``previous_result``, or ``ContinualResult.from_pretrained(...)``, they are read from there by
        themselves)."""
        statistics = load_class_statistics(source, revision=revision, token=self.args.hub_token)
        if statistics is None:
            raise ValueError(f"{source} holds no class statistics ({CLASS_STATISTICS_FILE}): it was saved without "
                             "classifier alignment.")
        self._head_alignment.statistics = statistics

    def _adopt(self, sequence: SequenceSoFar) -> None:
        """Make the resolved sequence the trainer's (loads a checkpoint's adapter into the model)."""
        if sequence.source in ("memory", "fresh"):
            return
        self._adopt_class_statistics(sequence)  # may refuse: first, before anything changes
        if sequence.class_ranges:  # first, so that a checkpoint's grown head fits
            rows = max(sequence.class_ranges[-1][1], sequence.head_size)
            ensure_head_size(self.peft_model, rows, self.args.seed)
        if sequence.checkpoint is not None:
            load_adapter_state(self.peft_model, sequence.checkpoint)
        self.continual_tasks = list(sequence.tasks)
        self._eval_datasets = list(sequence.eval_datasets)
        self._class_ranges = list(sequence.class_ranges)
        self.continual_result = copy.deepcopy(sequence.result)
        self.continual_result.extra.update(self._result_extra())

    def _adopt_class_statistics(self, sequence: SequenceSoFar) -> None:
        """The class statistics of a sequence continued from a checkpoint or a downloaded adapter (read from the
        checkpoint, or the folder / repo id given as ``previous_result``, unless loaded already); refuses where
        alignment is on and the learned classes have none."""
        alignment = self._head_alignment
        if not alignment.enabled:
            return
        statistics, where = alignment.statistics, "the loaded statistics"
        origin = (sequence.checkpoint, None) if sequence.checkpoint is not None else sequence.origin
        if origin is not None:
            found = load_class_statistics(origin[0], revision=origin[1], token=self.args.hub_token)
            where = str(origin[0]) + (f" (revision {origin[1]})" if origin[1] else "")
            statistics = found if found is not None else statistics
        alignment.check_continuation(statistics, list(sequence.class_ranges), where)
        alignment.statistics = statistics

    def _push_missing(self) -> None:
        """With push_task_revisions: push the finished tasks whose branch is missing (an upload failed before)."""
        if self.args.push_task_revisions and self.continual_tasks:
            self._push_missing_task_revisions([t.name for t in self.continual_tasks])

    def _result_extra(self) -> dict[str, Any]:
        if self.is_inflora:
            method = "InfLoRA"
        else:
            peft_type = self.peft_model.peft_config[self.peft_model.active_adapter].peft_type
            method = f"sequential {getattr(peft_type, 'value', peft_type)}"
        return {"setting": self.args.setting, "method": method, "continual_arguments": self.args.continual_dict()}

    # ------------------------------------------------------------------ the next task
    def _check_task_data(self, task: ContinualTask) -> None:
        self.task_metric(task)  # a metric that does not load fails here, before anything changes
        if task.train_dataset is None:
            raise ValueError(f"Task '{task.name}' has no train_dataset.")
        if task.eval_dataset is None:
            raise ValueError(f"Task '{task.name}' has no eval_dataset: every task needs test data for the accuracy "
                             "matrix.")
        if not self._classification:
            if self.processing_class is None:
                raise ValueError("Generation evaluation needs the tokenizer: pass processing_class=tokenizer.")
            self.check_generation_eval_dataset(task)

    def _prepare_task(self, task: ContinualTask, sequence: SequenceSoFar) -> tuple[Any, Any, Optional[ClassRange]]:
        """Check the next task against the sequence and give its (train, eval) data and class range."""
        names = [t.name for t in sequence.tasks]
        if task.name in names:
            raise ValueError(f"Task names must be unique: '{task.name}' is already learned ({names}).")
        self._check_task_data(task)
        if self.args.push_task_revisions:
            task_revision_names(names + [task.name])
        if not self._classification:
            return self.prepare_train_dataset(task.train_dataset, task), task.eval_dataset, None
        self._head_alignment.check_head(find_head(self.peft_model)[1])
        lo = sequence.class_ranges[-1][1] if sequence.class_ranges else 0
        classes = (lo, lo + num_task_classes(task))
        train_dataset = to_global_labels(task.train_dataset, classes, task.name)
        return self.prepare_train_dataset(train_dataset, task), to_global_labels(task.eval_dataset, classes,
                                                                                 task.name), classes

    # ------------------------------------------------------------------ hooks for subclasses
    def prepare_train_dataset(self, dataset: Any, task: ContinualTask) -> Any:
        """The task's training data as this trainer trains on it (default: as given; classification: with global
        labels already). A trainer that prepares data in ``__init__`` (TRL's ``SFTTrainer`` tokenizes
        conversations) overrides this to prepare each task's data the same way. Called before anything changes."""
        return dataset
