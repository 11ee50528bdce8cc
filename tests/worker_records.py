"""What the multi-process trainer workers record, defined once: the adapter files each process writes, the run's
result (or its error), and the files the tests read (``result-rank{r}.json``, ``saves-rank{r}.json``,
``final-rank{r}.safetensors``)."""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Iterator
from typing import Any, Callable

import peft.peft_model
import torch
from safetensors.torch import save_file

from peft_inflora.continual.zero3 import gathered


@contextlib.contextmanager
def counted_adapter_writes() -> Iterator[list[str]]:
    """The names of the safetensors files PEFT's ``save_pretrained`` writes in this process inside the block."""
    writes: list[str] = []
    real_save_file = peft.peft_model.safe_save_file

    def counting_save_file(tensors, filename, *args, **kwargs):
        writes.append(os.path.basename(filename))
        return real_save_file(tensors, filename, *args, **kwargs)

    peft.peft_model.safe_save_file = counting_save_file
    try:
        yield writes
    finally:
        peft.peft_model.safe_save_file = real_save_file


def train_and_record(trainer: Any, tasks: list, model: Any) -> dict:
    """``trainer.train_continual(tasks)`` (``RESUME=1``: from ``output_dir``): the accuracy matrix, or the error with
    the adapter's continual state after it."""
    try:
        result = trainer.train_continual(tasks, resume_from_checkpoint=bool(os.environ.get("RESUME")))
        return {"accuracy_matrix": result.accuracy_matrix, "error": None}
    except Exception as err:  # recorded for the test
        traceback.print_exc()
        if not hasattr(model, "tasks_done"):  # a baseline without InfLoRA
            return {"error": f"{type(err).__name__}: {err}"}
        return {"error": f"{type(err).__name__}: {err}", "tasks_done": model.tasks_done(),
                "task_in_progress": model.task_in_progress()}


def write_records(out: str, record: dict, writes: list[str], model: Any, keep: Callable[[str], bool]) -> None:
    """This process's files in ``out``; the final tensors whose key ``keep`` accepts, gathered whole under ZeRO-3."""
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(out, f"saves-rank{rank}.json"), "w") as f:
        json.dump(writes, f)
    with gathered(model.parameters()):  # ZeRO-3: whole tensors (a no-op otherwise)
        state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if keep(k)}
    save_file(state, os.path.join(out, f"final-rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
