"""The continual trainers with parameter-sharding wrappers: what runs, what is refused (before anything changes).

Every task replaces parameters: ``begin_task`` installs a new trainable ``A_t`` in every InfLoRA layer, ``end_task``
folds it into buffers, and a class-incremental head grows by the task's classes (a new ``Linear`` in
``modules_to_save``). A wrapper that shards parameters once cannot follow that, so either the parameters the loop
replaces stay whole and replicated (FSDP2), or each task's wrapper is built anew around them (DeepSpeed):

* **DeepSpeed ZeRO-1 / ZeRO-2** (``TrainingArguments(deepspeed=<config>)``): parameters stay whole; each task's
  ``Trainer.train()`` builds a new engine (and optimizer) around that task's parameters. Runs as it is.
* **DeepSpeed ZeRO-3** (the same, ``"zero_optimization": {"stage": 3}``): every parameter, ``A_t`` and the head
  included, is a placeholder outside a forward. Each ``train()`` destroys the last task's engine (its module hooks go)
  and builds a new one, which partitions the new ``A_t`` and the grown head next to the already partitioned base
  model; between two ``train()`` calls the last engine's hooks gather the base model layer by layer for the forwards
  outside the engine (statistics passes, class statistics, evaluation). The steps that read or write whole tensors go
  through :mod:`.zero3`: the head grows, is snapshotted, has its frozen rows restored after every optimizer step and
  is re-aligned inside ``GatheredParameters``, the adapter is saved inside it, and ``end_task`` gets whole copies of
  the trained ``A_t`` (:func:`~.zero3.take_whole_adapter`). Tested on CPU with 2 processes over gloo, every
  parameter partitioned (``stage3_param_persistence_threshold: 0``): ranks bit-identical, equal to one process as
  ZeRO-2 is (memory 6.0e-8, past_A 8.3e-7, past_B 1.7e-7, head 7.9e-4 after the alignment), and a run killed after
  its first task resumes to the same adapter (``tests/test_trainer_sharded.py``).
* **FSDP2 applied before the trainer** (``fully_shard`` on the transformers model and its blocks, with
  ``ignored_params=replicated_parameters(peft_model)``): the trainer runs the Trainer's own path for a model that
  owns its sharding (``is_distributed_loading_by_transformers``, as for ``from_pretrained(distributed_config=...)``):
  no DDP wrap, the replicated trainable parameters broadcast from process 0 and their gradients averaged at every
  step, the statistics pass through the FSDP root. The adapter (A_t, memory, head) holds no sharded tensor, so
  process 0 saves it alone.
* **Refused**: Accelerate's own FSDP (``fsdp=...``: it shards the ``PeftModel`` as the root, ``A_t`` and the head
  included, once for the whole run), and an FSDP2 wrap that sharded a parameter the loop replaces.
"""

from __future__ import annotations

from typing import Any

from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..distributed import adapter_parameters


__all__ = ["check_sharding", "is_fsdp2_sharded", "replicated_parameters"]


def is_fsdp2_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def replicated_parameters(model: PeftModel) -> set[nn.Parameter]:
    """The parameters the continual loop replaces, which FSDP2 must leave whole: every InfLoRA ``A_t`` and every
    parameter of a ``modules_to_save`` wrapper (the head that grows, with its original). Pass them as
    ``fully_shard(module, ignored_params=replicated_parameters(peft_model))`` for every module you shard."""
    params = set(adapter_parameters(model))
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            params.update(module.parameters())
    return params


def _sharded_names(model: nn.Module, params: set[nn.Parameter]) -> list[str]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return []
    return [name for name, p in model.named_parameters() if p in params and isinstance(p, DTensor)]


def check_sharding(trainer: Any, model: PeftModel) -> None:
    """Refuse, before anything changes, the sharding set-ups the continual loop cannot follow (see the module
    docstring); ``trainer`` is the continual trainer, ``model`` its unwrapped PeftModel. A baseline (another PEFT
    method) in the generation setting replaces no parameter, so nothing is refused for it."""
    if not trainer.is_inflora and trainer.args.setting == "generation":
        return
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "The continual trainers do not run under Accelerate's FSDP (fsdp=... in the training arguments): "
            "Accelerate shards the PeftModel as the FSDP root once, InfLoRA's A_t and the head included, while every "
            "task installs a new A_t and grows the head, and the statistics pass calls the model inside the root. "
            "Shard the model yourself before making the trainer, and leave fsdp unset: `for block in blocks: "
            "fully_shard(block, ignored_params=ps)`, then `fully_shard(peft_model.base_model.model, "
            "ignored_params=ps)` with `ps = peft_inflora.continual.sharding.replicated_parameters(peft_model)` (see "
            "docs/distributed.md). Nothing was trained.")
    if is_fsdp2_sharded(model):
        args = trainer.args
        if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no" and not args.save_only_model:
            raise ValueError(
                "With a model sharded by FSDP2 the Trainer's own mid-task checkpoints cannot be resumed (as for a "
                "model sharded at load time): set save_strategy='no' (the continual/after-task-NN checkpoints are the "
                "resume points) or save_only_model=True. Nothing was trained.")
        sharded = _sharded_names(model, replicated_parameters(model))
        if sharded:
            raise ValueError(
                f"FSDP2 sharded {sharded[:3]}{' ...' if len(sharded) > 3 else ''}, which the continual loop replaces "
                "at every task (A_t, the growing head): pass ignored_params=peft_inflora.continual.sharding."
                "replicated_parameters(peft_model) to every fully_shard call. Nothing was trained.")
