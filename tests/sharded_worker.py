"""Entry point of the sharded-training tests: ``torchrun --nproc_per_node 2 sharded_worker.py MODE OUT``, or
``python sharded_worker.py single OUT`` for the one-process reference (no wrapper).

MODE ``fsdp2``: one ``fully_shard`` wrap for the whole sequence (each encoder block, then the transformers model as
the root) with the InfLoRA parameters left out (``ignored_params``), the order ``peft_inflora.distributed``
documents. MODE ``zero2``: DeepSpeed ZeRO stage 2 (CPU accelerator, gloo), ``deepspeed.initialize`` again after every
``begin_task``. Both: two tasks of a tiny random BERT, per task ``begin_task`` -> training (a fresh optimizer) ->
``end_task``, then the adapter saved once with ``peft_inflora.distributed.save_adapter``.

Process ``r`` of ``W`` reads examples ``8 j + 8 r / W`` to ``8 j + 8 (r + 1) / W - 1`` of batch ``j``, so W processes
see the same data per step as one process with batches of 8 (a batch's mean loss is the mean of the processes'
means: equal training up to float reassociation).

Written to OUT, per process ``r``: ``design-task{t}-rank{r}`` (every layer's ``B_t``), ``trained-task{t}-rank{r}``
(``A_t`` after training), ``memory-task{t}-rank{r}`` (memory basis after ``end_task``), ``gathered-rank{r}`` (the
InfLoRA and head tensors of the state dict gathered whole), ``logits-rank{r}`` (on a fixed batch, through the
wrapped model), ``saves-rank{r}.json`` (the safetensors files the process wrote while saving), ``misuse-rank{r}.json``
(what wrong set-ups did, see :func:`fsdp2_misuse` / :func:`zero3_misuse`); and ``adapter/`` (saved once).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file


sys.path.insert(0, os.path.dirname(__file__))
from continual_fixtures import inflora_bert, task_dataset  # noqa: E402
from worker_records import counted_adapter_writes  # noqa: E402

from peft_inflora.distributed import (  # noqa: E402
    adapter_parameters,
    all_reduce_gradients,
    full_state_dict,
    save_adapter,
)


BATCH, EXAMPLES, LR = 8, 48, 5e-3
MODES = ("single", "fsdp2", "zero2")


def local_batches(task: int, rank: int, world: int) -> list[dict]:
    """This process's share of every batch of 8 of task ``task`` (local labels, 2 classes)."""
    ds = task_dataset(task, 2, EXAMPLES, seed=100 + task).rename_column("label", "labels")
    ds.set_format("torch")
    share = BATCH // world
    return [ds[j * BATCH + rank * share: j * BATCH + (rank + 1) * share] for j in range(EXAMPLES // BATCH)]


def layer_tensors(model, attr: str) -> dict[str, torch.Tensor]:
    """``attr`` of the default adapter in every InfLoRA layer, as whole CPU tensors."""
    return {name: getattr(layer, attr)["default"].detach().cpu().clone().contiguous()
            for name, layer in model.base_model.inflora_layers().items()}


def attempt(model, call) -> dict:
    """Run ``call()``; record the error (if any) and the adapter's continual state afterwards."""
    try:
        call()
        error = None
    except Exception as err:  # recorded for the test to check
        error = f"{type(err).__name__}: {err}"
    return {"error": error, "task_in_progress": model.task_in_progress(), "tasks_done": model.tasks_done()}


def fsdp2_mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def fsdp2_wrap(model, mesh, ignore_adapter: bool = True, root=None) -> None:
    """``fully_shard`` each encoder block, then ``root`` (default: the transformers model inside the PeftModel)."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(adapter_parameters(model)) if ignore_adapter else None
    for block in model.base_model.model.bert.encoder.layer:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(root if root is not None else model.base_model.model, mesh=mesh, ignored_params=ignored)


def fsdp2_misuse(mesh, batches: list[dict]) -> dict[str, dict]:
    """Two wrong wraps on fresh models; ``begin_task`` must refuse both before changing anything.

    ``adapter_sharded``: no ``ignored_params``, so FSDP shards ``A``. ``peft_root``: the PeftModel as the FSDP root,
    whose hooks the statistics pass (it calls the transformers model inside) bypasses."""
    results = {}
    for case in ("adapter_sharded", "peft_root"):
        model = inflora_bert(statistics_max_tokens=None)
        fsdp2_wrap(model, mesh, ignore_adapter=case != "adapter_sharded", root=model if case == "peft_root" else None)
        results[case] = attempt(model, lambda: model.begin_task(batches, progress=False))
    return results


def zero3_misuse(batches: list[dict]) -> dict[str, dict]:
    """ZeRO-3 partitions ``A_t``: ``end_task`` must refuse it before changing anything."""
    model = inflora_bert(statistics_max_tokens=None)
    model.begin_task(batches, progress=False)
    engine = zero_engine(model, stage=3)
    model.train()
    loss = engine(**batches[0]).loss
    engine.backward(loss)
    engine.step()
    result = attempt(model, lambda: model.end_task(batches, progress=False))
    engine.destroy()
    return {"zero3_end_task": result}


def zero_engine(model, stage: int):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": BATCH // torch.distributed.get_world_size(),
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True}}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine


def main(mode: str, out: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"MODE must be one of {MODES}, got {mode!r}")
    os.makedirs(out, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "zero2":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    elif mode == "fsdp2":
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if mode != "single" else 0
    model = inflora_bert(statistics_max_tokens=None)
    mesh = None
    if mode == "fsdp2":
        mesh = fsdp2_mesh(world)
        fsdp2_wrap(model, mesh)

    def dump(tensors: dict[str, torch.Tensor], stem: str) -> None:
        save_file(tensors, os.path.join(out, f"{stem}-rank{rank}.safetensors"))

    for task in range(2):
        batches = local_batches(task, rank, world)
        model.begin_task(batches, progress=False)
        dump(layer_tensors(model, "inflora_B"), f"design-task{task}")
        if mode == "zero2":
            engine = zero_engine(model, stage=2)  # again for every task: A_t is a new parameter
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        model.train()
        for batch in batches:
            if mode == "zero2":
                engine.backward(engine(**batch).loss)
                engine.step()
            else:
                model(**batch).loss.backward()
                all_reduce_gradients(adapter_parameters(model))  # no-op in one process
                optimizer.step()
                optimizer.zero_grad()
        dump(layer_tensors(model, "inflora_A"), f"trained-task{task}")
        model.end_task(batches, progress=False)
        dump(layer_tensors(model, "inflora_memory"), f"memory-task{task}")

    model.eval()
    probe = local_batches(1, 0, 1)[0]  # the same batch on every process
    with torch.no_grad():
        logits = model(**{k: v for k, v in probe.items() if k != "labels"}).logits
    dump({"logits": logits.detach().cpu().contiguous()}, "logits")

    with counted_adapter_writes() as writes:
        save_adapter(model, os.path.join(out, "adapter"))
    with open(os.path.join(out, f"saves-rank{rank}.json"), "w") as f:
        json.dump(writes, f)
    gathered = full_state_dict(model)
    dump({k: v.contiguous() for k, v in gathered.items() if "inflora" in k or "classifier" in k}, "gathered")

    if mode != "single":
        batches = local_batches(0, rank, world)
        misuse = fsdp2_misuse(mesh, batches) if mode == "fsdp2" else zero3_misuse(batches)
        with open(os.path.join(out, f"misuse-rank{rank}.json"), "w") as f:
            json.dump(misuse, f)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
