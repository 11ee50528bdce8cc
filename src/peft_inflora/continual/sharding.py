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
* **Accelerate's FSDP** (``TrainingArguments(fsdp=True, fsdp_config=...)`` or ``accelerate launch`` with an FSDP
  config): :class:`FSDPPluginMixin` takes the plugin away from the Accelerator before it is built and applies the
  same settings itself (:func:`shard_with_plugin`: the auto-wrap policy's blocks, ``reshard_after_forward``,
  mixed precision), with the loop's rule, then runs the path above. Accelerate's own
  ``fsdp2_prepare_model`` would make the ``PeftModel`` the root, shard ``A_t`` and the head, and return at once for
  every later task, so the next ``A_t`` and the grown head would never be registered. The same code runs on CPU,
  where Accelerate would have ignored the plugin, and on GPUs.
* **Refused**: FSDP1 (``fsdp_version=1``: flat parameters
  cannot take a new ``A_t``), FSDP's ``activation_checkpointing`` and ``cpu_offload`` (see
  :func:`check_fsdp_plugin`), an Accelerator whose state already holds FSDP, and an FSDP2 wrap that sharded a
  parameter the loop replaces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..distributed import adapter_parameters


__all__ = ["FSDPPluginMixin", "check_fsdp_plugin", "check_sharding", "check_transformers_for_fsdp2",
           "fsdp_plugin_from", "is_fsdp2_sharded", "replicated_parameters", "shard_with_plugin"]


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


# The Trainer leaves a model that owns its sharding without a DDP wrap (``is_distributed_loading_by_transformers``)
# from transformers 5.19 on; before, DDP's broadcast of the module's state fails on the DTensor parameters.
FSDP2_TRANSFORMERS = "5.19"


