"""The files of a continual run in ``output_dir``: atomic per-task checkpoints, the result with its plots, resume.

Layout (every name defined here once)::

    output_dir/
      continual_result.json, accuracy_matrix.png, accuracy_curve.png   the run so far
      continual/after-task-NN/                                         the state after task NN (1-based)
        adapter_config.json, adapter_model.safetensors                 the adapter with its memory
        continual_result.json, accuracy_*.png, README.md, tokenizer    the result, its plots, the model card
        progress.json, training_args.json                              the task list, the options (local only)
        hub_revision.json                                              once pushed to its Hub branch
      continual/task-NN-<name>/checkpoint-*/                           the Trainer's own checkpoints of task NN

A checkpoint is written into ``.after-task-NN.tmp`` and renamed, so a crash never leaves one that loads wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from transformers.trainer_utils import get_last_checkpoint

from .arguments import ContinualTask
from .heads import ClassRange, class_ranges, num_task_classes, to_global_labels
from .result import RESULT_FILE, ContinualResult


CONTINUAL_DIR = "continual"
PROGRESS_FILE = "progress.json"
ARGUMENTS_FILE = "training_args.json"
TASK_REVISION_RECORD = "hub_revision.json"  # written into a checkpoint once that state is on its Hub branch
PLOT_FILES = ("accuracy_matrix.png", "accuracy_curve.png")
# files of a checkpoint that only make sense next to its output_dir (a resume point), never at a repository's root
LOCAL_FILES = (PROGRESS_FILE, ARGUMENTS_FILE, TASK_REVISION_RECORD)

PathLike = Union[str, os.PathLike]

__all__ = ["CONTINUAL_DIR", "LOCAL_FILES", "PLOT_FILES", "PROGRESS_FILE", "TASK_REVISION_RECORD", "checkpoint_dir",
           "latest_checkpoint",
           "load_adapter_state", "read_progress", "resolve_sequence", "save_after_task", "task_run_dir",
           "write_result"]


def checkpoint_dir(output_dir: PathLike, task_number: int) -> Path:
    """``output_dir/continual/after-task-NN``: the state after task ``task_number`` (1-based)."""
    return Path(output_dir) / CONTINUAL_DIR / f"after-task-{task_number:02d}"


def task_run_dir(output_dir: PathLike, task_number: int, task_name: str) -> Path:
    """``output_dir/continual/task-NN-<name>``: where the Trainer's own checkpoints of that task go."""
    return Path(output_dir) / CONTINUAL_DIR / f"task-{task_number:02d}-{task_name}"


def mid_task_checkpoint(output_dir: PathLike, task_number: int, task_name: str) -> Optional[str]:
    """The Trainer's last ``checkpoint-<step>`` of task ``task_number`` (``task_run_dir``), or ``None``: where a task
    that was stopped part-way resumes (``Trainer.train(resume_from_checkpoint=...)``)."""
    folder = task_run_dir(output_dir, task_number, task_name)
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The last complete ``after-task-NN`` checkpoint of ``output_dir``, or ``None``."""
    root = Path(output_dir) / CONTINUAL_DIR
    done = sorted(p for p in root.glob("after-task-[0-9][0-9]") if (p / PROGRESS_FILE).is_file()) \
        if root.is_dir() else []
    return done[-1] if done else None


def read_progress(folder: PathLike) -> dict[str, Any]:
    """``{"tasks_done": k, "task_names": [...], "class_ranges": [[lo, hi], ...], "num_labels": n}`` of a checkpoint
    (the last two ``None`` for generation)."""
    return json.loads((Path(folder) / PROGRESS_FILE).read_text(encoding="utf-8"))


def write_result(result: ContinualResult, folder: PathLike) -> None:
    """``continual_result.json`` and the two plots of ``result`` into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / RESULT_FILE)
    result.plot_accuracy_matrix(out / PLOT_FILES[0])
    result.plot_accuracy_curve(out / PLOT_FILES[1])


def save_after_task(model: PeftModel, result: ContinualResult, output_dir: PathLike, task_names: list[str],
                    class_ranges: Optional[list[tuple[int, int]]], arguments_json: str,
                    complete: Optional[Callable[[Path], None]] = None) -> Path:
    """Atomically save the state after the ``result.num_learned``-th task (adapter with memory, result and plots,
    progress, options, and whatever ``complete(folder)`` adds: the model card, the tokenizer), then copy the result
    and plots of the run into ``output_dir``; returns the checkpoint folder."""
    done = result.num_learned
    final = checkpoint_dir(output_dir, done)
    tmp = final.parent / f".{final.name}.tmp"
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    write_result(result, tmp)
    progress = {"tasks_done": done, "task_names": list(task_names[:done]),
                "class_ranges": [list(r) for r in class_ranges[:done]] if class_ranges is not None else None,
                "num_labels": getattr(model.config, "num_labels", None) if class_ranges is not None else None}
    (tmp / PROGRESS_FILE).write_text(json.dumps(progress), encoding="utf-8")
    (tmp / ARGUMENTS_FILE).write_text(arguments_json, encoding="utf-8")
    if complete is not None:
        complete(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for name in (RESULT_FILE,) + PLOT_FILES:  # the run so far, drawn once
        shutil.copy2(final / name, Path(output_dir) / name)
    return final


def load_adapter_state(model: PeftModel, folder: PathLike) -> None:
    """Load a checkpoint's adapter (weights, memory and finished tasks) into the active adapter of ``model``."""
    weights = load_peft_weights(str(folder))
    set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)


