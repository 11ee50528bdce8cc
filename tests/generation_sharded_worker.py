"""Entry point of the ZeRO-3 generation tests: ``torchrun --nproc_per_node 2 generation_sharded_worker.py MODE OUT``,
or ``python generation_sharded_worker.py MODE OUT`` (a ``*_single`` mode) for the one-process reference.

MODE ``sft_single`` / ``sft_zero3``: TRL's ``SFTTrainer`` made continual (``ContinualSFTTrainer``), two conversational
instruction tasks (colours, then animals), a tiny random ``LlamaForCausalLM`` (``tiny_models.tiny_llama``) with an
InfLoRA adapter on every linear layer of its blocks, SFTConfig's defaults (gradient checkpointing) except ``bf16``
(off: fp32 on both sides of the comparison). MODE ``trainer_single`` / ``trainer_zero3``: the ``ContinualTrainer``
with ``setting="generation"`` on the same tasks as prompt/answer pairs (``tokenize_instruction_dataset``,
``DataCollatorForSeq2Seq``). Every task is evaluated by greedy generation (exact match).

``*_zero3``: ``TrainingArguments(deepspeed=<config>)`` with ``"zero_optimization": {"stage": 3,
"stage3_param_persistence_threshold": 0}`` (every parameter partitioned, however small), DeepSpeed's CPU accelerator
over gloo, the state made first (``deepspeed_cpu.py``). A probe records what each
process holds of an ``A_t`` and a base weight after the first optimizer step of each task (``partitioned``), and a
spy on the evaluation's ``generate_answers`` what each process generated (``generations``: the number of prompts,
the answers, the ``synced_gpus`` that ``generate`` ran with).

Per process ``r``, written to OUT: ``result-rank{r}.json`` (accuracy matrix, or the error), ``final-rank{r}``
(every InfLoRA tensor, gathered), ``saves-rank{r}.json`` (the safetensors files the process wrote), and the run's
``output_dir`` in ``OUT/run``. ``SAVE_STEPS=n``: the Trainer's own checkpoints every n steps; ``STOP_AT_STEP=k:s``
ends the process after step s of task k; ``first_steps`` in the result: the global step of each task's first
optimizer step in this process. ``STOP_AFTER_TASK=k`` ends the process (``os._exit``, no clean-up) after the
checkpoint of task k, like a killed job; ``RESUME=1`` continues the sequence from ``OUT/run``. ``GEN_BATCH`` sets
``per_device_eval_batch_size`` (default 4: two generate calls per task of 6 prompts). ``BF16=1``: the SFT modes
train in bf16 (``bf16=True``, ``"bf16": {"enabled": "auto"}`` in the DeepSpeed config); ``FP16=1`` in fp16 the same
way (DeepSpeed's fp16 optimizer with dynamic loss scaling).
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(__file__))
import datasets  # noqa: E402
import transformers.generation.utils  # noqa: E402
from chat_tokenizer import chat_tokenizer  # noqa: E402
from deepspeed_cpu import deepspeed_arguments  # noqa: E402
from peft import get_peft_model  # noqa: E402
from stop_callbacks import FirstSteps, StopAfter, StopAtStep  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from transformers import DataCollatorForSeq2Seq  # noqa: E402
from worker_records import counted_adapter_writes, train_and_record, write_records  # noqa: E402

import peft_inflora.continual.task_evaluation  # noqa: E402
from peft_inflora import (  # noqa: E402
    ContinualCallback,
    ContinualTask,
    ContinualTrainer,
    ContinualTrainingArguments,
    InfLoRAConfig,
    tokenize_instruction_dataset,
)


MODES = ("sft_single", "sft_zero2", "sft_zero3", "trainer_single", "trainer_zero2", "trainer_zero3")
# questions of different lengths (padding in every batch), six per task
COLOURS = [("colour of grass ?", "green"), ("colour of the sky ?", "blue"), ("colour of snow in winter ?", "white"),
           ("the colour of the grass ?", "green"), ("sky colour ?", "blue"), ("snow colour ?", "white")]
ANIMALS = [("animal that barks ?", "dog"), ("the animal that meows ?", "cat"),
           ("animal that moos in the field ?", "cow"), ("that barks ?", "dog"), ("meows ?", "cat"),
           ("moos ?", "cow")]
TASKS = (("colours", COLOURS), ("animals", ANIMALS))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


BF16 = bool(os.environ.get("BF16"))  # SFT: bf16 training (DeepSpeed's bf16 on its CPU accelerator)
FP16 = bool(os.environ.get("FP16"))  # SFT: fp16 training (DeepSpeed's fp16 with dynamic loss scaling)


def sft_tasks() -> list[ContinualTask]:
    def chats(pairs):
        return datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}] for q, a in pairs]})
    return [ContinualTask(name, chats(pairs * 4), chats(pairs)) for name, pairs in TASKS]


def trainer_tasks(tok) -> list[ContinualTask]:
    def pairs_dataset(pairs):
        return datasets.Dataset.from_dict({"prompt": [q for q, _ in pairs], "answer": [a for _, a in pairs]})
    return [ContinualTask(name, tokenize_instruction_dataset(pairs_dataset(pairs * 4), tok), pairs_dataset(pairs))
            for name, pairs in TASKS]


class PartitionProbe(ContinualCallback):
    """ZeRO-3: after the first optimizer step of every task, what this process holds of an ``A_t`` and a base weight
    (``ds_status``, the local data's size, the whole size, the size of this process's slice)."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.records = trainer_ref, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step != 0:  # the step counter is raised after this event: 0 during the first step
            return
        layer = self.trainer_ref[0].peft_model.base_model.model.model.layers[0].self_attn.q_proj
        self.records.append({
            name: {"status": str(getattr(p, "ds_status", None)), "data": p.data.numel(), "dtype": str(p.dtype),
                   "whole": getattr(p, "ds_numel", None),
                   "slice": p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else None}
            for name, p in (("A_t", layer.inflora_A["default"]), ("base", layer.base_layer.weight))})


