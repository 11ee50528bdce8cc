"""The continual task loop, as a mixin over ``transformers.Trainer`` hooks.

For task ``t`` (0-based): ``begin_task`` over the task's training data, read through the trainer's own,
Accelerate-prepared dataloader (so under DDP each process sees its shard and the statistics are all-reduced, and under
TRL the covariance sees exactly the tokens that are trained); ``Trainer.train()`` with a fresh optimizer and scheduler;
``end_task``; then the evaluation of every task seen so far, which is row ``t`` of the accuracy matrix. The training
loop is never copied: the mixin overrides ``compute_loss`` (classification: the loss over the task's classes; a
callback restores the old head rows bit for bit after every optimizer step: :class:`~.heads.HeadLossMixin`);
``_get_output_dir`` (the Trainer's own checkpoints of task ``t`` go to ``output_dir/continual/task-NN-<name>``, while
``args.output_dir`` stays the same for every callback); ``train``; and the Hub methods (:class:`~.hub.HubMixin`).
Sharding wrappers: :mod:`~.sharding` (and DeepSpeed ZeRO-3's whole-parameter steps: :mod:`~.zero3`). With several
processes the local steps of a task boundary (checks and data preparation, scoring the evaluation, writing the
checkpoint) end in ``peft_inflora.distributed.agree``: when one process fails there, every process raises.

``class MyTrainer(ContinualMixin, SomeTrainer)`` makes any ``Trainer`` subclass continual, with arguments of a class
``(ContinualArguments, SomeTrainingArguments)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

from peft import PeftModel
from transformers import TrainerCallback
from transformers.trainer_utils import set_seed

from ..distributed import agree, reshard_fsdp_modules
from ..errors import DistributedStepError
from . import zero3
from .arguments import ContinualArguments, ContinualTask, ContinualTrainingArguments, task_record
from .capacity import report_capacity
from .card import CardLocation
from .checkpoint import mid_task_checkpoint, save_after_task, task_run_dir
from .evaluation import AnswerMetric, TaskMetric
from .head_alignment import HeadAlignment
from .heads import (
    ClassRange,
    CosineLogits,
    FrozenHeadRows,
    HeadLossMixin,
    RestoreFrozenHeadRows,
    check_local_labels,
    find_head,
    num_task_classes,
)
from .hub import HubMixin, task_revision_names
from .result import ContinualResult
from .sequence import SequenceMixin
from .sharding import FSDPPluginMixin, check_sharding, is_fsdp2_sharded
from .task_evaluation import TaskEvaluationMixin
from .zero3 import adapter_file_parameters, gathered, take_whole_adapter


__all__ = ["ContinualCallback", "ContinualMixin"]

# options that were ContinualTrainer keyword arguments before they became ContinualArguments fields
_MOVED_OPTIONS = {"task_type": "setting", "loss_classes": "loss_classes",
                  "generation_max_new_tokens": "generation_max_new_tokens",
                  "push_task_revisions": "push_task_revisions"}

class ContinualCallback(TrainerCallback):
    """A ``TrainerCallback`` with two more events, called by the continual trainers around every task."""

    def on_task_begin(self, args, state, control, task: ContinualTask, task_index: int, **kwargs):
        """After ``begin_task`` (B_t designed), before training the task (``task_index`` 0-based)."""

    def on_task_end(self, args, state, control, task: ContinualTask, task_index: int, result: ContinualResult,
                    **kwargs):
        """After ``end_task``, the evaluation of every task seen so far (``result`` has the new row) and the
        checkpoint ``continual/after-task-NN``."""

class ContinualMixin(FSDPPluginMixin, SequenceMixin, TaskEvaluationMixin, HeadLossMixin, HubMixin):
    """The continual loop for any ``transformers.Trainer`` subclass (put it first: ``(ContinualMixin, Trainer)``).

    Args:
        args: a ``ContinualArguments`` subclass of the trainer's arguments (e.g. ``ContinualTrainingArguments``);
            ``None`` gives ``continual_arguments_class(output_dir="trainer_output")``.
        answer_metric: setting ``"generation"``: ``f(predictions, references) -> float`` instead of exact match.
        All other arguments are the trainer's. The model must be a ``PeftModel``; with an InfLoRA adapter each task
        gets its own branch; with another PEFT method (e.g. LoRA) the same loop runs as plain sequential fine-tuning
        (a baseline).
    """

    continual_arguments_class: type = ContinualTrainingArguments

    def __init__(self, *args: Any, answer_metric: Optional[AnswerMetric] = None, **kwargs: Any) -> None:
        moved = [name for name in _MOVED_OPTIONS if name in kwargs]
        if moved:
            raise TypeError(f"{', '.join(moved)} are no longer trainer arguments: set them in the training arguments, "
                            f"e.g. {self.continual_arguments_class.__name__}(output_dir=..., "
                            + ", ".join(f"{_MOVED_OPTIONS[m]}=..." for m in moved) + ").")
        positional = len(args) > 1
        training_args = args[1] if positional else kwargs.get("args")
        if training_args is None:
            training_args = self.continual_arguments_class(output_dir="trainer_output")
            if positional:
                args = (args[0], training_args) + tuple(args[2:])
            else:
                kwargs["args"] = training_args
        if not isinstance(training_args, ContinualArguments):
            raise TypeError(
                f"{type(self).__name__} needs the continual options in its arguments: pass "
                f"args={self.continual_arguments_class.__name__}(...) (every {type(training_args).__name__} field "
                f"plus setting, loss_classes, ...) instead of {type(training_args).__name__}.")
        super().__init__(*args, **kwargs)
        if not isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
            raise TypeError(f"{type(self).__name__} needs a PeftModel: wrap the model with "
                            "`get_peft_model(model, InfLoRAConfig(...))` first.")
        self._shard_with_fsdp_plugin()  # fsdp=... asked of Accelerate: the trainer shards the model itself
        if is_fsdp2_sharded(self.peft_model):  # sharded by its owner (fully_shard before the trainer): the
            # Trainer's path for such a model: no DDP wrap, replicated trainables (A_t, head) broadcast + averaged
            self.is_distributed_loading_by_transformers, self.place_model_on_device = True, False
        self.answer_metric = answer_metric
        self.add_callback(RestoreFrozenHeadRows(self))
        self.continual_result: Optional[ContinualResult] = None
        self.continual_tasks: list[ContinualTask] = []  # the tasks learned so far, in order
        self._eval_datasets: list[Any] = []
        self._class_ranges: list[ClassRange] = []
        self._current: Optional[tuple[int, ContinualTask]] = None  # (1-based number, task) while a task trains
        self._task_classes: Optional[ClassRange] = None
        self._frozen_head: Optional[FrozenHeadRows] = None
        self._planned_names: Optional[list[str]] = None  # the sequence train_continual runs
        self._last_train_output: Any = None
        self._task_metrics: dict[str, TaskMetric] = {}  # by task name
        self._head_alignment = HeadAlignment(self.args)  # class statistics + alignment after each task
        # head_logits="cosine": cosine logits while a task trains (and in the evaluation, without alignment)
        self._cosine = CosineLogits(self.args.cosine_scale) \
            if self._classification and self.args.head_mode() == "cosine" else None
        if self.args.setting != "generation":
            self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    # ------------------------------------------------------------------ model access
    @property
    def peft_model(self) -> PeftModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_inflora(self) -> bool:
        """False for other PEFT methods, which the trainer runs as plain sequential fine-tuning (a baseline)."""
        return hasattr(self.peft_model.base_model, "begin_task")

    @property
    def _classification(self) -> bool:
        return self.args.setting != "generation"

    # ------------------------------------------------------------------ Trainer hooks
    def _get_output_dir(self, trial: Any) -> str:
        """While task NN trains, the Trainer's own checkpoints go to ``continual/task-NN-<name>`` under the run's
        folder (``args.output_dir`` itself never changes)."""
        run_dir = super()._get_output_dir(trial)
        if self._current is None:
            return run_dir
        number, task = self._current
        return str(task_run_dir(run_dir, number, task.name))

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, trial: Any = None,
              ignore_keys_for_eval: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """Learn ``train_dataset`` (evaluated on ``eval_dataset``) as the next task of the sequence, named
        ``task-<k>``: ``train_task(ContinualTask(f"task-{k}", train_dataset, eval_dataset))``. Returns the
        ``TrainOutput`` of that task; the accuracy matrix is in ``trainer.continual_result``.

        ``resume_from_checkpoint=False`` ignores the ``continual/after-task-NN`` checkpoints of ``output_dir``;
        ``None`` or ``True`` continues after the last of them (see :meth:`train_task`), inside the interrupted task
        from its last Trainer checkpoint when there is one. A path is refused: the trainer finds its resume point."""
        if self._current is not None:  # inside train_task: the trainer's own loop
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)) or trial is not None:
            raise ValueError(
                "A continual trainer finds its resume point in output_dir itself (the last continual/after-task-NN, "
                "then the interrupted task's last continual/task-NN-<name>/checkpoint-<step>), not from a given "
                "checkpoint path, and runs no hyperparameter trial: call trainer.train() (or "
                "trainer.train_task(task)) with resume_from_checkpoint=True, or False to start over.")
        if self.train_dataset is None or self.eval_dataset is None or isinstance(self.eval_dataset, dict):
            raise ValueError(
                "trainer.train() learns train_dataset as the next task and evaluates it on eval_dataset: pass both "
                "(eval_dataset one dataset, not a dict) to the trainer, or call "
                "trainer.train_task(ContinualTask(name, train_dataset, eval_dataset)) or "
                "trainer.train_continual(tasks).")
        resume = resume_from_checkpoint is not False
        sequence = self._resolve(None, None, resume)
        task = ContinualTask(f"task-{len(sequence.tasks) + 1}", self.train_dataset, self.eval_dataset)
        self.train_task(task, resume_from_checkpoint=resume)
        return self._last_train_output

    # ------------------------------------------------------------------ public API
    def train_task(self, task: ContinualTask, *, previous_tasks: Optional[Sequence[ContinualTask]] = None,
                   previous_result: Optional[Union[ContinualResult, str, os.PathLike]] = None,
                   resume_from_checkpoint: bool = True) -> ContinualResult:
        """Learn one more task, then evaluate it and every earlier task (a new row of the accuracy matrix).

        Where the sequence so far comes from, in this order:

        * this trainer's memory (the tasks it learned, with their eval data);
        * a downloaded adapter (``PeftModel.from_pretrained``, ``tasks_done() > 0``): pass ``previous_result`` (a
          :class:`ContinualResult`, or the folder / Hub repo id it was saved in) and ``previous_tasks``;
        * ``output_dir`` after a restart (``resume_from_checkpoint=True``, the default): the adapter of the last
          ``continual/after-task-NN`` is loaded into the model, and ``previous_tasks`` is needed; when ``task`` was
          stopped part-way, its training resumes from its last Trainer checkpoint (``save_strategy`` not ``"no"``);
        * nothing: ``task`` is the first task.

        ``previous_tasks`` are the learned tasks, in order, with their ``eval_dataset`` (``train_dataset`` may be
        ``None``): every new row evaluates them. Everything is checked before anything changes.
        """
        check_sharding(self, self.peft_model)
        with agree("train_task: checks and data preparation"):  # local on every process; nothing changed yet
            sequence = self._resolve(previous_tasks, previous_result, resume_from_checkpoint)
            prepared = self._prepare_task(task, sequence)
        self._adopt(sequence)
        self._push_missing()
        self._learn(task, *prepared, resume=resume_from_checkpoint)
        return self.continual_result

    def train_continual(self, tasks: Sequence[ContinualTask], resume_from_checkpoint: bool = False,
                        previous_result: Optional[Union[ContinualResult, str, os.PathLike]] = None) -> ContinualResult:
        """Learn ``tasks`` in order (a loop over :meth:`train_task`) and return the :class:`ContinualResult`
        (accuracy matrix, A_T, A_avg, BWT, forgetting, times), also written to ``output_dir`` with plots.

        ``resume_from_checkpoint=True`` continues after the last finished task saved in ``output_dir``. To continue
        a downloaded adapter that learned ``k`` tasks, ``tasks`` is the whole sequence (the ``k`` learned tasks
        first) and ``previous_result`` the result saved with it. With ``push_task_revisions`` every finished task is
        pushed to its branch, and the end of the sequence to ``hub_revision`` (``main``); after a failed upload,
        ``resume_from_checkpoint=True`` first pushes the finished tasks whose branch is missing.
        """
        check_sharding(self, self.peft_model)
        with agree("train_continual: checks"):  # local on every process; nothing changed yet
            tasks = list(tasks)
            if not tasks:
                raise ValueError("`tasks` is empty: pass at least one ContinualTask.")
            names = [t.name for t in tasks]
            if len(set(names)) != len(names):
                raise ValueError(f"Task names must be unique, got {names}.")
            if self.args.push_task_revisions:
                task_revision_names(names)  # bad names fail before training
            sequence = self._resolve(tasks, previous_result, resume_from_checkpoint, prefix_of_sequence=True)
            done = len(sequence.tasks)
            if sequence.source == "adapter" and done >= len(tasks):
                raise ValueError(f"The adapter learned {names[:done]}; `tasks` must start with those tasks, in that "
                                 f"order, and add at least one new task (got {names}).")
            for task in tasks[done:]:  # every new task's data, checked before anything changes
                self._check_task_data(task)
            if self._classification:
                for task in tasks[done:]:
                    for dataset in (task.train_dataset, task.eval_dataset):
                        check_local_labels(dataset, num_task_classes(task), task.name)
        self._adopt(sequence)
        self._push_missing()
        if self.continual_result is not None:
            self.continual_result.task_names = names  # the plan: later columns stay blank until learned
        self._planned_names = names
        try:
            for task in tasks[done:]:
                self.train_task(task, resume_from_checkpoint=resume_from_checkpoint)
        finally:
            self._planned_names = None
        if self.args.push_task_revisions:
            self._push_sequence_end()
        return self.continual_result

    # ------------------------------------------------------------------ the sequence so far

    # ------------------------------------------------------------------ one task
    def _learn(self, task: ContinualTask, train_dataset: Any, eval_dataset: Any, classes: Optional[ClassRange],
               resume: bool = False) -> None:
        index = len(self.continual_tasks)
        # a task stopped part-way resumes from the Trainer's last checkpoint of it (same B_t: begin_task is exact);
        # save_only_model checkpoints hold no optimizer state: that task starts over, as transformers documents
        mid_task = mid_task_checkpoint(self.args.output_dir, index + 1, task.name) \
            if resume and not self.args.save_only_model else None
        names = [t.name for t in self.continual_tasks] + [task.name]
        plan = self._planned_names if self._planned_names and self._planned_names[: index + 1] == names else names
        result = self.continual_result
        if result is None:
            result = ContinualResult(task_names=plan, extra=self._result_extra())
        elif list(result.task_names[: index + 1]) != names:
            result.task_names = plan
        self.continual_result = result
        peft_model, show = self.peft_model, self.is_world_process_zero() and not self.args.disable_tqdm
        user_data = (self.train_dataset, self.eval_dataset)
        set_seed(self.args.seed + index)
        if classes is not None:
            self._begin_head(peft_model, classes, index)
        self.train_dataset = train_dataset
        if classes is not None:  # evaluation during training (eval_strategy) sees global labels too
            self.eval_dataset = eval_dataset
        self._current = (index + 1, task)
        aligns = classes is not None and self._head_alignment.enabled
        alignment_batches = None
        try:
            if classes is not None:
                self._head_alignment.begin_task(find_head(peft_model)[1], resumed=mid_task is not None)
                if self._cosine is not None:
                    self._cosine.attach(find_head(peft_model)[1])  # and active while the task trains
            t0 = time.perf_counter()
            if self.is_inflora:
                peft_model.begin_task(self.get_train_dataloader(), progress=show)
            statistics_seconds = time.perf_counter() - t0
            self._call_task_event("on_task_begin", task=task, task_index=index)
            self.optimizer, self.lr_scheduler = None, None
            self.model_wrapped = self.model  # re-wrap (DDP) around this task's new A_t
            zero3.forget_engine_hooks(peft_model)  # ZeRO-3: the new engine binds its own backward hooks
            t0 = time.perf_counter()
            self._last_train_output = self.train(resume_from_checkpoint=mid_task)
            train_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.is_inflora:
                take_whole_adapter(peft_model)  # ZeRO-3: end_task reads and folds whole A_t (no-op otherwise)
                peft_model.end_task(self.get_train_dataloader(), progress=show)
            statistics_seconds += time.perf_counter() - t0
            if aligns:  # the task's batches, for an alignment that reads them once more (extra_pass)
                alignment_batches = self.get_train_dataloader()
        except BaseException:
            self._head_alignment.abort_task()
            if self.is_inflora and peft_model.task_in_progress():
                peft_model.abort_task()  # memory and finished tasks untouched: the task can be learned again
            raise
        finally:
            self.train_dataset, self.eval_dataset = user_data
            self._current, self._task_classes, self._frozen_head = None, None, None
            if self._cosine is not None:  # aligned heads are linear; without alignment the head stays cosine
                self._cosine.active = not self._head_alignment.enabled
        if self.is_inflora:
            self.log(report_capacity(peft_model, result, index + 1, task.name,
                                     len(self._planned_names) if self._planned_names else None))
        self.continual_tasks.append(task)
        self._eval_datasets.append(eval_dataset)
        if classes is not None:
            self._class_ranges.append(classes)
            result.extra["class_ranges"] = [list(r) for r in self._class_ranges]
        result.extra.setdefault("tasks", {})[task.name] = task_record(task) | {"metric": self.task_metric(task).name}
        try:
            if aligns:  # agreed inside: on a failure the head and the class statistics are as they were
                t0 = time.perf_counter()
                self._head_alignment.end_task(peft_model, find_head(peft_model)[1], index, classes,
                                              alignment_batches)
                self.log({"continual/alignment_seconds": time.perf_counter() - t0})
            row = self.evaluate_tasks()
            timings = len(result.train_seconds) == index and len(result.statistics_seconds) == index
            result.add_row(row, train_seconds=train_seconds if timings else None,
                           statistics_seconds=statistics_seconds if timings else None)
            # FSDP2 leaves the root unsharded after the evaluation's forwards, and state_dict() reshards it on the
            # saving process only: reshard everywhere first, or the next forward's all-gathers differ between processes
            reshard_fsdp_modules(peft_model)
            # process 0 writes; a failed write stops every process. ZeRO-3: the adapter whole on every process
            # meanwhile (a collective, so outside the local step)
            with gathered(adapter_file_parameters(peft_model)), agree(f"checkpoint after task {index + 1}"):
                if self.args.should_save:
                    save_after_task(peft_model, result, self.args.output_dir, names,
                                    self._class_ranges if classes is not None else None, self.args.to_json_string(),
                                    complete=self._complete_checkpoint)
        except DistributedStepError as err:  # another process failed after this task was learned
            raise DistributedStepError(
                f"{err} (That step changed nothing, but task '{task.name}' had already been learned on every "
                f"process: the adapter and this trainer hold {index + 1} tasks, while output_dir holds no row and no "
                f"checkpoint of it. To go on from the files, start new processes with resume_from_checkpoint=True: "
                f"they continue after the last checkpoint.)", step=err.step, failed_ranks=err.failed_ranks,
                errors=err.errors) from err
        self._call_task_event("on_task_end", task=task, task_index=index, result=result)
        self.log({f"continual/accuracy_after_{task.name}": sum(row) / len(row)})
        with agree(f"Hub push after task {index + 1}"):  # process 0 uploads; a failed upload stops every process
            if self.args.should_save:
                self._push_after_task(index + 1, task.name)  # as hub_strategy says (push_to_hub=True)
            if self.args.push_task_revisions:
                self._push_task_revision(index + 1, task.name, task_revision_names(names)[index])
                if self._planned_names is None:  # train_task on its own: main follows the latest task
                    self._push_sequence_end()

    def _complete_checkpoint(self, folder: Any) -> None:
        """What a ``continual/after-task-NN`` holds besides the adapter and the result: the processing class and
        the model card."""
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(folder))
        self._head_alignment.save(folder)
        self.write_model_card(folder, location=CardLocation(checkpoint_of=str(self.args.output_dir)))

    def _call_task_event(self, event: str, **kwargs: Any) -> None:
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self.args, self.state, self.control, model=self.peft_model, **kwargs)
