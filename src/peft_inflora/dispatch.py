"""Which InfLoRA layer class adapts a targeted module, and the checks creating it would make.

``torch.nn.Linear`` itself and transformers' ``Conv1D`` get :class:`~peft_inflora.layer.Linear`, bitsandbytes'
``Linear4bit`` / ``Linear8bitLt`` their thin subclasses (:mod:`peft_inflora.bnb`); anything else is refused before
the first module is replaced (``InfLoRAModel._prepare_model`` checks every target first).
"""

from __future__ import annotations

from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bnb import check_quantized_target, quantized_layer_class
from .layer import Linear


def _module_class(module: nn.Module) -> type:
    """The class that defines ``module``'s computation: FSDP2's ``fully_shard`` (and ``replicate``) swap a module's
    class for a subclass ``(FSDPModule, cls)`` that adds sharding only; that subclass counts as ``cls``."""
    cls = type(module)
    while len(cls.__bases__) == 2 and cls.__bases__[0].__module__.startswith("torch.distributed."):
        cls = cls.__bases__[1]
    return cls


def _layer_class_for(target: nn.Module) -> Optional[type]:
    """The InfLoRA layer class for a targeted module: ``torch.nn.Linear`` itself (not a subclass: a subclass may
    store or use its weight otherwise, and merging / the cached past weight would then be wrong), transformers'
    ``Conv1D``, or a supported bitsandbytes layer (:mod:`peft_inflora.bnb`); ``None`` for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    quantized = quantized_layer_class(base)
    if quantized is not None:
        return quantized
    if _module_class(base) is nn.Linear or isinstance(base, Conv1D):
        return Linear
    return None


def _unsupported_module_error(key: str, target: nn.Module) -> TypeError:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    cls = _module_class(base)
    lookalike = (
        f" {cls.__module__}.{cls.__qualname__} is a subclass of torch.nn.Linear but not torch.nn.Linear itself: "
        "InfLoRA cannot know how it stores and uses its weight (quantized and customised layers differ), so merging "
        "and the forward could silently be wrong."
        if isinstance(base, nn.Linear) else ""
    )
    return TypeError(
        f"Target module '{key}' of type {cls.__name__} is not supported by InfLoRA: only torch.nn.Linear and "
        f"transformers' Conv1D are supported, and bitsandbytes' Linear4bit / Linear8bitLt.{lookalike} Remove it from "
        "`target_modules` (or narrow the pattern). Nothing was changed."
    )


def _check_target(config, key: str, target: nn.Module) -> None:
    """The checks layer creation would make for one targeted module, without creating anything."""
    if _layer_class_for(target) is None:
        raise _unsupported_module_error(key, target)
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    check_quantized_target(key, base, config.fold)
    in_features, out_features = _get_in_out_features(base)
    rank_pattern = config.rank_pattern or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), config.r)
    if in_features is not None and out_features is not None and r > min(in_features, out_features):
        limit = min(in_features, out_features)
        raise ValueError(
            f"r={r} is larger than layer '{key}' allows (in_features={in_features}, out_features={out_features}): "
            f"use r <= {limit}, or give this layer a smaller rank with rank_pattern={{'{key}': {limit}}}."
        )
