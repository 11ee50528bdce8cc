"""InfLoRA under FSDP2 (``torch.distributed.fsdp.fully_shard``): keep the adapter's own parameters out of sharding.

``begin_task`` installs a new trainable ``A_t`` (``d_out x r_t``) in every InfLoRA layer and ``end_task`` folds it
into buffers and replaces it by an empty ``d_out x 0`` parameter. FSDP2 takes over the parameters a module holds when
``fully_shard`` is called and re-registers its own copies at every forward, so an ``A_t`` sharded by FSDP breaks the
lifecycle: ``end_task`` cannot fold it (``mixed torch.Tensor and DTensor``), and after a wrap that took in the empty
parameter the next task's forward multiplies by that stale ``d_out x 0`` tensor. Passing
:func:`adapter_parameters` as ``ignored_params`` keeps them whole and replicated on every process, while the base
model (the memory FSDP is used for) and ``modules_to_save`` stay sharded; the replicated gradients are then averaged
by hand (:func:`all_reduce_gradients`), as DDP would. The buffers (``B_t``, past factors, memory) are never sharded:
FSDP2 shards parameters only, and the statistics that design them are all-reduced like under DDP.

One wrap serves the whole sequence (tested on CPU with 2 processes over gloo, ``tests/test_distributed.py``)::

    from torch.distributed.fsdp import fully_shard
    from peft_inflora.distributed import adapter_parameters, all_reduce_gradients, save_adapter

    ignored = adapter_parameters(peft_model)
    hf_model = peft_model.base_model.model           # the root: not the PeftModel (begin_task calls this model)
    for block in hf_model.bert.encoder.layer:
        fully_shard(block, ignored_params=ignored)
    fully_shard(hf_model, ignored_params=ignored)
    for loader in task_loaders:                       # each process: its shard of the task's data
        peft_model.begin_task(loader)                 # statistics through the FSDP forward, all-reduced
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=...)
        for batch in loader:
            peft_model(**batch).loss.backward()
            all_reduce_gradients(adapter_parameters(peft_model))
            optimizer.step()
            optimizer.zero_grad()
        peft_model.end_task(loader)
    save_adapter(peft_model, "adapter")               # every process calls it; process 0 writes
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .errors import DistributedStepError, ShardedAdapterError


try:  # torch >= 2.4 (public DTensor); older torch has no FSDP2
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every InfLoRA parameter of ``model`` (the ``A_t`` of each adapter in each InfLoRA layer, empty ones
    included): pass them as ``fully_shard(..., ignored_params=set(...))`` so FSDP leaves them whole, and after each
    backward to :func:`all_reduce_gradients`. Call it again after ``begin_task``: each task has new ``A_t``."""
    from .layer import InfLoRALayer  # here, not at the top: the subspace math imports this module (is_distributed)

    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, InfLoRALayer):
            params.extend(module.inflora_A.values())
    return params


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is running: built into this torch and a default process group initialised. The
    one definition of that test in the method (statistics all-reduce, sketch merge, token-budget stop, saving)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the default group: ``torch.distributed.get_world_size()`` while it runs, else 1."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def _flag_device(group: Any = None) -> torch.device:
    """Where the agreement's flags live: CPU for gloo (and mixed ``cpu:gloo,cuda:nccl`` groups), the current GPU for
    a GPU-only backend (NCCL reduces GPU tensors only)."""
    backend = str(torch.distributed.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def check_agreement(step: str, error: Optional[BaseException] = None, stop: bool = False,
                    group: Any = None) -> bool:
    """The collective that ends a local step on every process of ``group`` (default: all): each process says whether
    its step failed (``error``) and whether it wants to stop (``stop``, e.g. it ran out of batches), in one
    all-reduce of ``world_size + 1`` numbers.

    When any process failed, it raises on every process: the failing process its own ``error``, the others a
    :class:`~peft_inflora.errors.DistributedStepError` naming ``step``, the failing rank(s) and their errors (one
    more collective, only then). Call it where every process runs the same collectives before and after it, and
    commit the step's results only once it returned: then no collective is left unmatched and no process changes
    its state when another one failed. Without ``torch.distributed`` (or with one process) there is nothing to
    agree with: ``error`` is raised, ``stop`` returned.

    Returns:
        Whether any process asked to stop.
    """
    if not is_distributed() or torch.distributed.get_world_size(group) == 1:
        if error is not None:
            raise error
        return stop
    world = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    flags = torch.zeros(world + 1, device=_flag_device(group))
    flags[rank] = float(error is not None)
    flags[world] = float(stop)
    torch.distributed.all_reduce(flags, group=group)  # SUM: flags[r] > 0 <=> rank r failed
    failed = [r for r in range(world) if flags[r].item() > 0]
    if failed:
        summaries: list = [None] * world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        torch.distributed.all_gather_object(summaries, mine, group=group)
        if error is not None:
            raise error
        errors = {r: summaries[r] for r in failed}
        who = ", ".join(f"rank {r} ({errors[r]})" for r in failed)
        raise DistributedStepError(
            f"{step} failed on {len(failed)} of {world} processes: {who}. This process (rank {rank}) stopped too, "
            "so that no process waits for another; nothing was changed. Fix the error the failing process reports "
            "(its traceback is in its own log) and run the step again on every process.",
            step=step, failed_ranks=failed, errors=errors,
        )
    return bool(flags[world].item() > 0)


@contextlib.contextmanager
def agree(step: str, group: Any = None) -> Iterator[None]:
    """Run a local step (no collectives inside) on every process, then agree (:func:`check_agreement`): when the
    block raised on any process, every process raises (that process its own error, the others a
    :class:`~peft_inflora.errors.DistributedStepError` naming ``step`` and the failing rank). Compute inside the
    block, commit after it::

        with agree("end_task: memory update"):
            new_memory = update_memory(...)      # may fail on one process only
        layer.set_memory(new_memory)             # reached on every process, or on none

    No-op without ``torch.distributed`` (the block's exception propagates unchanged, nothing is communicated).
    """
    try:
        yield
    except Exception as err:  # BaseException (KeyboardInterrupt, SystemExit) ends the process: no agreement
        check_agreement(step, err, group=group)
        raise  # pragma: no cover - check_agreement re-raises err
    check_agreement(step, group=group)


def all_reduce_gradients(params: Iterable[nn.Parameter], group: Any = None) -> int:
    """Average the gradients of replicated parameters over the processes of ``group`` (default: all), in one
    collective, as DDP does for the parameters it owns. Parameters without a gradient are skipped (every process
    must skip the same ones); no-op without ``torch.distributed``.

    Returns:
        The number of gradients averaged.
    """
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel() > 0]
    if not grads or not is_distributed():
        return len(grads)
    if DTensor is not None and any(isinstance(g, DTensor) for g in grads):
        raise ShardedAdapterError("all_reduce_gradients averages replicated gradients, but some are sharded "
                                  "(DTensor): FSDP already reduces those; pass only the parameters it ignores.")
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    flat /= torch.distributed.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return len(grads)


