"""Entry point of the one-process-fails tests: ``torchrun --nproc_per_node 2 failure_worker.py OUT``.

Both processes hold the same tiny InfLoRA model (two adapted ``nn.Linear`` layers) and run the cases of
:data:`CASES` in order, with the gloo group's timeout set to :data:`GLOO_TIMEOUT_S` seconds so that a collective
left unmatched fails the run instead of hanging it. In each case one process (``faulty``) fails in one collective
step, by bad data or by an injected fault (a monkeypatched function that raises on that rank only); every process
records what it raised, how long the step took, whether its state (the whole ``state_dict``, ``tasks_done``,
``task_in_progress``) is exactly what it was before, and whether the two processes are still in step afterwards
(one all-reduce that only adds up when no collective was left over). Cases end with one that succeeds, so the
failures are shown not to have broken anything for the steps after them.

The ``fsdp2_*`` cases run the same steps on a second copy wrapped with FSDP2 (``fully_shard``, the InfLoRA
parameters left out), whose forwards are collectives.

Written to OUT: ``rank{r}.json``, ``{case: record}`` in the order run; ``adapter/`` (the final, successful save).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
from peft import get_peft_model
from torch import nn

import peft_inflora.distributed
import peft_inflora.lifecycle
from peft_inflora import InfLoRAConfig, InfLoRAModel
from peft_inflora.distributed import save_adapter
from peft_inflora.layer import InfLoRALayer


D, TOKENS = 8, 6
GLOO_TIMEOUT_S = 20


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(D, D)
        self.lin2 = nn.Linear(D, D)

    def forward(self, x, attention_mask=None):
        return self.lin2(torch.relu(self.lin1(x)))


def shard(rank: int, n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(10 + rank)
    return [{"x": torch.randn(2, TOKENS, D, generator=g)} for _ in range(n)]


class FailingLoader:
    """Hands out two batches, then fails as a broken data pipeline would."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        yield from self.batches[:2]
        raise OSError("injected: the data loader lost its file")


def snapshot(model) -> dict:
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (an FSDP2 shard: this part)
    return {"state": {k: local(v.detach()).clone() for k, v in model.state_dict().items()},
            "tasks_done": model.tasks_done(), "task_in_progress": model.task_in_progress()}


def unchanged(model, before: dict) -> bool:
    after = snapshot(model)
    if (after["tasks_done"], after["task_in_progress"]) != (before["tasks_done"], before["task_in_progress"]):
        return False
    if after["state"].keys() != before["state"].keys():
        return False
    for key, tensor in before["state"].items():
        other = after["state"][key]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            return False
        if not torch.equal(torch.nan_to_num(other, nan=123.0), torch.nan_to_num(tensor, nan=123.0)):
            return False
    return True


def raise_on(rank: int, faulty: int, error: Exception):
    """A function that raises ``error`` on process ``faulty`` and calls through to ``original`` elsewhere."""

    def wrap(original):
        def patched(*args, **kwargs):
            if rank == faulty:
                raise error
            return original(*args, **kwargs)

        return patched

    return wrap


class Patch:
    """``setattr(owner, name, wrap(original))`` for the duration of a ``with`` block."""

    def __init__(self, owner, name: str, wrap) -> None:
        self.owner, self.name, self.wrap = owner, name, wrap

    def __enter__(self):
        self.original = getattr(self.owner, self.name)
        setattr(self.owner, self.name, self.wrap(self.original))

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)


def in_sync(index: int) -> bool:
    """Both processes are at the same collective: an all-reduce of the case number adds up."""
    flag = torch.tensor([float(index + 1)])
    torch.distributed.all_reduce(flag)
    return flag.item() == (index + 1) * torch.distributed.get_world_size()