def spy_on_generation(records: list) -> None:
    """Record every evaluation's prompts count and answers (``generate_answers`` as ``task_evaluation`` calls it) and
    the ``synced_gpus`` each ``generate`` ran with (as transformers resolved it)."""
    real_answers = peft_inflora.continual.task_evaluation.generate_answers
    real_kwargs = transformers.generation.utils.GenerationMixin._extract_generation_mode_kwargs

    def answers(model, tok, prompts, **kwargs):
        record = {"prompts": len(prompts), "synced_gpus": []}
        records.append(record)
        record["answers"] = real_answers(model, tok, prompts, **kwargs)
        return record["answers"]

    def mode_kwargs(self, *args, **kwargs):
        resolved = real_kwargs(self, *args, **kwargs)
        if records:
            records[-1]["synced_gpus"].append(bool(resolved.get("synced_gpus", False)))
        return resolved

    peft_inflora.continual.task_evaluation.generate_answers = answers
    transformers.generation.utils.GenerationMixin._extract_generation_mode_kwargs = mode_kwargs


def main(mode: str, out: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"MODE must be one of {MODES}, got {mode!r}")
    os.makedirs(out, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not mode.endswith("single"):
        extra = deepspeed_arguments(int(mode[-1]))
        if BF16:  # transformers allows bf16 only on GPUs or with use_cpu=True, which would start DeepSpeed without
            # gloo; DeepSpeed's CPU accelerator runs bf16
            import transformers.training_args

            transformers.training_args.is_torch_bf16_gpu_available = lambda: True
    else:
        extra = dict(use_cpu=True)
    tok = chat_tokenizer()
    model = get_peft_model(tiny_llama(seed=0), InfLoRAConfig(r=8, target_modules=TARGETS,
                                                             statistics_max_tokens=None))
    # batches of 4 per step in every mode: 4 on one process, 2 + 2 on two
    common = dict(output_dir=os.path.join(out, "run"), num_train_epochs=int(os.environ.get("EPOCHS", 8)),
                  learning_rate=5e-2, per_device_train_batch_size=4 // world,
                  per_device_eval_batch_size=int(os.environ.get("GEN_BATCH", 4)),
                  generation_max_new_tokens=3, report_to="none", logging_strategy="no", seed=0,
                  save_strategy="steps" if os.environ.get("SAVE_STEPS") else "no",
                  save_steps=int(os.environ.get("SAVE_STEPS", 500)),
                  disable_tqdm=True, **extra)
    callbacks = [StopAfter(int(os.environ["STOP_AFTER_TASK"]))] if os.environ.get("STOP_AFTER_TASK") else []
    if os.environ.get("STOP_AT_STEP"):  # "k:step"
        callbacks.append(StopAtStep(*map(int, os.environ["STOP_AT_STEP"].split(":"))))
    first_steps = FirstSteps()
    callbacks.append(first_steps)
    trainer_ref: list = []
    probe = PartitionProbe(trainer_ref) if mode.endswith("zero3") else None
    callbacks += [probe] if probe else []
    if mode.startswith("sft"):
        from peft_inflora.trl import ContinualSFTConfig, ContinualSFTTrainer

        args = ContinualSFTConfig(max_length=32, bf16=BF16, fp16=FP16, **common)
        trainer = ContinualSFTTrainer(model=model, args=args, processing_class=tok, callbacks=callbacks)
        sequence = sft_tasks()
    else:
        args = ContinualTrainingArguments(setting="generation", **common)
        trainer = ContinualTrainer(model=model, args=args, processing_class=tok, callbacks=callbacks,
                                   data_collator=DataCollatorForSeq2Seq(tok, padding=True))
        sequence = trainer_tasks(tok)
    trainer_ref.append(trainer)
    generations: list = []
    spy_on_generation(generations)

    with counted_adapter_writes() as writes:
        record = train_and_record(trainer, sequence, model)
    record["generations"] = generations
    record["first_steps"] = first_steps.steps
    if probe is not None:
        record["partitioned"] = probe.records
    write_records(out, record, writes, model, keep=lambda key: "inflora" in key)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
