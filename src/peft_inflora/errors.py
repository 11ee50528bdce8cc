"""Every exception and warning class of the InfLoRA method, defined once.

The modules that raise them import them from here; each name also stays importable from the module that raised it
first (``peft_inflora.model.TaskLifecycleError``, ``peft_inflora.layer.NoTaskInProgressError``, ...), and all are
exported from ``peft_inflora``. This module imports nothing, so any part of the method can use it.
"""

from __future__ import annotations


__all__ = [
    "AdapterFileError",
    "DistributedStepError",
    "NoTaskInProgressError",
    "QuantizedMergeWarning",
    "ShardedAdapterError",
    "SketchWarning",
    "StatisticsError",
    "SubspaceExhaustedError",
    "SubspaceWarning",
    "TaskLifecycleError",
    "UnknownConfigFieldError",
]


# ---------------------------------------------------------------------------------------------- lifecycle
class TaskLifecycleError(RuntimeError):
    """begin_task / end_task / abort_task called out of order."""


class NoTaskInProgressError(RuntimeError):
    """Raised when an InfLoRA layer is trained while no task has been begun."""


class SubspaceExhaustedError(ValueError):
    """The memory of some layer spans its whole input space: a new task has no free direction to learn in."""


class SubspaceWarning(UserWarning):
    """Fewer free directions than the configured rank remain in some layer."""


# ---------------------------------------------------------------------------------------------- statistics
class StatisticsError(ValueError):
    """The statistics pass could not produce a covariance (no batches, no tokens, bad batches, non-finite values)."""


class SketchWarning(UserWarning):
    """The statistics sketch is too small for what it is used for (e.g. the energy threshold cannot be reached)."""


# ---------------------------------------------------------------------------------------------- config and files
class UnknownConfigFieldError(TypeError, ValueError):
    """The config has fields this version of peft-inflora does not know (a typo, or saved by a newer release).

    A ``TypeError`` like the dataclass's own error for an unexpected keyword, and a ``ValueError`` like the other
    invalid-config errors.
    """


class AdapterFileError(ValueError):
    """A saved adapter's weights file is missing, truncated, corrupted, or in the (unsafe) pickle format."""


# ---------------------------------------------------------------------------------------------- quantized layers
class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized base weight rounded the merged weight (the relative error is in the message)."""


# ---------------------------------------------------------------------------------------------- distributed
class ShardedAdapterError(RuntimeError):
    """InfLoRA's own parameters are sharded (FSDP2 ``fully_shard`` took them in): the lifecycle cannot run."""


class DistributedStepError(RuntimeError):
    """Another process failed in a collective step (``begin_task``, ``end_task``, ``save_adapter``, a statistics
    pass): raised on every process that did not fail, naming the step and the failing rank(s) with their errors, so
    that no process waits for the failed one. The failing process raises its own error; nothing was changed on any
    process.

    Attributes:
        step: the step that failed (e.g. ``"end_task: memory update"``).
        failed_ranks: the ranks that failed, ascending.
        errors: ``{rank: "ErrorType: message"}`` of the failing ranks.
    """

    def __init__(self, message: str, step: str = "", failed_ranks: tuple = (), errors: dict | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.failed_ranks = tuple(failed_ranks)
        self.errors = dict(errors or {})