@dataclass
class SequenceSoFar:
    """What is known of the sequence before the next task, found without changing anything."""

    source: str  # "memory" (this trainer), "checkpoint" (output_dir), "adapter" (downloaded + result), "fresh"
    tasks: list[ContinualTask] = field(default_factory=list)  # the learned tasks, in order
    eval_datasets: list[Any] = field(default_factory=list)  # their eval data (classification: global labels)
    class_ranges: list[ClassRange] = field(default_factory=list)
    result: Optional[ContinualResult] = None
    checkpoint: Optional[Path] = None  # to load into the model
    head_size: int = 0  # the checkpoint's head rows (train_continual grows the head to the whole sequence at once)
    origin: Any = None  # (folder or Hub repo id, revision) a downloaded adapter's result came from, if known


def resolve_sequence(*, memory: Optional["SequenceSoFar"], learned: int, output_dir: PathLike,
                     previous_tasks: Optional[Sequence[ContinualTask]], previous_result: Any, resume: bool,
                     classification: bool, prefix_of_sequence: bool = False) -> "SequenceSoFar":
    """The sequence learned so far, found and checked without changing anything, from (in this order) a trainer's
    ``memory``, a downloaded adapter that ``learned`` tasks plus its ``previous_result``, the last checkpoint of
    ``output_dir`` (with ``resume``), or nothing. ``previous_tasks`` are the learned tasks with their eval data
    (``prefix_of_sequence``: they may go on with tasks still to learn)."""
    given = list(previous_tasks) if previous_tasks is not None else None
    if memory is not None:
        names = [t.name for t in memory.tasks]
        if previous_result is not None:
            raise ValueError(f"This trainer already learned {names}: drop previous_result.")
        if given is not None and [t.name for t in given[: len(names)]] != names:
            raise ValueError(f"This trainer learned {names}; the tasks given must start with those tasks, in that "
                             f"order (got {[t.name for t in given]}).")
        return memory
    checkpoint = latest_checkpoint(output_dir) if resume else None
    stored_ranges, head_size = None, 0
    if previous_result is not None:
        if learned == 0:
            raise ValueError("previous_result was given, but the adapter has not learned any task yet: load the "
                             "adapter that goes with it (PeftModel.from_pretrained), or drop previous_result.")
        result = previous_result if isinstance(previous_result, ContinualResult) else \
            ContinualResult.from_pretrained(previous_result)
        if result.num_learned != learned:
            raise ValueError(f"previous_result holds {result.num_learned} learned task(s) but the adapter has "
                             f"learned {learned}: pass the result saved together with this adapter.")
        source, checkpoint = "adapter", None
    elif checkpoint is not None:
        progress = read_progress(checkpoint)
        if learned not in (0, progress["tasks_done"]):
            raise ValueError(
                f"The adapter has learned {learned} task(s) but the checkpoint {checkpoint} of output_dir holds "
                f"{progress['tasks_done']}: pass previous_result= to continue the adapter's own sequence, or "
                "resume_from_checkpoint=False (or another output_dir) to leave that checkpoint alone.")
        result = ContinualResult.from_json(checkpoint / RESULT_FILE)
        stored_ranges, source = progress.get("class_ranges"), "checkpoint"
        head_size = progress.get("num_labels") or 0
    elif learned > 0:
        raise ValueError(
            f"The adapter has already learned {learned} task(s). To continue its sequence pass "
            "previous_result=ContinualResult.from_pretrained(<the adapter's folder or Hub repo id>) and the "
            "learned tasks (train_continual: the whole sequence, learned tasks first; train_task: "
            "previous_tasks=[...]); to start a new sequence, start from a fresh adapter (get_peft_model).")
    else:
        return SequenceSoFar("fresh")
    done = result.num_learned
    names = list(result.task_names[:done])
    where = checkpoint if checkpoint is not None else "the adapter's result"
    if given is None:
        raise ValueError(
            f"The sequence so far ({where}) learned {names}. Its tasks' eval data are needed to evaluate them after "
            "the new task: pass previous_tasks=[ContinualTask(name, None, eval_dataset, label_names), ...] for "
            f"{names}, in that order (or train_continual(tasks) with the whole sequence).")
    if [t.name for t in given[:done]] != names or (not prefix_of_sequence and len(given) != done):
        if source == "checkpoint":
            raise ValueError(f"The checkpoint in {checkpoint} learned tasks {names}, which is not the start of "
                             f"the given sequence {[t.name for t in given]}: resume with the same tasks in the "
                             "same order.")
        raise ValueError(f"The adapter learned {names}; `tasks` must start with those tasks, in that order, "
                         f"and add at least one new task (got {[t.name for t in given]}).")
    tasks = given[:done]
    for task in tasks:
        if task.eval_dataset is None:
            raise ValueError(f"Learned task '{task.name}' has no eval_dataset: every task is evaluated after "
                             "every later task.")
    ranges: list[ClassRange] = []
    eval_datasets = [t.eval_dataset for t in tasks]
    if classification:
        stored_ranges = stored_ranges or result.extra.get("class_ranges")
        ranges = [tuple(r) for r in stored_ranges] if stored_ranges else \
            class_ranges([num_task_classes(t) for t in tasks])
        if len(ranges) != done:
            raise ValueError(f"The saved class ranges {ranges} do not cover the {done} learned tasks.")
        eval_datasets = [to_global_labels(t.eval_dataset, r, t.name) for t, r in zip(tasks, ranges)]
    origin = (previous_result, None) if isinstance(previous_result, (str, os.PathLike)) else \
        getattr(previous_result, "source", None)  # (folder or repo id, revision) of ContinualResult.from_pretrained
    return SequenceSoFar(source, tasks, eval_datasets, ranges, result, checkpoint, head_size, origin)
