"""peft-inflora: InfLoRA (Interference-Free Low-Rank Adaptation for Continual Learning, CVPR 2024) for PEFT.

Importing the package registers the ``"inflora"`` method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the ``AutoPeftModel*`` classes know it.

The method (config, layers, model, statistics, subspace math, export) needs only torch, transformers, peft and
safetensors. The continual application's names (``ContinualTrainer``, ``ContinualResult``, ...) are importable from
here too, but are loaded on first use (PEP 562 ``__getattr__``), so ``import peft_inflora`` does not pull in what the
application needs (datasets, evaluate, matplotlib).
"""

from . import errors as _errors
from .config import INFLORA_TARGET_MODULES_MAPPING, InfLoRAConfig, check_adapter_weights
from .errors import *  # noqa: F403 (every exception and warning: errors.__all__)
from .export import ExportedLayer, LoraExport
from .layer import InfLoRALayer, Linear
from .model import InfLoRAModel, LayerCapacity, LayerInterference
from .registry import install_lora_conversion as _install_lora_conversion
from .registry import register as _register


_register(InfLoRAConfig, InfLoRAModel)
_install_lora_conversion()  # peft.save_as_lora / convert_to_lora export InfLoRA as to_lora does

__version__ = "0.1.0"

# The continual application (peft_inflora.continual), imported on first use (PEP 562): `import peft_inflora` needs only
# torch, transformers, peft and safetensors, and loads no Trainer machinery, matplotlib, datasets or evaluate.
_CONTINUAL_NAMES = (
    "ContinualArguments",
    "ContinualCallback",
    "ContinualMixin",
    "ContinualResult",
    "ContinualSeq2SeqTrainer",
    "ContinualSeq2SeqTrainingArguments",
    "ContinualTask",
    "ContinualTrainer",
    "ContinualTrainingArguments",
    "HubPushError",
    "TaskMetric",
    "compare_table",
    "task_revision_name",
    "task_revisions",
    "tokenize_instruction_dataset",
)


def __getattr__(name: str):
    if name in _CONTINUAL_NAMES:
        from . import continual

        value = getattr(continual, name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CONTINUAL_NAMES))


__all__ = [
    *_errors.__all__,
    "ExportedLayer",
    "INFLORA_TARGET_MODULES_MAPPING",
    "InfLoRAConfig",
    "InfLoRALayer",
    "InfLoRAModel",
    "LayerCapacity",
    "LayerInterference",
    "LoraExport",
    "Linear",
    "check_adapter_weights",
    *_CONTINUAL_NAMES,
]
