"""Scoring the tasks seen so far: row ``t`` of the accuracy matrix, for the continual trainers.

``evaluate_tasks`` gives ``R[t, j]`` for ``j = 0..t``: classification takes the Trainer's ``predict`` logits and scores
``argmax`` over ``[0, hi_t)`` (class-incremental: every class seen so far) or over task ``j``'s own ``[lo_j, hi_j)``
(task-incremental); generation scores greedy answers to the prompts of task ``j``'s eval data. Each task is scored by
its :class:`~.evaluation.TaskMetric`. With several processes the predictions are collectives and the local steps
(reading references, scoring) end in ``peft_inflora.distributed.agree``.
"""

from __future__ import annotations

from typing import Any, Optional

from ..distributed import agree
from .arguments import ContinualTask
from .evaluation import TaskMetric, classification_accuracy, generate_answers, score_answers


__all__ = ["TaskEvaluationMixin"]


class TaskEvaluationMixin:
    """The evaluation half of :class:`~.loop.ContinualMixin` (it reads the trainer's ``args``,
    ``continual_tasks``, ``_eval_datasets``, ``_class_ranges``, ``answer_metric`` and ``_task_metrics``)."""

    def evaluate_tasks(self) -> list[float]:
        """The accuracy (or answer score) on every task learned so far, with the current model and ``setting``.

        Several processes: the predictions are made together (the forwards and gathers are collectives); reading the
        references and scoring are local steps that every process agrees on (``peft_inflora.distributed.agree``), so
        one process failing there makes every process raise instead of leaving the others waiting."""
        seen = len(self.continual_tasks) - 1
        step = f"evaluation after task {seen + 1}"
        references: list[Any] = [None] * (seen + 1)
        if not self._classification:
            with agree(f"{step} (eval data)"):
                references = [self.generation_references(self._eval_datasets[j]) for j in range(seen + 1)]
        outputs = [self._predict(j, references[j]) for j in range(seen + 1)]
        with agree(f"{step} (scores)"):
            return [self._score(j, seen, output, references[j]) for j, output in enumerate(outputs)]

    def task_metric(self, task: ContinualTask) -> TaskMetric:
        """What scores ``task`` in the matrix: ``task.metric``, else (generation) the trainer's ``answer_metric``,
        else ``args.eval_metric``, else the shipped ``accuracy`` / ``exact_match`` (loaded once per task name)."""
        if task.name not in self._task_metrics:
            default = "accuracy" if self._classification else "exact_match"
            if task.metric is not None:
                metric = TaskMetric(task.metric, task.metric_key, default=default)
            elif not self._classification and self.answer_metric is not None:
                metric = TaskMetric(self.answer_metric, task.metric_key, default=default)
            else:
                metric = TaskMetric(self.args.eval_metric, task.metric_key or self.args.eval_metric_key,
                                    default=default)
            self._task_metrics[task.name] = metric
        return self._task_metrics[task.name]

    def check_generation_eval_dataset(self, task: ContinualTask) -> None:
        """Refuse, before anything changes, eval data that :meth:`generation_references` cannot read."""
        columns = getattr(task.eval_dataset, "column_names", None) or []
        missing = [c for c in (self.args.eval_prompt_column, self.args.eval_answer_column) if c not in columns]
        if missing:
            raise ValueError(f"Task '{task.name}': the eval_dataset has no column {missing} (it has {columns}); "
                             "set eval_prompt_column / eval_answer_column in the training arguments.")

    def generation_references(self, dataset: Any) -> tuple[list[str], list[str]]:
        """``(prompts, reference answers)`` of a generation task's eval data (default: the columns
        ``eval_prompt_column`` / ``eval_answer_column``); e.g. a TRL trainer renders conversations here."""
        return list(dataset[self.args.eval_prompt_column]), list(dataset[self.args.eval_answer_column])

    def _predict(self, j: int, references: Optional[tuple[list[str], list[str]]]) -> Any:
        """The model's outputs on task ``j``'s eval data: generated answers to ``references``' prompts, or the
        Trainer's ``predict`` output."""
        if not self._classification:
            return generate_answers(
                self.peft_model, self.processing_class, references[0], batch_size=self.args.per_device_eval_batch_size,
                max_new_tokens=self.args.generation_max_new_tokens, device=self.args.device,
                num_beams=getattr(self.args, "generation_num_beams", None) or 1)
        return self.predict(self._eval_datasets[j], metric_key_prefix=f"eval_{self.continual_tasks[j].name}")

    def _score(self, j: int, seen: int, output: Any, references: Optional[tuple[list[str], list[str]]]) -> float:
        """Accuracy (answer score) on task ``j`` after learning tasks ``0..seen``, from :meth:`_predict`'s output."""
        if not self._classification:
            return score_answers(output, references[1], self.task_metric(self.continual_tasks[j]))
        classes = (0, self._class_ranges[seen][1]) if self.args.setting == "class_incremental" \
            else self._class_ranges[j]
        return classification_accuracy(output.predictions, output.label_ids, classes,
                                       self.task_metric(self.continual_tasks[j]))