def main(out: str) -> None:
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = get_peft_model(Net(), InfLoRAConfig(r=2, target_modules=["lin1", "lin2"], statistics_max_tokens=None))
    data = shard(rank)
    blocker = os.path.join(out, f"blocker-rank{rank}")
    open(blocker, "w").close()  # a file: no folder can be made under it

    # the same model under FSDP2: the transformers-side model is the root, the InfLoRA parameters left out
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    sharded = get_peft_model(Net(), InfLoRAConfig(r=2, target_modules=["lin1", "lin2"], statistics_max_tokens=None))
    fully_shard(sharded.base_model.model, mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)),
                ignored_params=set(peft_inflora.distributed.adapter_parameters(sharded)))

    def begin(batches=None, on=None):
        on = model if on is None else on
        return lambda: on.begin_task(batches if batches is not None else data, progress=False)

    def end(batches=None, on=None):
        on = model if on is None else on
        return lambda: on.end_task(batches if batches is not None else data, progress=False)

    def train_identically():
        """Stand-in for training: the same non-zero A_t on both processes (as DDP keeps them)."""
        g = torch.Generator().manual_seed(5)
        for layer in model.base_model.inflora_layers().values():
            a = layer.inflora_A["default"]
            a.data.copy_(torch.randn(a.shape, generator=g) * 0.1)

    def nan_batches():
        batches = shard(rank)
        batches[1] = {"x": batches[1]["x"].clone()}
        batches[1]["x"][0, 0, 0] = float("nan")
        return batches

    def diverged_a():
        layer = next(iter(model.base_model.inflora_layers().values()))
        layer.inflora_A["default"].data[0, 0] = float("nan")

    def restore_a():
        train_identically()

    def fail_on_second_layer(original):
        calls = []

        def patched(self, *args, **kwargs):
            calls.append(1)
            if rank == 0 and len(calls) == 2:  # the first layer's fold is already computed
                raise RuntimeError("injected: fold failed on the second layer")
            return original(self, *args, **kwargs)

        return patched

    solver_error = torch.linalg.LinAlgError("injected: eigh failed to converge")
    # (name, faulty rank or None, setup before the snapshot, the step, a patch active during the step, teardown)
    cases = [
        ("begin_bad_batch", 1, None, begin(data[:1] + ["not a batch"] + data[1:] if rank == 1 else None), None,
         None),
        ("begin_forward_error", 1, None,
         begin([{"x": torch.randn(2, TOKENS, D + 1)}] if rank == 1 else None), None, None),
        ("begin_loader_error", 0, None, begin(FailingLoader(data) if rank == 0 else None), None, None),
        ("begin_checks", 1, None, begin(),
         Patch(InfLoRAModel, "_checked_layers", raise_on(rank, 1, RuntimeError("injected: check failed"))), None),
        ("begin_design", 1, None, begin(),
         Patch(peft_inflora.lifecycle, "design_eigen", raise_on(rank, 1, solver_error)), None),
        ("begin_design_rank0", 0, None, begin(),
         Patch(peft_inflora.lifecycle, "design_eigen", raise_on(rank, 0, solver_error)), None),
        ("begin_ok", None, None, begin(), None, train_identically),
        ("end_nonfinite_shard", 1, None, end(nan_batches() if rank == 1 else None), None, None),
        ("end_memory_solver", 1, None, end(),
         Patch(peft_inflora.lifecycle, "update_memory", raise_on(rank, 1, solver_error)), None),
        ("end_fold", 0, None, end(), Patch(InfLoRALayer, "folded_state", fail_on_second_layer), None),
        ("end_diverged_a", 1, diverged_a if rank == 1 else None, end(), None, restore_a),
        ("end_ok", None, None, end(), None, None),
        ("save_unwritable", 0, None,
         lambda: save_adapter(model, os.path.join(blocker, "adapter") if rank == 0 else os.path.join(out, "x")),
         None, None),
        ("save_gather", 1, None, lambda: save_adapter(model, os.path.join(out, "adapter")),
         Patch(peft_inflora.distributed, "full_state_dict",
               raise_on(rank, 1, RuntimeError("injected: gathering the state failed"))), None),
        ("save_ok", None, None, lambda: save_adapter(model, os.path.join(out, "adapter")), None, None),
        ("begin_after_all", None, None, begin(), None, None),
        # under FSDP2 every forward all-gathers the root's shards: a bad batch must stop every process before it
        ("fsdp2_begin_bad_batch", 1, None, begin(data[:1] + [None] if rank == 1 else None, on=sharded), None, None),
        ("fsdp2_begin_ok", None, None, begin(on=sharded), None, None),
        ("fsdp2_end_nonfinite_shard", 1, None, end(nan_batches() if rank == 1 else None, on=sharded), None, None),
        ("fsdp2_end_ok", None, None, end(on=sharded), None, None),
    ]
    records = {}
    for index, (name, faulty, setup, step, patch, teardown) in enumerate(cases):
        target = sharded if name.startswith("fsdp2") else model
        if setup is not None:
            setup()
        before = snapshot(target)
        start = time.monotonic()
        error = None
        try:
            if patch is not None:
                with patch:
                    step()
            else:
                step()
        except Exception as err:  # recorded for the test to check
            error = err
        elapsed = time.monotonic() - start
        records[name] = {
            "faulty": faulty,
            "error_type": None if error is None else type(error).__name__,
            "error": None if error is None else str(error),
            "step": getattr(error, "step", None),
            "failed_ranks": list(getattr(error, "failed_ranks", ())),
            "unchanged": unchanged(target, before),
            "tasks_done": target.tasks_done(),
            "task_in_progress": target.task_in_progress(),
            "elapsed_s": elapsed,
            "in_sync": in_sync(index),
        }
        if teardown is not None:
            teardown()
    records["saved_files"] = sorted(os.listdir(os.path.join(out, "adapter"))) if rank == 0 else []
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(records, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
