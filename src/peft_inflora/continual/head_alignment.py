"""Classifier alignment inside the continual trainer: class statistics per task, the alignment after it, and their
file next to the adapter.

The math is :mod:`.alignment`; this module is the run's side of it, for ``setting="class_incremental"``:

* while task ``t`` trains (``class_statistics_source="last_epoch"``, the default) a forward pre-hook on the head
  (:class:`~.alignment.HeadInputRecorder`) adds the head's inputs of the last training epoch's forwards, with their
  labels, to a float64 :class:`~.alignment.ClassFeatureAccumulator`: no extra pass over the data
  (``"extra_pass"``: one eval-mode pass after training instead);
* after training (after ``end_task``, before the evaluation) the moments are summed over processes, stored as
  :class:`~.alignment.ClassStatistics` (``class_statistics_storage``) under task index ``t``, and from the second
  task on the head is aligned (:func:`~.alignment.align_classifier`): ``"new_rows"`` re-trains only task ``t``'s
  rows against Gaussian samples of every class seen so far, ``"authors"`` every row;
* the statistics are saved as :data:`CLASS_STATISTICS_FILE` next to ``adapter_model.safetensors`` wherever the
  trainer writes an adapter, and read back when a sequence continues from ``output_dir``, a saved folder or a Hub
  repository, so that the old classes are still sampled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import agree
from .alignment import (
    ClassFeatureAccumulator,
    ClassStatistics,
    HeadInputRecorder,
    align_classifier,
    collect_class_statistics,
)
from .zero3 import gathered


CLASS_STATISTICS_FILE = "class_statistics.safetensors"

__all__ = ["CLASS_STATISTICS_FILE", "HeadAlignment", "load_class_statistics", "save_class_statistics"]


def save_class_statistics(statistics: ClassStatistics, folder: Union[str, os.PathLike]) -> Path:
    """Write ``statistics`` to ``folder/class_statistics.safetensors`` (its tensors; the storage kind in the
    metadata); returns the path."""
    path = Path(folder) / CLASS_STATISTICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "storage": statistics.storage, "rank": json.dumps(statistics.rank)}
    save_file(statistics.state_dict(), str(path), metadata=meta)
    return path


def load_class_statistics(source: Union[str, os.PathLike], revision: Optional[str] = None,
                          token: Optional[str] = None) -> Optional[ClassStatistics]:
    """The class statistics saved in a local folder or a Hub repository (``source``, at ``revision``), or ``None``
    where it has none."""
    folder = Path(source)
    if folder.is_dir():
        path = folder / CLASS_STATISTICS_FILE
        return ClassStatistics.from_state_dict(load_file(str(path))) if path.is_file() else None
    if folder.exists():  # a file: not a saved adapter folder
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = hf_hub_download(str(source), CLASS_STATISTICS_FILE, revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    return ClassStatistics.from_state_dict(load_file(path))


class HeadAlignment:
    """The class statistics of one run and the alignment after each task (owned by the continual trainer).

    Args:
        args: the run's ``ContinualArguments`` (``classifier_alignment``, ``alignment_*``, ``class_statistics_*``).
    """

    def __init__(self, args: Any) -> None:
        self.args = args
        self.mode: Optional[str] = args.alignment_mode()
        self.statistics: Optional[ClassStatistics] = None
        self.accumulator: Optional[ClassFeatureAccumulator] = None
        self.recorder: Optional[HeadInputRecorder] = None
        self.partial_last_epoch: Optional[bool] = False  # a resumed task whose last epoch is partly behind it
        self.last_losses: list[float] = []

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    def check_head(self, head: nn.Module) -> None:
        """Refuse a head alignment cannot read or re-train (before anything changes)."""
        if self.enabled and not isinstance(head, nn.Linear):
            raise ValueError(f"classifier_alignment={self.mode!r} re-trains an nn.Linear head in modules_to_save; "
                             f"this head is a {type(head).__name__}: set classifier_alignment='none'.")

    def check_continuation(self, statistics: Optional[ClassStatistics], class_ranges: list[tuple[int, int]],
                           where: str) -> None:
        """Refuse (before anything changes) to continue a sequence of ``class_ranges`` whose classes have no
        stored statistics: the old classes could not be sampled."""
        if not self.enabled or not class_ranges:
            return
        have = set(statistics.classes.tolist()) if statistics is not None else set()
        missing = [c for lo, hi in class_ranges for c in range(lo, hi) if c not in have]
        if missing:
            raise ValueError(
                f"classifier_alignment={self.mode!r} samples every class seen so far, but {where} holds no class "
                f"statistics ({CLASS_STATISTICS_FILE}) for classes {missing}: continue from the folder or Hub "
                "repository the adapter was saved to with them (trainer.load_class_statistics(...)), or set "
                "classifier_alignment='none'.")

    # ------------------------------------------------------------------ one task
    def begin_task(self, head: nn.Linear, resumed: bool = False) -> None:
        """Start the moments of the task about to train; with ``last_epoch``, hook the head. A task ``resumed`` from
        a mid-task checkpoint records only when its whole last epoch is still ahead; otherwise ``end_task`` reads its
        batches once more instead, as with ``extra_pass``."""
        if not self.enabled:
            return
        self.check_head(head)
        self.accumulator = ClassFeatureAccumulator(head.in_features)
        self.partial_last_epoch = None if resumed else False  # decided at a resumed task's first training forward
        if self.args.class_statistics_source == "last_epoch":
            self.recorder = HeadInputRecorder(head, self.accumulator).__enter__()

    def record(self, labels: torch.Tensor, state: Any, training: bool) -> None:
        """Before a training forward: record it if it belongs to the last training epoch (``state`` the
        ``TrainerState``; epoch ``e`` runs while ``e <= state.epoch < e + 1``)."""
        if self.recorder is None:
            return
        epochs = getattr(state, "num_train_epochs", 0) or 0
        epoch = getattr(state, "epoch", None)
        last = training and epoch is not None and epochs > 0 and epoch >= epochs - 1
        if self.partial_last_epoch is None and training and epoch is not None:  # resumed inside the last epoch?
            self.partial_last_epoch = epochs > 0 and epoch > epochs - 1
        self.recorder.set_labels(labels if last and not self.partial_last_epoch else None)

    def stop_recording(self) -> None:
        if self.recorder is not None:
            self.recorder.__exit__(None, None, None)
        self.recorder = None

    def abort_task(self) -> None:
        self.stop_recording()
        self.accumulator = None

    def end_task(self, model: nn.Module, head: nn.Linear, task_index: int, classes: tuple[int, int],
                 extra_pass_batches: Any = None) -> None:
        """Store the finished task's class statistics and align ``head`` (from the second task on). With
        ``extra_pass`` (or when the last epoch recorded nothing, e.g. an iterable dataset), ``extra_pass_batches``
        (the task's training batches) are read once more in eval mode.

        Compute, agree, commit: the moments are summed over processes (a collective); then each process computes
        the extended statistics and the aligned rows on a copy of the head, a local step that ends in
        ``peft_inflora.distributed.agree``; only then are both installed. When the step fails on one process, every
        process raises and the head and the statistics are as they were on all of them."""
        if not self.enabled:
            return
        self.stop_recording()
        accumulator, self.accumulator = self.accumulator, None
        if not accumulator.counts and extra_pass_batches is not None:
            collect_class_statistics(model, head, extra_pass_batches, accumulator)
        accumulator.ensure_classes(range(*classes))
        accumulator.all_reduce()
        # the authors align from the second task on: one task's rows have nothing to be aligned with
        aligns = self.statistics is not None and len(self.statistics) > 0
        params = [head.weight, head.bias] if aligns else []
        with gathered(params, modify=True):  # ZeRO-3: read and rewrite the whole head
            with agree(f"classifier alignment after task {task_index + 1}"):
                statistics = self.statistics if self.statistics is not None else ClassStatistics(
                    head.in_features, self.args.class_statistics_storage,
                    rank=self.args.class_statistics_rank if self.args.class_statistics_storage == "lowrank" else None)
                statistics = statistics.with_task(accumulator, task_index)
                aligned = _detached_copy(head) if aligns else None
                losses = self._align(aligned, statistics, task_index) if aligned is not None else []
            self.statistics = statistics
            if aligned is not None:
                with torch.no_grad():
                    head.weight.copy_(aligned.weight)
                    if head.bias is not None:
                        head.bias.copy_(aligned.bias)
                self.last_losses = losses

    def _align(self, head: nn.Linear, statistics: ClassStatistics, task_index: int) -> list[float]:
        return align_classifier(
            head, statistics, epochs=self.args.alignment_epochs,
            samples_per_class=self.args.alignment_samples_per_class, lr=self.args.alignment_lr,
            mean_decay=self.args.alignment_decay(), logit_temperature=self.args.alignment_logit_temperature,
            seed=1000 * int(self.args.seed) + task_index,
            trainable_tasks=[task_index] if self.mode == "new_rows" else None)

    def needs_extra_pass(self) -> bool:
        return self.enabled and self.args.class_statistics_source == "extra_pass"

    # ------------------------------------------------------------------ files
    def save(self, folder: Union[str, os.PathLike]) -> Optional[Path]:
        """Write the statistics next to the adapter in ``folder`` (nothing when there are none)."""
        if self.statistics is None or len(self.statistics) == 0:
            return None
        return save_class_statistics(self.statistics, folder)


def _detached_copy(linear: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` holding ``linear``'s current values (the alignment trains it; the caller installs them)."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy
