"""Classification heads of a class-incremental sequence: global labels, head growth, frozen old rows, the cosine head.

Task ``t`` brings ``C_t`` classes with local labels ``0..C_t-1``; they become the global labels
``o_t..o_t+C_t-1`` with ``o_t = C_0 + ... + C_{t-1}`` (task t's classes follow task t-1's). The head, a Linear in
the adapter's ``modules_to_save``, is grown to ``o_T`` outputs with its old rows kept bit for bit; while task ``t``
trains, the rows outside ``[o_t, o_t+C_t)`` are restored after every optimizer step (weight decay or momentum would
otherwise move them).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers import TrainerCallback

from ..distributed import agree
from .arguments import ContinualTask
from .zero3 import gathered, head_parameters


ClassRange = tuple[int, int]  # [lo, hi) of one task's global labels

__all__ = ["ClassRange", "CosineLogits", "FrozenHeadRows", "HeadLossMixin", "RestoreFrozenHeadRows",
           "check_local_labels", "class_ranges", "ensure_head_size", "find_head", "grow_linear", "grown_head",
           "install_head", "new_head_row", "num_task_classes", "to_global_labels"]


def label_column(dataset: Any) -> Optional[str]:
    """``"labels"`` or ``"label"``, whichever the dataset has (``None`` if neither)."""
    names = getattr(dataset, "column_names", None) or []
    return "labels" if "labels" in names else "label" if "label" in names else None


def num_task_classes(task: ContinualTask) -> int:
    """``C_t``: ``len(label_names)``, else the names of a ``ClassLabel`` feature, else ``max(label) + 1``."""
    if task.label_names is not None:
        return len(task.label_names)
    for dataset in (task.train_dataset, task.eval_dataset):
        column = label_column(dataset)
        if column is None:
            continue
        feature = getattr(dataset, "features", {}).get(column)
        if getattr(feature, "names", None):
            return len(feature.names)
        return int(max(dataset[column])) + 1
    raise ValueError(f"Task '{task.name}' has no 'labels' or 'label' column: pass label_names or add labels.")


def class_ranges(counts: list[int], start: int = 0) -> list[ClassRange]:
    """``[(o_t, o_t + C_t)]`` for class counts ``C_t``, the first offset being ``start``."""
    ranges, offset = [], start
    for n in counts:
        ranges.append((offset, offset + n))
        offset += n
    return ranges


def check_local_labels(dataset: Any, num_classes: int, task_name: str) -> str:
    """Check that ``dataset`` has local labels in ``0..num_classes-1``; returns the label column."""
    column = label_column(dataset)
    if column is None:
        raise ValueError(f"Task '{task_name}': the dataset has no 'labels' or 'label' column.")
    labels = dataset[column]
    if len(labels) and (min(labels) < 0 or max(labels) >= num_classes):
        raise ValueError(f"Task '{task_name}': labels must be in 0..{num_classes - 1} (the task's own classes), "
                         f"got {min(labels)}..{max(labels)}.")
    return column


def to_global_labels(dataset: Any, classes: ClassRange, task_name: str) -> Any:
    """Shift a task's local labels ``0..C-1`` to the global ids ``lo..hi-1`` (column ``labels``)."""
    if dataset is None:
        return None
    lo, hi = classes
    column = check_local_labels(dataset, hi - lo, task_name)
    if column == "label":
        dataset = dataset.rename_column("label", "labels")
    if hasattr(dataset, "cast_column"):  # a ClassLabel feature would refuse the shifted ids
        import datasets

        dataset = dataset.cast_column("labels", datasets.Value("int64"))
    return dataset.map(lambda batch: {"labels": [y + lo for y in batch["labels"]]}, batched=True,
                       desc=f"global labels for {task_name}")


