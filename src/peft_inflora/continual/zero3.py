"""DeepSpeed ZeRO-3 in the continual trainers: whole parameters where the task loop reads or writes them.

Under ZeRO-3 (``TrainingArguments(deepspeed=<config with "zero_optimization": {"stage": 3}>)``) every parameter the
engine took in is a placeholder outside a forward (``param.ds_id``, ``param.ds_numel``; its data is empty) and each
process holds one slice of it (``param.ds_tensor``). Each task's ``Trainer.train()`` starts by destroying the last
task's engine (``accelerator.free_memory()``: its module hooks go) and builds a new one, whose
``_convert_to_zero_parameters`` partitions what is new since (the task's ``A_t``, the grown head) next to what is
already partitioned (the base model). Between two ``train()`` calls the last engine's module hooks stay, so forwards
outside the engine (the statistics passes, the class statistics, the evaluation) gather the base model layer by layer
as in training. What the loop itself reads or writes whole goes through the helpers here:

* :func:`gathered`: ``deepspeed.zero.GatheredParameters`` over the partitioned ones among ``params`` (the head when
  it grows, its snapshot of frozen rows and their restore after every optimizer step, the alignment's rewrite, the
  checkpoint's ``save_pretrained``); ``modify=True`` keeps the block's writes (``modifier_rank=0``: every process
  computed the same values);
* :func:`take_whole_adapter`: before ``end_task``, every partitioned ``A_t`` is replaced by a whole copy (its
  gathered values, bit for bit) and dropped from the engine's external parameters, so ``end_task`` (its checks, its
  statistics pass, the fold) runs on ordinary tensors, as under ZeRO-1/2;
* :func:`forget_engine_hooks`: before each task's ``train()``, the modules drop the backward-hook functions the last
  engine left on them, so the new engine binds its own (DeepSpeed reuses any it finds, bound to the destroyed
  engine).

Every helper is a no-op without a partitioned parameter (no DeepSpeed import, nothing communicated), so the DDP,
FSDP2 and ZeRO-1/2 paths are untouched. They are collectives under ZeRO-3: every process calls them with the same
parameters, never inside a local step (``peft_inflora.distributed.agree``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn


__all__ = ["adapter_file_parameters", "forget_engine_hooks", "gathered", "head_parameters", "is_partitioned",
           "take_whole_adapter"]

# what a ZeRO-3 engine leaves on every module it registered (``DeepSpeedZeRoOffload._register_deepspeed_module``):
# the autograd functions of its backward hooks, which close over that engine, and their reference count
ENGINE_BACKWARD_ATTRIBUTES = ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt")


def is_partitioned(param: Any) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (DeepSpeed partitioned it: it carries ``ds_id``)."""
    return getattr(param, "ds_id", None) is not None


@contextlib.contextmanager
def gathered(params: Iterable[Any], modify: bool = False) -> Iterator[None]:
    """Inside the block, the ZeRO-3 parameters among ``params`` hold their whole data on every process; on exit they
    are partitioned again. ``modify=True``: the block's writes are kept (process 0's values are broadcast first, so
    every process must have computed the same ones); otherwise they are dropped. ``params`` may mix partitioned and
    ordinary parameters (the ordinary ones are left alone); none partitioned: a no-op."""
    partitioned = [p for p in params if p is not None and is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def adapter_file_parameters(model: PeftModel) -> list[nn.Parameter]:
    """The parameters whose values go into the saved adapter: the tuner's own (names holding its prefix, e.g.
    ``inflora_`` or ``lora_``) and the ``modules_to_save`` wrappers' (:func:`head_parameters`), in the same order on
    every process."""
    prefix = getattr(getattr(model, "base_model", None), "prefix", None)
    params = [p for n, p in model.named_parameters() if prefix and prefix in n]
    seen = {id(p) for p in params}
    return params + [p for p in head_parameters(model) if id(p) not in seen]


def head_parameters(model: PeftModel) -> list[nn.Parameter]:
    """Every parameter of a ``modules_to_save`` wrapper (the head: every adapter's copy and the original), in the
    same order on every process."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            params.extend(module.parameters())
    return params


def _forget_external(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Drop ``params`` from the external parameters the engine registered on ``model``'s modules (an ``A_t`` read by
    the InfLoRA layer's forward is registered there), so no later forward gathers a parameter the model lost."""
    ids = {id(p) for p in params}
    for module in model.modules():
        external = getattr(module, "_external_params", None)
        if external:
            for key in [k for k, p in external.items() if id(p) in ids]:
                del external[key]


def take_whole_adapter(model: PeftModel) -> int:
    """Replace every ZeRO-3-partitioned ``A_t`` of the InfLoRA layers by an ordinary parameter holding its whole
    values (gathered: bit for bit what the engine trained), same ``requires_grad``. Called after ``train()``, before
    ``end_task``, which then reads and folds ordinary tensors. Returns how many were replaced (0 without ZeRO-3)."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "inflora_A", None), nn.ParameterDict)]
    entries = [(layer, adapter, param) for layer in layers for adapter, param in layer.inflora_A.items()
               if is_partitioned(param)]
    if not entries:
        return 0
    with gathered([param for _, _, param in entries]):
        copies = [nn.Parameter(param.data.detach().clone(), requires_grad=param.requires_grad)
                  for _, _, param in entries]
    _forget_external(model, [param for _, _, param in entries])
    for (layer, adapter, _), copy in zip(entries, copies):
        layer.inflora_A[adapter] = copy
    return len(entries)


def forget_engine_hooks(model: nn.Module) -> int:
    """Before a task's ``train()`` builds a new ZeRO-3 engine: delete the backward-hook functions the last engine left
    on ``model``'s modules (:data:`ENGINE_BACKWARD_ATTRIBUTES`). Returns how many modules held them (0 without ZeRO-3:
    nothing to do).

    Why: DeepSpeed registers a module's backward hooks as autograd functions stored on the module
    (``module.pre_bwd_fn`` / ``module.post_bwd_fn``) and only creates them when the module has none. The Trainer
    destroys the last task's engine and builds a new one, whose forward hooks then find the old functions: the
    backward fetched and released parameters through the destroyed engine's coordinator, while the forward used the
    new one's. With non-reentrant activation checkpointing (transformers' default, and what TRL's SFTTrainer runs
    under ZeRO-3 with transformers 5: TRL's ``use_reentrant=True`` lands on the deprecated alias), the second task's
    first backward recomputed its layers with placeholders (``CheckpointError: Recomputed values for the following
    tensors have different metadata than during the forward pass``: shape ``[0]`` instead of ``[32, 32]``).

    Call it only after every forward of the last engine (the statistics pass of ``begin_task``) and before the next
    ``train()``: that engine's forward hooks read these attributes, and are removed by ``train()`` before the new
    engine registers its own."""
    held = 0
    for module in model.modules():
        found = [name for name in ENGINE_BACKWARD_ATTRIBUTES if name in module.__dict__]
        held += bool(found)
        for name in found:
            delattr(module, name)
    return held
