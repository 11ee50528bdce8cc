"""Callbacks of the multi-process workers that end a run as a kill would (``os._exit``, no clean-up, after a barrier
so that every process ends at the same point), and one that records where each task's training started."""

from __future__ import annotations

import os

import torch

from peft_inflora import ContinualCallback


def _exit_together() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    os._exit(0)


class StopAfter(ContinualCallback):
    """Ends the process right after the checkpoint of task ``k`` (1-based)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_task_end(self, args, state, control, task, task_index, result=None, **kwargs):
        if task_index + 1 == self.k:
            _exit_together()


class StopAtStep(ContinualCallback):
    """Ends the process after optimizer step ``step`` of task ``k`` (1-based)."""

    def __init__(self, k: int, step: int) -> None:
        self.k, self.step, self.task = k, step, 0

    def on_task_begin(self, args, state, control, task, task_index, **kwargs):
        self.task = task_index + 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.task == self.k and state.global_step == self.step:
            _exit_together()


class FirstSteps(ContinualCallback):
    """The global step of each ``train()``'s first optimizer step (a task resumed inside starts after 1)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.seen = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.seen:
            self.steps.append(state.global_step)
        self.seen = True
