"""DeepSpeed on CPU for the multi-process trainer workers, defined once: the config and the ``TrainingArguments``
that make the Trainer run it over gloo with the processes ``torchrun`` started.

Accelerate starts DeepSpeed without a communication backend when no GPU is present, so it would count one process:
the state is made first, ``PartialState(backend="gloo")`` with ``ACCELERATE_USE_DEEPSPEED=true`` (what ``accelerate
launch --use_deepspeed`` sets), and the Trainer uses it (``accelerator_config={"use_configured_state": True}``). The
config holds the optimizer, so the Trainer's optimizer is Accelerate's ``DummyOptim``."""

from __future__ import annotations

import os


def deepspeed_config(stage: int) -> dict:
    """ZeRO-``stage``; ZeRO-3 with every parameter partitioned, however small (by default those under 1e5 elements
    stay whole); bf16 and fp16 as the arguments say."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def deepspeed_arguments(stage: int) -> dict:
    """Make the gloo state, then the ``TrainingArguments`` keywords that run ZeRO-``stage`` on it."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return dict(use_cpu=False, deepspeed=deepspeed_config(stage), accelerator_config={"use_configured_state": True})
