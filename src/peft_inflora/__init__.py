"""peft-inflora: InfLoRA (Interference-Free Low-Rank Adaptation for Continual Learning, CVPR 2024) for PEFT.

Importing the package registers the ``"inflora"`` method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the ``AutoPeftModel*`` classes know it.
"""

from .bnb import QuantizedMergeWarning
from .config import (
    INFLORA_TARGET_MODULES_MAPPING,
    AdapterFileError,
    InfLoRAConfig,
    UnknownConfigFieldError,
    check_adapter_weights,
)
from .export import ExportedLayer, LoraExport
from .hub import HubPushError, task_revision_name, task_revisions
from .layer import InfLoRALayer, Linear, NoTaskInProgressError
from .model import (
    InfLoRAModel,
    LayerCapacity,
    LayerInterference,
    SubspaceExhaustedError,
    SubspaceWarning,
    TaskLifecycleError,
)
from .registry import install_lora_conversion as _install_lora_conversion
from .registry import register as _register
from .sketch import SketchWarning
from .statistics import StatisticsError
from .metrics import ContinualResult
from .trainer import ContinualCallback, ContinualTask, ContinualTrainer, tokenize_instruction_dataset

_register(InfLoRAConfig, InfLoRAModel)
_install_lora_conversion()  # peft.save_as_lora / convert_to_lora export InfLoRA as to_lora does

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "ContinualCallback",
    "ContinualResult",
    "ContinualTask",
    "ContinualTrainer",
    "ExportedLayer",
    "HubPushError",
    "tokenize_instruction_dataset",
    "INFLORA_TARGET_MODULES_MAPPING",
    "InfLoRAConfig",
    "InfLoRALayer",
    "InfLoRAModel",
    "LayerCapacity",
    "LayerInterference",
    "LoraExport",
    "Linear",
    "NoTaskInProgressError",
    "QuantizedMergeWarning",
    "SketchWarning",
    "StatisticsError",
    "SubspaceExhaustedError",
    "SubspaceWarning",
    "TaskLifecycleError",
    "UnknownConfigFieldError",
    "check_adapter_weights",
    "task_revision_name",
    "task_revisions",
]
