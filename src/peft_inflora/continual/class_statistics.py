"""Class statistics of the features a classifier head reads (pure torch, float64), for classifier alignment.

* :class:`ClassFeatureAccumulator`: running per-class count ``n_c``, sum ``s_c = sum x`` (``d``) and sum of outer
  products ``S_c = sum x x^T`` (``d x d``) of the current task's classes, fed by a forward pre-hook on the head
  (:class:`HeadInputRecorder`) inside a pass that already runs, by :func:`collect_class_statistics` (one eval-mode
  pass), or from tensors.
* :class:`ClassStatistics`: what is kept per class after a task: ``mean_c = s_c / n_c`` and the covariance
  ``Sigma_c = (S_c - n_c mean_c mean_c^T) / (n_c - 1)``, stored as ``"full"`` (``C x d x d``), ``"shared"``
  (one pooled within-class ``d x d`` covariance + ``C x d`` means) or ``"lowrank"`` (per class the top-``k``
  eigenpairs and the residual diagonal, so that the diagonal of ``Sigma_c`` is exact: ``C x d x (k + 2)``); it draws
  the Gaussian samples that :func:`~.alignment.align_classifier` trains on.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn


__all__: Sequence[str] = ["ClassFeatureAccumulator", "ClassStatistics", "HeadInputRecorder", "STORAGES",
                          "collect_class_statistics", "storage_bytes"]

STORAGES = ("full", "shared", "lowrank")


class ClassFeatureAccumulator:
    """Running float64 moments of features ``x`` (``d``) per class label, for the classes of one task.

    ``update(features [N, d], labels [N])`` adds ``n_c += 1``, ``s_c += x``, ``S_c += x x^T`` for every row;
    batches may come in any order and split (the sums are exact up to float64 rounding).
    """

    def __init__(self, dim: int, device: Optional[torch.device] = None) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (the head's in_features), got {dim!r}.")
        self.dim, self.device = dim, device
        self.counts: dict[int, int] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.outer: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}] (the head's input), got {tuple(features.shape)}.")
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {labels.numel()} labels: one label per row.")
        x = features.detach().to(torch.float64)
        labels = labels.to(x.device)
        for c in torch.unique(labels).tolist():
            rows = x[labels == c]
            if c not in self.counts:
                self.counts[c] = 0
                self.sums[c] = torch.zeros(self.dim, dtype=torch.float64, device=x.device)
                self.outer[c] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
            self.counts[c] += rows.shape[0]
            self.sums[c] += rows.sum(0)
            self.outer[c] += rows.T @ rows

    def all_reduce(self) -> None:
        """Sum the moments over ``torch.distributed`` processes (no-op without it). Every process must hold the
        same classes (e.g. call after :meth:`ensure_classes` with the task's class ids)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for c in sorted(self.counts):
            n = torch.tensor([float(self.counts[c])], dtype=torch.float64, device=self.sums[c].device)
            for t in (n, self.sums[c], self.outer[c]):
                torch.distributed.all_reduce(t)
            self.counts[c] = int(n.item())

    def ensure_classes(self, classes: Iterable[int]) -> None:
        """Start zero moments for ``classes`` not seen yet (so every process of a reduction holds the same keys)."""
        dev = next(iter(self.sums.values())).device if self.sums else self.device
        for c in classes:
            if c not in self.counts:
                self.counts[c] = 0
                self.sums[c] = torch.zeros(self.dim, dtype=torch.float64, device=dev)
                self.outer[c] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=dev)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.sums.values(), *self.outer.values()])

    def moments(self) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(classes, counts [C], means [C, d], covariances [C, d, d])``, unbiased (``n_c - 1``; 0 if n_c < 2)."""
        classes = sorted(c for c, n in self.counts.items() if n > 0)
        if not classes:
            raise ValueError("No features were recorded: the statistics need at least one labelled example.")
        counts = torch.tensor([self.counts[c] for c in classes], dtype=torch.float64)
        means = torch.stack([self.sums[c] / self.counts[c] for c in classes]).cpu()
        covs = []
        for c, mean in zip(classes, means):
            n = self.counts[c]
            scatter = self.outer[c].cpu() - n * torch.outer(mean, mean)
            covs.append((scatter + scatter.T) / (2 * max(n - 1, 1)))
        return classes, counts, means, torch.stack(covs)


class HeadInputRecorder:
    """A forward pre-hook on ``head`` that feeds every input it sees, with the current batch's labels, to an
    accumulator, so the statistics are collected inside a pass that already runs (e.g. ``end_task``'s).

    ``with HeadInputRecorder(head, acc) as rec: model.end_task(rec.track(loader))`` - :meth:`track` yields the
    batches unchanged (and keeps ``len``) after reading their labels; in a training loop call :meth:`set_labels`
    before each forward instead. Only batches whose labels were set are recorded; a forward of a different size
    than the labels raises.
    """

    def __init__(self, head: nn.Module, accumulator: ClassFeatureAccumulator, label_key: str = "labels") -> None:
        self.head, self.accumulator, self.label_key = head, accumulator, label_key
        self.labels: Optional[torch.Tensor] = None
        self.handle = None

    def set_labels(self, labels: Optional[torch.Tensor]) -> None:
        self.labels = None if labels is None else torch.as_tensor(labels).detach().reshape(-1)

    def track(self, batches: Iterable[Mapping[str, Any]]) -> "_LabelledBatches":
        return _LabelledBatches(batches, self)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self.labels is None:
            return
        features = args[0]
        if features.dim() != 2 or features.shape[0] != self.labels.numel():
            raise ValueError(f"The head read features of shape {tuple(features.shape)} for a batch of "
                             f"{self.labels.numel()} labels: class statistics need one [batch, d] input per example.")
        self.accumulator.update(features, self.labels)
        self.labels = None  # one forward of the head per batch

    def __enter__(self) -> "HeadInputRecorder":
        self.handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle, self.labels = None, None


class _LabelledBatches:
    def __init__(self, batches: Iterable[Mapping[str, Any]], recorder: HeadInputRecorder) -> None:
        self.batches, self.recorder = batches, recorder

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for batch in self.batches:
            self.recorder.set_labels(batch[self.recorder.label_key] if isinstance(batch, Mapping) else None)
            yield batch
        self.recorder.set_labels(None)


class ClassStatistics:
    """Per-class mean and covariance of head inputs, for every class seen so far, in one of :data:`STORAGES`.

    Args:
        dim: ``d``, the head's ``in_features``.
        storage: ``"full"`` (``Sigma_c`` per class), ``"shared"`` (the pooled within-class covariance
            ``sum_c (n_c - 1) Sigma_c / (N - C)`` for every class) or ``"lowrank"`` (``Sigma_c ~ V_c diag(l_c)
            V_c^T + diag(r_c)``, ``V_c`` its top-``rank`` eigenvectors, ``r_c`` the residual diagonal, clipped >= 0).
        rank: ``k`` of ``"lowrank"``.
        dtype: the storage dtype (float64 by default; float32 halves the bytes).
    """

    def __init__(self, dim: int, storage: str = "full", rank: Optional[int] = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}.")
        if storage == "lowrank" and (not isinstance(rank, int) or not 1 <= rank <= dim):
            raise ValueError(f"storage='lowrank' needs rank=k with 1 <= k <= dim={dim}, got {rank!r}.")
        self.dim, self.storage, self.rank, self.dtype = dim, storage, rank, dtype
        self.classes = torch.zeros(0, dtype=torch.long)  # global class ids [C]
        self.tasks = torch.zeros(0, dtype=torch.long)  # task index of each class [C]
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.means = torch.zeros(0, dim, dtype=dtype)
        self.covariances = torch.zeros(0, dim, dim, dtype=dtype)  # full
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)  # shared: sum_c (n_c - 1) Sigma_c
        self.factors = torch.zeros(0, dim, rank or 0, dtype=dtype)  # lowrank: V_c sqrt(l_c)
        self.residual = torch.zeros(0, dim, dtype=dtype)  # lowrank: r_c

    def __len__(self) -> int:
        return int(self.classes.numel())

    def with_task(self, accumulator: ClassFeatureAccumulator, task: int) -> "ClassStatistics":
        """These statistics plus the finished task's classes (their moments from ``accumulator``) under task index
        ``task``, as a new object; ``self`` is left as it is (so a failure, or another process's, changes nothing)."""
        extended = copy.copy(self)  # the tensors are shared; add_task only assigns new ones
        extended.add_task(accumulator, task)
        return extended

    def add_task(self, accumulator: ClassFeatureAccumulator, task: int) -> None:
        """Store the finished task's classes (their moments from ``accumulator``) under task index ``task``. Every
        stored tensor is replaced, never written in place (:meth:`with_task` relies on it)."""
        if accumulator.dim != self.dim:
            raise ValueError(f"The accumulator's features have d={accumulator.dim}, these statistics d={self.dim}.")
        classes, counts, means, covs = accumulator.moments()
        clash = sorted(set(classes) & set(self.classes.tolist()))
        if clash:
            raise ValueError(f"Classes {clash} already have statistics: each class belongs to one task.")
        self.classes = torch.cat([self.classes, torch.tensor(classes, dtype=torch.long)])
        self.tasks = torch.cat([self.tasks, torch.full((len(classes),), int(task), dtype=torch.long)])
        self.counts = torch.cat([self.counts, counts])
        self.means = torch.cat([self.means, means.to(self.dtype)])
        if self.storage == "full":
            self.covariances = torch.cat([self.covariances, covs.to(self.dtype)])
        elif self.storage == "shared":
            self.scatter = self.scatter + ((counts - 1).clamp_min(0)[:, None, None] * covs).sum(0)
        else:
            values, vectors = torch.linalg.eigh(covs)  # ascending
            values, vectors = values[:, -self.rank:].clamp_min(0), vectors[:, :, -self.rank:]
            factors = vectors * values.sqrt()[:, None, :]
            residual = (torch.diagonal(covs, dim1=1, dim2=2) - (factors ** 2).sum(-1)).clamp_min(0)
            self.factors = torch.cat([self.factors, factors.to(self.dtype)])
            self.residual = torch.cat([self.residual, residual.to(self.dtype)])

    def covariance(self, index: int) -> torch.Tensor:
        """``Sigma`` of the ``index``-th stored class (``d x d``, float64) as this storage represents it."""
        if self.storage == "full":
            return self.covariances[index].double()
        if self.storage == "shared":
            dof = float((self.counts - 1).clamp_min(0).sum())
            return self.scatter / max(dof, 1.0)
        f = self.factors[index].double()
        return f @ f.T + torch.diag(self.residual[index].double())

    def sample(self, index: int, n: int, generator: torch.Generator, mean_scale: float = 1.0,
               shrinkage: float = 0.0, ridge: float = 1e-4) -> torch.Tensor:
        """``n`` draws (``n x d``, float64) of ``N(mean_scale * mean, (1 - a) Sigma + a (tr Sigma / d) I +
        ridge I)``, ``a = shrinkage``; the authors' setting is ``a = 0``, ``ridge = 1e-4``."""
        mean = self.means[index].double() * mean_scale
        if self.storage == "lowrank" and shrinkage == 0.0:  # no d x d matrix: x = mean + V sqrt(l) z1 + sqrt(r) z2
            f, r = self.factors[index].double(), self.residual[index].double() + ridge
            z1 = torch.randn(n, f.shape[1], dtype=torch.float64, generator=generator)
            z2 = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
            return mean + z1 @ f.T + z2 * r.sqrt()
        cov = self.covariance(index)
        if shrinkage:
            cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / self.dim * torch.eye(self.dim,
                                                                                              dtype=cov.dtype)
        jitter = ridge
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(self.dim, dtype=cov.dtype))
            if int(info) == 0:
                break
            jitter = max(jitter, 1e-8) * 10
        else:
            raise ValueError(f"The covariance of class {int(self.classes[index])} is not positive definite even "
                             f"with a ridge of {jitter}: its statistics hold NaN or inf.")
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return mean + z @ chol.T

    def nbytes(self) -> int:
        """Bytes of what is stored (the tensors of :meth:`state_dict`)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous tensors only (safetensors-friendly); the storage kind is encoded in which keys exist."""
        out = {"classes": self.classes, "tasks": self.tasks, "counts": self.counts, "means": self.means}
        if self.storage == "full":
            out["covariances"] = self.covariances
        elif self.storage == "shared":
            out["scatter"] = self.scatter
        else:
            out.update(factors=self.factors, residual=self.residual)
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "ClassStatistics":
        """The inverse of :meth:`state_dict` (e.g. of ``safetensors.torch.load_file``)."""
        missing = {"classes", "tasks", "counts", "means"} - set(state)
        if missing:
            raise ValueError(f"Not a ClassStatistics state: missing {sorted(missing)}.")
        dim = int(state["means"].shape[1])
        if "covariances" in state:
            out = cls(dim, "full", dtype=state["means"].dtype)
            out.covariances = state["covariances"].clone()
        elif "scatter" in state:
            out = cls(dim, "shared", dtype=state["means"].dtype)
            out.scatter = state["scatter"].clone().double()
        elif "factors" in state:
            out = cls(dim, "lowrank", rank=int(state["factors"].shape[2]), dtype=state["means"].dtype)
            out.factors, out.residual = state["factors"].clone(), state["residual"].clone()
        else:
            raise ValueError("Not a ClassStatistics state: no covariances, scatter or factors.")
        out.classes, out.tasks = state["classes"].clone().long(), state["tasks"].clone().long()
        out.counts, out.means = state["counts"].clone().double(), state["means"].clone()
        return out


def storage_bytes(dim: int, num_classes: int, storage: str, rank: int = 0, element_size: int = 8) -> int:
    """Bytes of :class:`ClassStatistics` for ``num_classes`` classes of width ``dim`` (ids, tasks, counts included)."""
    per_class_ids = 8 + 8 + 8
    means = num_classes * dim * element_size
    cov = {"full": num_classes * dim * dim * element_size, "shared": dim * dim * 8,
           "lowrank": num_classes * dim * (rank + 1) * element_size}[storage]
    return num_classes * per_class_ids + means + cov


def collect_class_statistics(model: nn.Module, head: nn.Module, batches: Iterable[Mapping[str, Any]],
                             accumulator: Optional[ClassFeatureAccumulator] = None,
                             label_key: str = "labels") -> ClassFeatureAccumulator:
    """A no-grad eval-mode pass of ``model`` over ``batches`` (dicts of model inputs with ``label_key``) recording
    the head's inputs per label: for manual loops without a pass to piggyback on. The model's mode is restored."""
    if not isinstance(head, nn.Linear):
        raise ValueError(f"Class statistics read the input of an nn.Linear head, got {type(head).__name__}.")
    accumulator = accumulator or ClassFeatureAccumulator(head.in_features)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), HeadInputRecorder(head, accumulator, label_key) as recorder:
            for batch in recorder.track(batches):
                if label_key not in batch:
                    raise ValueError(f"Every batch needs its labels under '{label_key}' for class statistics.")
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                          if k != label_key}
                model(**inputs)
    finally:
        model.train(was_training)
    return accumulator
