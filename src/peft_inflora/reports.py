"""What the memory leaves free and what the task in progress can disturb: :meth:`InfLoRAModel.capacity_report` and
:meth:`InfLoRAModel.interference_report` (see there for the bound and how to read it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .layer import InfLoRALayer
from .statistics import InputGroup


@dataclass
class LayerCapacity:
    """One adapted layer's memory after the tasks done so far.

    ``free_dimension = d_in - memory_dimension`` directions are left for the ``B_t`` of later tasks; the next task
    gets its full ``rank`` only while ``free_dimension >= rank`` (:attr:`can_host_next_task`).
    ``energy_thresholds`` holds the threshold each finished task's memory update used (below the configured
    schedule where ``adaptive_threshold`` capped the memory to keep room for the remaining tasks)."""

    layers: list[str]
    d_in: int
    memory_dimension: int
    free_dimension: int
    memory_form: str
    rank: int = 0
    tasks_done: int = 0
    energy_thresholds: list[float] = field(default_factory=list)

    @property
    def energy_threshold(self) -> Optional[float]:
        """The threshold of the last finished task (``None`` before the first)."""
        return self.energy_thresholds[-1] if self.energy_thresholds else None

    @property
    def can_host_next_task(self) -> bool:
        return self.free_dimension >= self.rank

    @property
    def tasks_at_full_rank(self) -> int:
        """How many more tasks find ``rank`` free directions if each adds ``rank`` directions to the memory."""
        return self.free_dimension // self.rank if self.rank > 0 else 0


@dataclass
class LayerInterference:
    """How much the designed ``B_t`` of the task in progress reads the inputs of some (old) task, in one input group.

    ``X`` (``N x d_in``) holds the group's input vectors over the batches given to
    :meth:`InfLoRAModel.interference_report` (non-padding tokens, as the model produces them now).

    Attributes:
        layers: the adapted layers of the group (they read the same input).
        d_in: input dimension.
        rank: rows of ``B_t`` (the largest in the group).
        tokens: ``N``.
        input_norm: ``||X||_F``.
        design_norm: ``max over the group's layers of ||B_t||_2`` (spectral norm).
        leakage: ``max over the group's layers of ||X B_t^T||_F / (||B_t||_2 ||X||_F)``, in ``[0, 1]``: 0 when the
            inputs lie in the memory (orthogonal to every row of ``B_t``), 1 when they all lie along ``B_t``'s top
            right singular vector.
    """

    layers: list[str]
    d_in: int
    rank: int
    tokens: int
    input_norm: float
    design_norm: float
    leakage: float

    def bound(self, delta_a_norm: float) -> float:
        """Largest ``||X B_t^T (A' - A)^T||_F`` (the change of the layer's outputs on ``X``) for
        ``||A' - A||_2 = delta_a_norm``: ``leakage * delta_a_norm * design_norm * input_norm``."""
        return self.leakage * delta_a_norm * self.design_norm * self.input_norm


def capacity_report(layers: Mapping[str, InfLoRALayer], adapter_name: str) -> list[LayerCapacity]:
    """One :class:`LayerCapacity` per adapted layer: its memory after the tasks done so far."""
    report = []
    for n, layer in layers.items():
        memory = layer.get_memory(adapter_name)
        report.append(LayerCapacity([n], memory.d_in, memory.dimension, memory.free_dimension, memory.form,
                                    rank=layer.r[adapter_name], tasks_done=layer.tasks_done(adapter_name),
                                    energy_thresholds=layer.energy_thresholds(adapter_name)))
    return report


def interference_report(groups: Sequence[InputGroup], layers: Mapping[str, InfLoRALayer],
                        adapter_name: str) -> list[LayerInterference]:
    """One :class:`LayerInterference` per input group, from the exact statistics ``X^T X`` of ``groups`` and the
    designed ``B_t`` [r_t, d_in] of each of the group's layers: ``leakage = max ||X B_t^T||_F / (||B_t||_2 ||X||_F)``
    over the group's layers."""
    name = adapter_name
    report = []
    for group in groups:
        S = group.accumulator.sum.to(torch.float64)  # X^T X
        input_sq = float(torch.diagonal(S).sum().clamp_min(0.0))
        leakage, design_norm, rank = 0.0, 0.0, 0
        for n in group.names:
            B = layers[n].inflora_B[name].detach().to(device=S.device, dtype=torch.float64)
            if B.shape[0] == 0:
                continue
            spectral = float(torch.linalg.matrix_norm(B, ord=2))
            read = float(((B @ S) * B).sum().clamp_min(0.0))  # trace(B X^T X B^T) = ||X B^T||_F^2
            if spectral > 0 and input_sq > 0:
                leakage = max(leakage, (read / input_sq) ** 0.5 / spectral)
            design_norm, rank = max(design_norm, spectral), max(rank, B.shape[0])
        report.append(LayerInterference(list(group.names), int(S.shape[0]), rank,
                                        int(group.accumulator.count.item()), input_sq ** 0.5, design_norm,
                                        leakage))
    return report