def new_head_row(in_features: int, row: int, seed: int) -> torch.Tensor:
    """The initial weights of head row ``row`` (class ``row``): ``N(0, 0.02^2)`` as transformers initialises heads,
    drawn from a generator seeded by ``(seed, row)`` alone, so a row is the same whenever the head grows (all
    classes at once, or task by task) and the global RNG is left alone."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + row)
    return torch.randn(in_features, generator=generator, dtype=torch.float32) * 0.02


def grow_linear(linear: nn.Linear, out_features: int, seed: int = 0) -> nn.Linear:
    """A copy of ``linear`` with more output rows: old rows kept bit for bit, new rows from :func:`new_head_row`
    (zero bias)."""
    grown = nn.Linear(linear.in_features, out_features, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        for row in range(linear.out_features, out_features):
            grown.weight[row] = new_head_row(linear.in_features, row, seed)
        grown.weight[: linear.out_features] = linear.weight
        if linear.bias is not None:
            grown.bias.zero_()
            grown.bias[: linear.out_features] = linear.bias
    grown.weight.requires_grad_(linear.weight.requires_grad)
    if grown.bias is not None:
        grown.bias.requires_grad_(linear.bias.requires_grad)
    return grown


def find_head(model: PeftModel) -> tuple[ModulesToSaveWrapper, nn.Linear]:
    """The classification head: the ``modules_to_save`` Linear whose outputs are the class logits (the one with
    ``config.num_labels`` outputs, else the last one)."""
    num_labels = getattr(model.config, "num_labels", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            active = module.modules_to_save[model.active_adapter]
            if isinstance(active, nn.Linear):
                candidates.append((name, module, active))
    chosen = [c for c in candidates if c[2].out_features == num_labels] or candidates
    if not chosen:
        raise ValueError(
            "Class-incremental training needs the classification head in `modules_to_save` (e.g. "
            "InfLoRAConfig(modules_to_save=['classifier']) for BERT, ['score'] for Llama): none was found. For "
            "generative tasks use setting='generation'."
        )
    return chosen[-1][1], chosen[-1][2]


def ensure_head_size(model: PeftModel, num_classes: int, seed: int = 0) -> None:
    """Grow the head (every adapter's copy and the original) to ``num_classes`` outputs, new rows from
    :func:`new_head_row` with ``seed``; never shrinks."""
    wrapper, _ = find_head(model)
    with gathered(wrapper.parameters()):  # ZeRO-3: the old rows whole (the grown copies are new parameters)
        grown = grown_head(model, num_classes, seed)
    install_head(model, grown, num_classes)


def grown_head(model: PeftModel, num_classes: int, seed: int = 0) -> Optional[dict[str, nn.Linear]]:
    """The head's ``nn.Linear`` copies grown to ``num_classes`` outputs (:func:`grow_linear`), by key of
    ``modules_to_save`` (``""``: the original module), or ``None`` when the head has that many already. Nothing is
    installed (:func:`install_head` does). Under ZeRO-3 the caller gathers the head first."""
    wrapper, head = find_head(model)
    if head.out_features >= num_classes:
        return None
    grown = {key: grow_linear(module, num_classes, seed) for key, module in wrapper.modules_to_save.items()
             if isinstance(module, nn.Linear)}
    if isinstance(wrapper.original_module, nn.Linear):
        grown[""] = grow_linear(wrapper.original_module, num_classes, seed)
    return grown


def install_head(model: PeftModel, grown: Optional[dict[str, nn.Linear]], num_classes: int) -> None:
    """Put the copies of :func:`grown_head` in place of the head's modules and tell the model its new number of
    labels (``None``: nothing to do)."""
    if grown is None:
        return
    wrapper, _ = find_head(model)
    for key, module in grown.items():
        if key:
            wrapper.modules_to_save[key] = module
        else:
            wrapper.original_module = module
    model.config.num_labels = num_classes
    for module in model.modules():  # transformers heads keep their own copy for the loss
        if isinstance(getattr(module, "num_labels", None), int) and module is not model:
            module.num_labels = num_classes


class CosineLogits:
    """A cosine head on an ``nn.Linear`` head: while :attr:`active`, its logits ``W x + b`` (``N x C``) become

        logits[n, c] = s * <x_n, w_c> / (||x_n|| ||w_c||)       (x: N x d, W: C x d; the bias is not used)

    through a forward hook, so the model's own forward (and the Trainer's loss) read them. :meth:`attach` puts the
    hook on a head module (again after the head grows: growing replaces the module) and activates it; :meth:`detach`
    removes it."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)
        self.active = False
        self.head: Optional[nn.Linear] = None
        self._handle: Any = None

    def attach(self, head: nn.Linear) -> None:
        if head is not self.head:
            self.detach()
            self.head, self._handle = head, head.register_forward_hook(self._logits)
        self.active = True

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self.head, self._handle = None, None

    def _logits(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.active:
            return None
        x = args[0]
        logits = self.scale * F.linear(F.normalize(x.to(module.weight.dtype), dim=-1),
                                       F.normalize(module.weight, dim=-1))
        return logits.to(output.dtype)


class FrozenHeadRows:
    """The rows of ``head`` outside ``classes``, snapshotted now and restored after every optimizer step. Under
    ZeRO-3 the caller gathers ``head`` around the snapshot."""

    def __init__(self, head: nn.Linear, classes: ClassRange) -> None:
        self.head = head
        self.frozen = torch.ones(self.head.out_features, dtype=torch.bool, device=self.head.weight.device)
        self.frozen[classes[0]: classes[1]] = False
        self.weight = self.head.weight.detach().clone()
        self.bias = self.head.bias.detach().clone() if self.head.bias is not None else None

    def _params(self) -> list[nn.Parameter]:
        return [self.head.weight] + ([self.head.bias] if self.head.bias is not None else [])

    def restore(self, *unused: Any) -> None:
        """Write the snapshot back into the frozen rows (after every optimizer step: see :class:`HeadLossMixin`).
        Under ZeRO-3 every process calls it (a gather, then each process keeps its slice of the restored rows)."""
        with gathered(self._params(), modify=True), torch.no_grad():
            self.head.weight[self.frozen] = self.weight[self.frozen]
            if self.bias is not None:
                self.head.bias[self.frozen] = self.bias[self.frozen]


class RestoreFrozenHeadRows(TrainerCallback):
    """Restores the trainer's frozen head rows after every optimizer step (``on_optimizer_step``).

    A callback, not an optimizer hook: under DeepSpeed the Trainer's optimizer is a ``DummyOptim`` / wrapper whose
    ``step`` does nothing (the engine steps inside ``backward``, then copies its own master weights into the model),
    so only an event after the step sees the weights the model will use."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer._frozen_head is not None:
            self.trainer._frozen_head.restore()


class HeadLossMixin:
    """The Trainer hooks of a class-incremental head (mixed into :class:`~.loop.ContinualMixin`): the loss over the
    task's classes, and the frozen rows restored by a :class:`RestoreFrozenHeadRows` callback that the trainer adds.
    The trainer sets ``_task_classes`` and ``_frozen_head`` while a task trains."""

    def _begin_head(self, peft_model: PeftModel, classes: ClassRange, index: int) -> None:
        """Grow the head to the task's classes and snapshot its other rows (restored after every optimizer step).
        Compute, agree, commit: both are computed on every process (ZeRO-3: on the gathered head), the processes
        agree, and only then is the grown head installed; when one process fails, none changed anything."""
        with gathered(head_parameters(peft_model)), agree(f"head of task {index + 1} (growth, frozen rows)"):
            grown = grown_head(peft_model, classes[1], self.args.seed)
            head = grown[peft_model.active_adapter] if grown else find_head(peft_model)[1]  # find_head's, grown
            frozen = FrozenHeadRows(head, classes)
        install_head(peft_model, grown, classes[1])
        self._task_classes, self._frozen_head = classes, frozen

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Classification: cross-entropy over the current task's classes only (``logits[:, lo:hi]``, the paper's
        loss, ``loss_classes="task"``), so other classes' head rows get exactly zero gradient; or over all classes
        seen so far (``logits[:, :hi]``, ``loss_classes="seen"``). Generation: the trainer's own loss."""
        if self.args.setting == "generation" or self._task_classes is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        lo, hi = self._task_classes
        if self.args.loss_classes == "seen":
            lo = 0
        labels = inputs.pop("labels")
        alignment = getattr(self, "_head_alignment", None)
        if alignment is not None:  # the last epoch's head inputs become the class statistics
            alignment.record(labels, self.state, model.training)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = F.cross_entropy(logits[:, lo:hi].float(), labels - lo)
        return (loss, outputs) if return_outputs else loss
