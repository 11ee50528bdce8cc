"""Entry point of the sharded ContinualTrainer tests: ``torchrun --nproc_per_node 2 trainer_sharded_worker.py MODE
OUT``, or ``python trainer_sharded_worker.py single OUT`` for the one-process reference (no wrapper).

MODE ``fsdp2``: the model sharded with ``fully_shard`` before the trainer (each encoder block, then the transformers
model as the root), leaving out ``peft_inflora.continual.sharding.replicated_parameters`` (A_t, the head); DDP
arguments (``ddp_backend="gloo"``), no ``fsdp=`` (Accelerate enables FSDP only on GPUs). Then a second model whose
wrap shards the head too must be refused (``head_sharded`` in the result), and so must the trained model with the
Trainer's own mid-task checkpoints (``save_steps``).

MODE ``accelerate_fsdp``: ``TrainingArguments(fsdp=True)``, Accelerate's FSDP2 settings, which the trainer applies
itself (the blocks of BERT's ``_no_split_modules``, then the root). MODE ``accelerate_launch``: the same settings from
``accelerate launch --use_fsdp`` (``FSDP_*`` variables); with ``cpu_ram_efficient_loading`` process 1 starts from
other weights, as ``from_pretrained`` leaves them there.

MODE ``zero2`` / ``zero3``: ``ContinualTrainer`` with ``TrainingArguments(deepspeed=<config>)`` (DeepSpeed's CPU
accelerator, gloo; ZeRO-3 with ``stage3_param_persistence_threshold: 0``, so every parameter is partitioned, and a
probe recording what each process holds of ``A_t``, the head and a base weight after the first step of each task:
``partitioned`` in the result). Accelerate starts DeepSpeed without a communication backend when no GPU is
present, so it would count one process: the worker makes the state itself (``deepspeed_cpu.py``). The DeepSpeed
config holds the optimizer, so the Trainer's optimizer is Accelerate's ``DummyOptim``.

``DEVICE=cuda`` (modes ``single`` and ``accelerate_fsdp``): the run on GPUs, NCCL, one process per GPU, where
Accelerate would itself switch to ``DistributedType.FSDP`` if the trainer left the plugin to it (the GPU check,
``tests/test_trainer_sharded.py``).

Per process ``r``, written to OUT: ``result-rank{r}.json`` (accuracy matrix, or the error), ``final-rank{r}``
(every InfLoRA and head tensor), ``saves-rank{r}.json`` (the safetensors files the process wrote), and the run's
``output_dir`` in ``OUT/run``. ``STOP_AFTER_TASK=k`` ends the process (``os._exit``, no clean-up) after the
checkpoint of task k, like a killed job; ``RESUME=1`` continues the sequence from ``OUT/run``. ``HEAD_LOGITS``
sets ``head_logits`` (default ``"linear"``: a linear head aligned by its new rows, whose old rows must stay bit for
bit; ``"auto"`` is the class-incremental default, a cosine head with every row re-fitted).
``BASELINE=lora``: a PEFT LoRA model (r=4 on query/value) instead of InfLoRA, the sequential baseline.
``CLASS_STATISTICS_SOURCE`` sets ``class_statistics_source`` (default ``"last_epoch"``; ``"extra_pass"`` reads the
task's batches once more after training, through the partitioned model under ZeRO-3).
"""

from __future__ import annotations

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))
from continual_fixtures import bert, inflora_bert, tasks, training_args  # noqa: E402
from deepspeed_cpu import deepspeed_arguments  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from stop_callbacks import StopAfter  # noqa: E402
from worker_records import counted_adapter_writes, train_and_record, write_records  # noqa: E402

from peft_inflora import ContinualCallback, ContinualTrainer  # noqa: E402


MODES = ("single", "zero2", "zero3", "fsdp2", "accelerate_fsdp", "accelerate_launch")
SEQUENCE = (2, 3)
DEVICE = os.environ.get("DEVICE", "cpu")  # "cuda": the GPU check
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"


