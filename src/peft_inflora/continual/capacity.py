"""After each task: the memory's fill per adapted layer, and a warning when later tasks will run short of room.

Projection per layer: the memory grew by ``g = memory_dimension / tasks_done`` directions per task so far; the next
task gets rank ``r`` while ``free >= r``, so about ``1 + (free - r) // g`` more tasks get their full rank (all of them
when ``g = 0``). With ``adaptive_threshold`` the memory's growth is capped so that ``free >= r * tasks_left`` after
every task: ``free // r`` tasks fit.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from .. import SubspaceWarning


__all__ = ["capacity_record", "capacity_warning", "report_capacity"]


def capacity_record(report: list[Any]) -> tuple[dict[str, list], dict[str, float]]:
    """``({first layer: [memory_dimension, free_dimension, energy_threshold]}, logs)`` of a ``capacity_report()``."""
    record = {c.layers[0]: [c.memory_dimension, c.free_dimension, c.energy_threshold] for c in report}
    logs = {"continual/min_free_dimension": min(c.free_dimension for c in report),
            "continual/max_memory_fraction": max(c.memory_dimension / c.d_in for c in report)}
    return record, logs


def capacity_warning(report: list[Any], config: Any, task_number: int, task_name: str,
                     remaining: Optional[int]) -> Optional[str]:
    """The warning text when some layer will not have ``r`` free directions for each of the ``remaining`` tasks
    (``None`` when all fit, or when the number of remaining tasks is unknown)."""
    if not remaining or remaining <= 0:
        return None
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
        return None
    fits, c, growth = min(short, key=lambda item: item[0])
    advice = ("lower `energy_threshold`" if config.adaptive_threshold else
              "set `adaptive_threshold=True` (with `total_tasks`) or lower `energy_threshold`")
    now = (f"it has only {c.free_dimension} free directions, fewer than r={c.rank}: the next task gets rank "
           f"{c.free_dimension} there" if fits == 0 else
           f"its memory grew by {growth:.1f} directions per task, so only about {fits} of the {remaining} "
           f"remaining tasks will find r={c.rank} free directions")
    return (f"InfLoRA capacity after task {task_number} ('{task_name}'): in {len(short)} adapted layer(s), e.g. "
            f"'{c.layers[0]}' (memory {c.memory_dimension} of {c.d_in} dimensions, threshold "
            f"{c.energy_threshold:.4f}), {now}. To keep room for later tasks, {advice}.")


def report_capacity(model: Any, result: Any, task_number: int, task_name: str,
                    total_tasks: Optional[int]) -> dict[str, float]:
    """After task ``task_number`` (1-based): append the capacity record to ``result.extra["capacity"]``, warn
    (:class:`SubspaceWarning`) when later tasks will run short of room, and return the values to log. The tasks
    left are ``total_tasks - task_number`` (default total: ``InfLoRAConfig.total_tasks``; unknown: no warning)."""
    report = model.capacity_report()
    record, logs = capacity_record(report)
    result.extra.setdefault("capacity", []).append(record)
    config = model.peft_config[model.active_adapter]
    total = total_tasks or getattr(config, "total_tasks", None)
    message = capacity_warning(report, config, task_number, task_name, total - task_number if total else None)
    if message:
        warnings.warn(message, SubspaceWarning, stacklevel=4)
    return logs
