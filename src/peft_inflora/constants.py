"""Constants of the InfLoRA method (as PEFT keeps its own in ``peft.utils.constants``)."""

from __future__ import annotations

from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


# model_type -> default `target_modules` when the config leaves them unset. LoRA's table, except that InfLoRA's paper
# adapts the key and value projections of ViTs. transformers 5.x names them `k_proj` / `v_proj` (older releases:
# `key` / `value`); both are listed, PEFT only needs one name of a list to match.
INFLORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    model_type: list(modules) for model_type, modules in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()
}
INFLORA_TARGET_MODULES_MAPPING.update(
    {
        "vit": ["k_proj", "v_proj", "key", "value"],
        "deit": ["k_proj", "v_proj", "key", "value"],
        "dinov2": ["k_proj", "v_proj", "key", "value"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "gpt2": ["c_attn"],
        "t5": ["q", "v"],
        "mt5": ["q", "v"],
        "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"],
        "qwen2": ["q_proj", "v_proj"],
        "qwen3": ["q_proj", "v_proj"],
    }
)