def check_transformers_for_fsdp2() -> None:
    """Refuse FSDP2 with a transformers whose Trainer would wrap the sharded model in DDP (before 5.19)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(FSDP2_TRANSFORMERS):
        raise ValueError(
            f"FSDP with the continual trainers needs transformers>={FSDP2_TRANSFORMERS} (installed: "
            f"{transformers.__version__}): its Trainer wraps an FSDP2-sharded model in DDP, which fails on the "
            f"sharded parameters. Upgrade transformers (pip install -U 'transformers>={FSDP2_TRANSFORMERS}') or "
            "train without FSDP (DDP or DeepSpeed). Nothing was changed.")


def check_sharding(trainer: Any, model: PeftModel) -> None:
    """Refuse, before anything changes, the sharding set-ups the continual loop cannot follow (see the module
    docstring); ``trainer`` is the continual trainer, ``model`` its unwrapped PeftModel. A baseline (another PEFT
    method) in the generation setting replaces no parameter, so nothing is refused for it."""
    if not trainer.is_inflora and trainer.args.setting == "generation":
        return
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "The Accelerator of this continual trainer already runs FSDP (an Accelerator or AcceleratorState with an "
            "FSDP plugin was created before the trainer): Accelerate would shard the PeftModel as the FSDP root once, "
            "InfLoRA's A_t and the head included, while every task installs a new A_t and grows the head. Create no "
            "Accelerator before the trainer and pass the FSDP settings as TrainingArguments(fsdp=True, "
            "fsdp_config=...) (or accelerate launch's FSDP config): the trainer then shards the model itself, leaving "
            "out what the loop replaces (docs/distributed.md). Nothing was trained.")
    if is_fsdp2_sharded(model):
        check_transformers_for_fsdp2()
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


# ---------------------------------------------------------------------------------------------- Accelerate's FSDP
def fsdp_plugin_from(args: Any) -> Optional[Any]:
    """The FSDP settings asked of Accelerate, as its ``FullyShardedDataParallelPlugin``: from the training arguments
    (``fsdp=True, fsdp_config=...``: ``args.fsdp_plugin_args``) or from ``accelerate launch``'s FSDP config
    (``ACCELERATE_USE_FSDP=true`` and the ``FSDP_*`` variables); ``None`` when neither asks for FSDP. FSDP1 is refused
    here, before its plugin is built (which already fails on a CPU)."""
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env

    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args is None and not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    version = int(plugin_args.get("fsdp_version", 1) if plugin_args is not None
                  else os.environ.get("FSDP_VERSION", "1"))  # Accelerate's defaults
    if version != 2:
        raise ValueError(
            f"The continual trainers shard with FSDP2 only (fsdp_version={version} given): FSDP1 flattens each "
            "wrapped module's parameters once, and every task installs a new A_t. Set fsdp_config={'version': 2} "
            "(transformers' default) in the training arguments, or fsdp_version: 2 in the accelerate config. Nothing "
            "was changed.")
    return FullyShardedDataParallelPlugin(**plugin_args) if plugin_args is not None \
        else FullyShardedDataParallelPlugin()


def check_fsdp_plugin(plugin: Any) -> None:
    """Refuse, before anything changes, the FSDP2 settings the continual loop cannot follow."""
    if plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_config['activation_checkpointing'] wraps every block in a CheckpointWrapper, which renames every "
            "parameter and buffer under it ('..._checkpoint_wrapped_module...'), so the saved adapter and its "
            "memory would no longer load into the model: leave it False. Nothing was changed.")
    if type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy":
        raise ValueError(
            "fsdp_config['cpu_offload'] is not run by the continual trainers: the blocks' parameters would live on "
            "the CPU while the replicated A_t, the head and the task statistics stay on the accelerator, a "
            "combination never tested here. Leave cpu_offload False. Nothing was changed.")


def shard_with_plugin(peft_model: PeftModel, plugin: Any, device: torch.device, mixed_precision: str = "no") -> None:
    """Apply ``plugin``'s FSDP2 settings to ``peft_model`` as Accelerate's ``fsdp2_prepare_model`` would, with the
    continual loop's rule: ``fully_shard`` every block the auto-wrap policy picks (bottom-up), then the transformers
    model ``peft_model.base_model.model`` as the root (the model ``begin_task``'s statistics pass calls), each with
    ``ignored_params=replicated_parameters(peft_model)``, ``reshard_after_forward`` and the mixed precision policy
    (the model moves to ``device`` whole first, as the Trainer moves an unsharded model). PEFT's own modules
    (InfLoRA layers, the ``modules_to_save`` head) are never units. With ``cpu_ram_efficient_loading``
    (``accelerate launch``'s default) ``from_pretrained`` read the weights on process 0 only and left the other
    processes' tensors uninitialised: every parameter and buffer is broadcast from process 0 first, as Accelerate's
    own preparation would (whole tensors here, not shard by shard)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    root = peft_model.base_model.model
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    plugin.set_auto_wrap_policy(root)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, root)
    peft_model.to(device)
    if plugin.cpu_ram_efficient_loading:
        with torch.no_grad():
            for tensor in list(peft_model.parameters()) + list(peft_model.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)
    kwargs = dict(reshard_after_forward=plugin.reshard_after_forward,
                  mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
                  ignored_params=replicated_parameters(peft_model) | _packed_quantized_parameters(root),
                  mesh=init_device_mesh(device.type, (torch.distributed.get_world_size(),)))
    if policy is not None:
        for module in get_module_children_bottom_up(root)[:-1]:
            if isinstance(module, (FSDPModule, BaseTunerLayer, ModulesToSaveWrapper)) or not policy(module):
                continue
            fully_shard(module, **kwargs)
    fully_shard(root, **kwargs)


def _packed_quantized_parameters(model: nn.Module) -> set[nn.Parameter]:
    """bitsandbytes 4-bit weights in integer storage (``Params4bit``, ``bnb_4bit_quant_storage=torch.uint8``, the
    default): left whole, as Accelerate's ``fsdp2_prepare_model`` leaves them, since their ``quant_state`` does not
    survive the DTensor conversion. With a floating ``bnb_4bit_quant_storage`` they are sharded."""
    return {p for p in model.parameters() if type(p).__name__ == "Params4bit" and not p.requires_grad
            and not p.is_floating_point() and not p.is_complex()}


@contextlib.contextmanager
def _without_fsdp_request(args: Any) -> Iterator[None]:
    saved_args, saved_env = args.fsdp_plugin_args, os.environ.get("ACCELERATE_USE_FSDP")
    args.fsdp_plugin_args = None
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        args.fsdp_plugin_args = saved_args
        if saved_env is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = saved_env


class FSDPPluginMixin:
    """Accelerate's FSDP for the continual trainers: the plugin the arguments ask for is checked and kept out of the
    Accelerator (:meth:`create_accelerator_and_postprocess`, the Trainer's hook), and the trainer applies it
    itself once the model is known (:meth:`_shard_with_fsdp_plugin`, called by the loop's ``__init__``)."""

    _fsdp_plugin: Optional[Any] = None

    def create_accelerator_and_postprocess(self) -> None:
        plugin = fsdp_plugin_from(self.args)
        if plugin is None:
            return super().create_accelerator_and_postprocess()
        check_fsdp_plugin(plugin)
        check_transformers_for_fsdp2()
        self._fsdp_plugin = plugin
        with _without_fsdp_request(self.args):
            super().create_accelerator_and_postprocess()

    def _shard_with_fsdp_plugin(self) -> None:
        if self._fsdp_plugin is None or is_fsdp2_sharded(self.peft_model):
            return
        shard_with_plugin(self.peft_model, self._fsdp_plugin, self.args.device, self.accelerator.mixed_precision)
