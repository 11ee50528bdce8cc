"""The files of a continual run in ``output_dir``: atomic per-task checkpoints, the result with its plots, resume.

Layout (every name defined here once)::

    output_dir/
      continual_result.json, accuracy_matrix.png, accuracy_curve.png   the run so far
      continual/after-task-NN/                                         the state after task NN (1-based)
        adapter_config.json, adapter_model.safetensors                 the adapter with its memory
        continual_result.json, progress.json, training_args.json       the result, the task list, the options
        hub_revision.json                                              once pushed to its Hub branch
      continual/task-NN-<name>/checkpoint-*/                           the Trainer's own checkpoints of task NN

A checkpoint is written into ``.after-task-NN.tmp`` and renamed, so a crash never leaves one that loads wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict

from .result import RESULT_FILE, ContinualResult

CONTINUAL_DIR = "continual"
PROGRESS_FILE = "progress.json"
ARGUMENTS_FILE = "training_args.json"
TASK_REVISION_RECORD = "hub_revision.json"  # written into a checkpoint once that state is on its Hub branch
PLOT_FILES = ("accuracy_matrix.png", "accuracy_curve.png")

PathLike = Union[str, os.PathLike]

__all__ = ["CONTINUAL_DIR", "PROGRESS_FILE", "TASK_REVISION_RECORD", "checkpoint_dir", "latest_checkpoint",
           "load_adapter_state", "read_progress", "save_after_task", "task_run_dir", "write_result"]


def checkpoint_dir(output_dir: PathLike, task_number: int) -> Path:
    """``output_dir/continual/after-task-NN``: the state after task ``task_number`` (1-based)."""
    return Path(output_dir) / CONTINUAL_DIR / f"after-task-{task_number:02d}"


def task_run_dir(output_dir: PathLike, task_number: int, task_name: str) -> Path:
    """``output_dir/continual/task-NN-<name>``: where the Trainer's own checkpoints of that task go."""
    return Path(output_dir) / CONTINUAL_DIR / f"task-{task_number:02d}-{task_name}"


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
                    class_ranges: Optional[list[tuple[int, int]]], arguments_json: str) -> Path:
    """Atomically save the state after the ``result.num_learned``-th task (adapter with memory, result, progress,
    options), then the result and plots of the run into ``output_dir``; returns the checkpoint folder."""
    done = result.num_learned
    final = checkpoint_dir(output_dir, done)
    tmp = final.parent / f".{final.name}.tmp"
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    result.to_json(tmp / RESULT_FILE)
    progress = {"tasks_done": done, "task_names": list(task_names[:done]),
                "class_ranges": [list(r) for r in class_ranges[:done]] if class_ranges is not None else None,
                "num_labels": getattr(model.config, "num_labels", None) if class_ranges is not None else None}
    (tmp / PROGRESS_FILE).write_text(json.dumps(progress), encoding="utf-8")
    (tmp / ARGUMENTS_FILE).write_text(arguments_json, encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_result(result, output_dir)
    return final


def load_adapter_state(model: PeftModel, folder: PathLike) -> None:
    """Load a checkpoint's adapter (weights, memory and finished tasks) into the active adapter of ``model``."""
    weights = load_peft_weights(str(folder))
    set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