def check_adapter_not_sharded(layers: Mapping[str, nn.Module]) -> None:
    """Raise :class:`ShardedAdapterError` (before anything changes) when FSDP2 or DeepSpeed ZeRO-3 has sharded the
    ``A_t`` of an InfLoRA layer: ``begin_task`` / ``end_task`` replace and fold these parameters, which the wrapper
    would undo (FSDP2) or has already released after the last forward (ZeRO-3)."""
    for name, layer in layers.items():
        for adapter, param in getattr(layer, "inflora_A", {}).items():
            if getattr(param, "ds_id", None) is not None:
                raise ShardedAdapterError(
                    f"The InfLoRA parameter '{name}.inflora_A.{adapter}' is partitioned by DeepSpeed ZeRO-3, which "
                    "InfLoRA does not support (each task replaces these parameters). Use ZeRO stage 1 or 2 (call "
                    "`deepspeed.initialize` again after every `begin_task`), or FSDP2 with the InfLoRA parameters "
                    "left out (see the `peft_inflora.distributed` docstring)."
                )
            if DTensor is not None and isinstance(param, DTensor):
                raise ShardedAdapterError(
                    f"The InfLoRA parameter '{name}.inflora_A.{adapter}' is sharded by FSDP (a DTensor). Each task "
                    "replaces these parameters, which FSDP cannot follow: wrap with "
                    "`fully_shard(..., ignored_params=set(peft_inflora.distributed.adapter_parameters(model)))` "
                    "so they stay whole, and average their gradients with "
                    "`peft_inflora.distributed.all_reduce_gradients` (see the `peft_inflora.distributed` docstring)."
                )


def reshard_fsdp_modules(model: nn.Module) -> int:
    """Reshard every FSDP2 module of ``model`` (no-op for modules already sharded, and without FSDP2).

    After a forward FSDP2 keeps the root module's parameters unsharded (for the backward that usually follows), so
    ``model.parameters()`` would hand an optimizer the temporary unsharded tensors instead of the sharded parameters
    FSDP updates: training then goes wrong without an error. The statistics pass of ``begin_task`` / ``end_task``
    (forward only) calls this at its end, so an optimizer built after ``begin_task`` gets the right parameters.

    Returns:
        The number of FSDP2 modules resharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return 0
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.reshard()
    return len(modules)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every FSDP-sharded tensor gathered whole (on CPU), on every process (a
    collective: all processes must call it). Without FSDP, the plain state dict on CPU."""
    if DTensor is not None and any(isinstance(t, DTensor) for t in model.state_dict().values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, rank: Optional[int] = None,
                 **save_kwargs: Any) -> None:
    """Save a (possibly FSDP-wrapped) PeftModel's adapter once: every process gathers the full state
    (:func:`full_state_dict`, a collective), process 0 writes it with ``save_pretrained`` (memory and continual
    state included), and all processes wait for the files before returning.

    When one process fails (process 0 cannot write the folder, another cannot gather its part of the state), every
    process raises (:func:`check_agreement`; the others a :class:`~peft_inflora.errors.DistributedStepError` naming
    the failing rank), after the gather and after the write: no process is left waiting. A failure inside FSDP's
    own gather collectives cannot be agreed on; those processes then fail when the process group's timeout ends."""
    with agree("save_adapter (gathering the state)"):
        state = full_state_dict(model)
    if rank is None:
        rank = torch.distributed.get_rank() if is_distributed() else 0
    with agree("save_adapter (process 0 writing the files)"):
        model.save_pretrained(str(save_directory), state_dict=state, is_main_process=rank == 0, **save_kwargs)
