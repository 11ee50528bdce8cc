"""The per-input-group steps of :meth:`InfLoRAModel.begin_task` and :meth:`InfLoRAModel.end_task`.

Each computes new tensors only; the model installs them once every group is done, so that a failure leaves the
adapter as it was. Both read a group's memory from its first layer (the group's layers share one).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import SubspaceExhaustedError, SubspaceWarning
from .layer import InfLoRALayer
from .statistics import InputGroup
from .subspace import (
    Memory,
    captured_energy_ratio,
    design_eigen,
    design_random,
    energy_threshold,
    memory_capacity,
    update_memory,
)


def design_groups(groups: Sequence[InputGroup], layers: Mapping[str, InfLoRALayer], name: str, config: Any,
                  done: int) -> dict[str, torch.Tensor]:
    """The design ``B_t`` [r_t, d_in] of task ``done + 1`` for every layer: one per input group, from the group's
    covariance ``C_t`` and memory (``config.design``: eigen or random), cut to each layer's rank.

    Raises :class:`~peft_inflora.errors.SubspaceExhaustedError` when some group has no free direction left; warns
    (:class:`~peft_inflora.errors.SubspaceWarning`) when some group gets fewer than ``r`` rows.
    """
    designs: dict[str, torch.Tensor] = {}
    exhausted, short = [], []
    for index, group in enumerate(groups):
        leader = layers[group.leader]
        r_max = max(layers[n].r[name] for n in group.names)
        memory = leader.get_memory(name)
        if config.design == "eigen":
            design = design_eigen(group.accumulator.covariance(), memory, r_max, scale=config.design_scale,
                                  solver=config.solver)
        else:
            generator = torch.Generator().manual_seed(config.random_seed + 1_000_003 * done + index)
            design = design_random(memory, r_max, scale=config.design_scale, generator=generator)
        if design.shape[0] == 0:
            exhausted.append((group.leader, memory))
        elif design.shape[0] < r_max:
            short.append((group.leader, design.shape[0], r_max, memory))
        for n in group.names:
            designs[n] = design[: layers[n].r[name]]
    if exhausted:
        lead, memory = exhausted[0]
        raise SubspaceExhaustedError(
            f"No free direction is left for task {done + 1} in {len(exhausted)} layer group(s), e.g. '{lead}': "
            f"the memory spans {memory.dimension} of its {memory.d_in} input dimensions. Lower "
            f"`energy_threshold` (now {config.energy_threshold}) so the memory keeps fewer directions, or "
            "continue with a new adapter. Nothing was changed."
        )
    if short:
        lead, got, want, memory = short[0]
        warnings.warn(
            f"Only {got} of r={want} directions are free for task {done + 1} in {len(short)} layer group(s), "
            f"e.g. '{lead}' (memory {memory.dimension} of {memory.d_in} dims): the task's branch gets rank {got} "
            "there. Lower `energy_threshold` to leave more room for later tasks.",
            SubspaceWarning,
            stacklevel=3,  # the caller of begin_task
        )
    return designs


def update_group_memories(groups: Sequence[InputGroup], layers: Mapping[str, InfLoRALayer], name: str, config: Any,
                          done: int) -> tuple[dict[str, Memory], dict[str, float]]:
    """The memory of every layer after task ``done + 1`` (GPM / DualGPM at the energy threshold ``eps_t`` of the
    schedule, capped by :func:`~peft_inflora.subspace.memory_capacity` under ``adaptive_threshold``), and the
    threshold each layer's update really used (the captured energy where the cap bit)."""
    threshold = energy_threshold(config.energy_threshold, done, config.total_tasks)
    tasks_left = config.total_tasks - done - 1 if config.adaptive_threshold else None
    memories: dict[str, Memory] = {}
    used: dict[str, float] = {}
    for group in groups:
        memory = layers[group.leader].get_memory(name)
        covariance = group.accumulator.covariance()
        cap = None
        if tasks_left is not None:
            cap = memory_capacity(memory.d_in, max(layers[n].r[name] for n in group.names), tasks_left)
        new_memory = update_memory(memory, covariance, threshold, kind=config.memory, energy=config.energy,
                                   solver=config.solver, max_dimension=cap)
        group_threshold = threshold
        if cap is not None and new_memory.dimension >= cap:  # capped: the energy the memory really keeps
            group_threshold = min(threshold, captured_energy_ratio(new_memory, covariance, config.energy))
        for n in group.names:
            memories[n], used[n] = new_memory, group_threshold
    return memories, used