class PartitionProbe(ContinualCallback):
    """ZeRO-3: after the first optimizer step of every task, what each process holds of an ``A_t``, the head and a
    base weight (``ds_status``, the local data's size, the whole size, the size of this process's slice)."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.records = trainer_ref, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step != 0:  # the step counter is raised after this event: 0 during the first step
            return
        model = self.trainer_ref[0].peft_model
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        head = model.base_model.model.classifier.modules_to_save["default"]
        record = {name: {"status": str(getattr(p, "ds_status", None)), "data": p.data.numel(),
                         "whole": getattr(p, "ds_numel", None),
                         "slice": p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else None}
                  for name, p in (("A_t", layer.inflora_A["default"] if hasattr(layer, "inflora_A")
                                   else layer.lora_A["default"].weight), ("head", head.weight),
                                  ("base", layer.base_layer.weight))}
        # the engine's module hooks on a base layer: the same count in every task (the last engine's went)
        record["hooks"] = len(layer.base_layer._forward_pre_hooks) + len(layer.base_layer._forward_hooks)
        self.records.append(record)


def fsdp2_wrap(model, ignore_head: bool = True) -> None:
    """``fully_shard`` each encoder block, then the transformers model as the root, leaving out what the continual
    loop replaces (``replicated_parameters``: A_t and the head), or only A_t (``ignore_head=False``, refused)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from peft_inflora.continual.sharding import replicated_parameters
    from peft_inflora.distributed import adapter_parameters

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    ignored = replicated_parameters(model) if ignore_head else set(adapter_parameters(model))
    for block in model.base_model.model.bert.encoder.layer:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model.base_model.model, mesh=mesh, ignored_params=ignored)


def main(mode: str, out: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"MODE must be one of {MODES}, got {mode!r}")
    os.makedirs(out, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    if os.environ.get("BASELINE") == "lora":  # the sequential-LoRA baseline: the same loop without InfLoRA
        model = get_peft_model(bert(), LoraConfig(r=4, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    else:
        model = inflora_bert(statistics_max_tokens=None)
    if mode.startswith("fsdp2"):
        fsdp2_wrap(model)
        extra = dict(ddp_backend="gloo")
    elif mode == "accelerate_fsdp":  # Accelerate's settings, applied by the trainer (blocks: _no_split_modules)
        extra = dict(ddp_backend=BACKEND, fsdp=True, fsdp_config={"reshard_after_forward": True})
    elif mode == "accelerate_launch":  # accelerate launch --use_fsdp: the settings come in FSDP_* variables
        extra = dict(ddp_backend="gloo")
        if rank != 0 and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() == "true":
            with torch.no_grad():  # what from_pretrained leaves on the other processes: empty tensors
                for p in model.parameters():
                    p.normal_()
    elif mode != "single":
        extra = deepspeed_arguments(int(mode[-1]))

    def make_args(folder: str):  # batches of 8 per step in every mode: 8 on one process, 4 + 4 on two
        return training_args(os.path.join(out, folder), num_train_epochs=2, per_device_train_batch_size=8 // world,
                             weight_decay=0.1, head_logits=os.environ.get("HEAD_LOGITS", "linear"),
                             class_statistics_source=os.environ.get("CLASS_STATISTICS_SOURCE", "last_epoch"),
                             **{"use_cpu": DEVICE == "cpu", **extra})

    args = make_args("run")
    callbacks = [StopAfter(int(os.environ["STOP_AFTER_TASK"]))] if os.environ.get("STOP_AFTER_TASK") else []
    trainer_ref: list = []
    probe = PartitionProbe(trainer_ref) if mode == "zero3" else None
    trainer = ContinualTrainer(model=model, args=args, callbacks=callbacks + ([probe] if probe else []))
    trainer_ref.append(trainer)
    units = sorted(name for name, m in model.named_modules() if type(m).__name__.startswith("FSDP"))

    with counted_adapter_writes() as writes:
        record = train_and_record(trainer, tasks(SEQUENCE), model)
    if record["error"] is None:
        record.update(fsdp_units=units, accelerator_fsdp=trainer.is_fsdp_enabled,
                      distributed_type=str(trainer.accelerator.distributed_type), device=str(trainer.args.device))
    if probe is not None:
        record["partitioned"] = probe.records
    if mode == "fsdp2":  # a wrap that shards the head too: refused before anything changes
        other = inflora_bert(statistics_max_tokens=None)
        fsdp2_wrap(other, ignore_head=False)
        refused = ContinualTrainer(model=other, args=make_args("refused"))
        try:
            refused.train_continual(tasks(SEQUENCE))
            record["head_sharded"] = {"error": None}
        except Exception as err:
            record["head_sharded"] = {"error": f"{type(err).__name__}: {err}", "tasks_done": other.tasks_done(),
                                      "task_in_progress": other.task_in_progress()}
        steps = ContinualTrainer(model=model, args=training_args(os.path.join(out, "refused"), save_strategy="steps",
                                                                 **extra))
        try:  # the Trainer's mid-task checkpoints of a sharded model cannot be resumed: refused
            steps.train_task(tasks((2, 3, 2))[2])
            record["save_steps"] = {"error": None}
        except Exception as err:
            record["save_steps"] = {"error": f"{type(err).__name__}: {err}", "tasks_done": model.tasks_done()}
    write_records(out, record, writes, model,
                  keep=lambda key: "inflora" in key or "lora_" in key or "classifier" in key)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
