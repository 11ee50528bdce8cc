"""Classifier alignment from class statistics.

Class-incremental learning with per-task losses leaves the head biased: each task's rows are trained only against
each other, so new classes lose to confident old ones. The authors' remedy (InfLoRA repository,
``methods/inflora_ca.py``, after SLCA) stores, after every task, the mean and covariance of each class's head
input (:mod:`.class_statistics`) and re-trains the whole head on Gaussian samples of every class seen so far:
:func:`align_classifier`, pure torch. The statistics' names are importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .class_statistics import (
    STORAGES,
    ClassFeatureAccumulator,
    ClassStatistics,
    HeadInputRecorder,
    collect_class_statistics,
    storage_bytes,
)


__all__: Sequence[str] = ["ClassFeatureAccumulator", "ClassStatistics", "HeadInputRecorder", "STORAGES",
                          "align_classifier", "collect_class_statistics", "storage_bytes", "task_normalized_logits"]


def task_normalized_logits(logits: torch.Tensor, task_of_column: torch.Tensor, temperature: float) -> torch.Tensor:
    """The authors' logit normalisation: ``logits / (mean_k ||logits[:, task k]||_2 + 1e-7) / temperature``,
    the mean over the tasks ``k`` present in ``task_of_column`` (``[C]``, task index of each logit column)."""
    norms = torch.stack([logits[:, task_of_column == k].norm(dim=-1) + 1e-7 for k in torch.unique(task_of_column)],
                        dim=-1)
    return logits / norms.mean(-1, keepdim=True) / temperature


def align_classifier(head: nn.Module, statistics: ClassStatistics, *, epochs: int = 5,
                     samples_per_class: int = 256, lr: float = 0.01, momentum: float = 0.9,
                     weight_decay: float = 5e-4, mean_decay: bool = True, logit_temperature: Optional[float] = 0.1,
                     shrinkage: float = 0.0, ridge: float = 1e-4, seed: int = 0,
                     trainable_tasks: Optional[Sequence[int]] = None) -> list[float]:
    """Re-train the rows of ``head`` (an ``nn.Linear``) of every class in ``statistics`` on Gaussian samples of
    those classes: the authors' classifier alignment. Other rows are untouched; with ``trainable_tasks`` only the
    rows of those tasks' classes train (the others still compete in the loss, unchanged).

    Per epoch ``e < epochs``: draw ``samples_per_class`` features of each class ``c``
    (:meth:`ClassStatistics.sample`, mean scaled by ``0.9 + 0.1 (t_c + 1) / (t + 1)`` when ``mean_decay``, ``t_c``
    the class's task and ``t`` the last task), shuffle, and take ``C`` SGD steps of ``samples_per_class`` samples
    (lr ``lr * (1 + cos(pi e / epochs)) / 2``, momentum, weight decay) on the cross-entropy of the logits of the
    stored classes, normalised by :func:`task_normalized_logits` unless ``logit_temperature`` is None.

    Returns the mean loss of each epoch. Raises ``ValueError`` before changing anything if the head is not an
    ``nn.Linear``, the statistics are empty, their ``d`` is not the head's ``in_features`` or a class id has no row.
    """
    if not isinstance(head, nn.Linear):
        raise ValueError(f"Classifier alignment re-trains an nn.Linear head, got {type(head).__name__}: pass the "
                         "Linear that produces the class logits (e.g. model.classifier).")
    if len(statistics) == 0:
        raise ValueError("No class statistics yet: collect them (ClassStatistics.add_task) after a task first.")
    if statistics.dim != head.in_features:
        raise ValueError(f"The statistics have d={statistics.dim} but the head reads in_features="
                         f"{head.in_features}: collect them from the input of this head.")
    rows = statistics.classes
    if int(rows.max()) >= head.out_features or int(rows.min()) < 0:
        raise ValueError(f"Class ids {rows.tolist()} do not all have a row in a head of {head.out_features} outputs.")
    if epochs < 1 or samples_per_class < 1 or lr <= 0:
        raise ValueError("epochs and samples_per_class must be >= 1 and lr > 0.")
    if logit_temperature is not None and logit_temperature <= 0:
        raise ValueError(f"logit_temperature must be > 0 or None (off), got {logit_temperature}.")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}.")
    trains = torch.ones(len(rows), dtype=torch.bool)
    if trainable_tasks is not None:
        trains = torch.isin(statistics.tasks, torch.as_tensor(list(trainable_tasks), dtype=torch.long))
        if not trains.any():
            raise ValueError(f"trainable_tasks={list(trainable_tasks)} holds none of the stored tasks "
                             f"{sorted(set(statistics.tasks.tolist()))}.")
    generator = torch.Generator().manual_seed(seed)
    device, dtype = head.weight.device, head.weight.dtype
    trained, fixed = rows[trains], rows[~trains]
    columns = torch.argsort(torch.cat([torch.nonzero(trains)[:, 0], torch.nonzero(~trains)[:, 0]])).to(device)
    weight = nn.Parameter(head.weight.detach()[trained].clone())
    bias = nn.Parameter(head.bias.detach()[trained].clone()) if head.bias is not None else None
    fixed_weight = head.weight.detach()[fixed].clone()
    fixed_bias = head.bias.detach()[fixed].clone() if head.bias is not None else None
    params = [weight] + ([bias] if bias is not None else [])
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    last_task = int(statistics.tasks.max())
    task_of_column = statistics.tasks.to(device)
    n_classes, losses = len(rows), []
    for _ in range(epochs):
        samples, labels = [], []
        for i in range(n_classes):
            scale = 0.9 + 0.1 * (int(statistics.tasks[i]) + 1) / (last_task + 1) if mean_decay else 1.0
            samples.append(statistics.sample(i, samples_per_class, generator, scale, shrinkage, ridge))
            labels.append(torch.full((samples_per_class,), i, dtype=torch.long))
        x, y = torch.cat(samples).to(device, dtype), torch.cat(labels).to(device)
        order = torch.randperm(x.shape[0], generator=generator).to(device)
        x, y = x[order], y[order]
        total = 0.0
        for step in range(n_classes):
            xb, yb = x[step * samples_per_class:(step + 1) * samples_per_class], y[step * samples_per_class:
                                                                                   (step + 1) * samples_per_class]
            logits = nn.functional.linear(xb, weight, bias)
            if len(fixed):  # stored-class order: trained columns first, then fixed ones, put back in place
                logits = torch.cat([logits, nn.functional.linear(xb, fixed_weight, fixed_bias)], 1)[:, columns]
            if logit_temperature is not None:
                logits = task_normalized_logits(logits, task_of_column, logit_temperature)
            loss = nn.functional.cross_entropy(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        scheduler.step()
        losses.append(total / n_classes)
    if not all(math.isfinite(v) for v in losses):
        raise ValueError(f"Alignment diverged (losses {losses}); the head was not changed: lower lr.")
    with torch.no_grad():
        head.weight[trained.to(device)] = weight.detach()
        if bias is not None:
            head.bias[trained.to(device)] = bias.detach()
    return losses
