"""Validation of :class:`~peft_inflora.config.InfLoRAConfig`: the choice lists, the field validators and the rules.

Every rule raises ``ValueError`` naming the field, the value given and what to use instead; :func:`validate_fields`
runs them all (``InfLoRAConfig.__post_init__`` and again at every ``begin_task`` / ``end_task``, since fields may be
changed after the config is built). Unknown fields raise :class:`~peft_inflora.errors.UnknownConfigFieldError`.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from dataclasses import fields
from typing import Any, Optional, Union

from .errors import UnknownConfigFieldError
from .subspace import ENERGIES, MEMORY_KINDS, SOLVERS, sketch_size


# the choice lists of the config's fields (memory, energy and solver are the subspace math's own lists)
DESIGNS = ("eigen", "random")
MEMORIES = MEMORY_KINDS
FOLDS = ("adapter", "base")
STATISTICS_DTYPES = ("float32", "float64")
MEMORY_STORAGE_DTYPES = ("float32", "bfloat16", "float16")

__all__ = ["DESIGNS", "ENERGIES", "FOLDS", "MEMORIES", "MEMORY_STORAGE_DTYPES", "SOLVERS", "STATISTICS_DTYPES",
           "validate_fields"]


# ---------------------------------------------------------------------------------------------- the rules
def validate_fields(config: Any) -> None:
    """Check and normalise every field of an ``InfLoRAConfig`` in place (lists of module names become sets, ints
    given as other integral types become ints, ...). Raises ``ValueError`` at the first bad field."""
    config.r = _positive_int("r", config.r, "use e.g. 10 (paper) or 8")
    config.target_modules = _module_names("target_modules", config.target_modules)
    config.exclude_modules = _module_names("exclude_modules", config.exclude_modules)
    config.fan_in_fan_out = _boolean("fan_in_fan_out", config.fan_in_fan_out)

    if config.modules_to_save is not None:
        if isinstance(config.modules_to_save, str) or not isinstance(config.modules_to_save, (list, tuple, set)):
            raise ValueError(
                f"modules_to_save must be a list of module names or None, got {config.modules_to_save!r}: "
                "e.g. ['classifier']."
            )
        _all_strings("modules_to_save", config.modules_to_save)
        config.modules_to_save = list(config.modules_to_save)

    if config.layers_to_transform is not None:
        if isinstance(config.layers_to_transform, (list, tuple)):
            config.layers_to_transform = [
                _non_negative_int("layers_to_transform", i, "use layer indices like [0, 1, 2]")
                for i in config.layers_to_transform
            ]
        else:
            config.layers_to_transform = _non_negative_int(
                "layers_to_transform", config.layers_to_transform, "use a layer index or a list of them"
            )
        if isinstance(config.target_modules, str):
            raise ValueError(
                f"layers_to_transform={config.layers_to_transform!r} cannot be used with target_modules given as a "
                f"regex ({config.target_modules!r}): pass target_modules as a list of names, or put the layer "
                "indices into the regex and drop layers_to_transform."
            )
    if config.layers_pattern is not None:
        if config.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={config.layers_pattern!r} is set but layers_to_transform is not: set "
                "layers_to_transform to the layer indices to adapt, or drop layers_pattern."
            )
        if isinstance(config.layers_pattern, (list, tuple)):
            _all_strings("layers_pattern", config.layers_pattern)
            config.layers_pattern = list(config.layers_pattern)
        elif not isinstance(config.layers_pattern, str) or not config.layers_pattern:
            raise ValueError(
                f"layers_pattern must be a module-list name like 'layers' or 'h' (or a list of them), got "
                f"{config.layers_pattern!r}."
            )

    if config.rank_pattern is None:
        config.rank_pattern = {}
    if not isinstance(config.rank_pattern, dict):
        raise ValueError(
            f"rank_pattern must be a dict of module name or regex -> rank, got {config.rank_pattern!r}: e.g. "
            "{'k_proj': 16}."
        )
    for key, value in config.rank_pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"rank_pattern keys must be non-empty module names or regexes, got {key!r}.")
        _regex("rank_pattern", key)
        config.rank_pattern[key] = _positive_int(f"rank_pattern[{key!r}]", value, "use a rank >= 1")

    config.design = _choice("design", config.design, DESIGNS, "'eigen' for the paper's ViT design")
    config.design_scale = _real("design_scale", config.design_scale)
    if not (math.isfinite(config.design_scale) and config.design_scale > 0):
        raise ValueError(
            f"design_scale must be a finite number > 0, got {config.design_scale!r}: use the default "
            f"1/sqrt(3) = {1 / math.sqrt(3):.6f} (authors' code)."
        )
    config.memory = _choice("memory", config.memory, MEMORIES, "'dualgpm' as in the paper")
    config.energy_threshold = _real("energy_threshold", config.energy_threshold)
    if not (0.0 < config.energy_threshold <= 1.0):  # also False for NaN
        raise ValueError(
            f"energy_threshold must be in (0, 1], got {config.energy_threshold!r}: use e.g. 0.95 (paper's lambda "
            "for ViTs); it is a fraction of energy, not a percentage."
        )
    config.energy = _choice("energy", config.energy, ENERGIES, "'squared', what published thresholds assume")
    if config.total_tasks is not None:
        config.total_tasks = _positive_int(
            "total_tasks", config.total_tasks, "set it to the number of tasks in the sequence, or None"
        )
    config.adaptive_threshold = _boolean("adaptive_threshold", config.adaptive_threshold)
    if config.adaptive_threshold and config.total_tasks is None:
        raise ValueError(
            "adaptive_threshold=True plans each layer's capacity for the tasks still to come, so it needs "
            "total_tasks: set total_tasks to the number of tasks in the sequence, or adaptive_threshold=False."
        )
    config.fold = _choice("fold", config.fold, FOLDS, "'adapter' to keep the base weights untouched")
    config.cache_past_weight = _boolean("cache_past_weight", config.cache_past_weight)
    if config.statistics_max_batches is not None:
        config.statistics_max_batches = _positive_int(
            "statistics_max_batches", config.statistics_max_batches, "use None to read all batches, or e.g. 1000"
        )
    if config.statistics_max_tokens is not None and config.statistics_max_tokens != "auto":
        config.statistics_max_tokens = _positive_int(
            "statistics_max_tokens", config.statistics_max_tokens, "use 'auto', None to read all batches, or e.g. "
            "65536"
        )
    config.statistics_dtype = _choice(
        "statistics_dtype", config.statistics_dtype, STATISTICS_DTYPES, "'float64' unless memory is tight"
    )
    config.memory_storage_dtype = _choice(
        "memory_storage_dtype", getattr(config, "memory_storage_dtype", "float32"), MEMORY_STORAGE_DTYPES,
        "'float32' (exact) or 'bfloat16' / 'float16' (half the memory's bytes, re-orthonormalised on load)"
    )
    if config.statistics_sketch is not None and config.statistics_sketch != "auto":
        config.statistics_sketch = _positive_int(
            "statistics_sketch", config.statistics_sketch, "use 'auto' (256 rows), an int like 512, or None for the "
            "exact covariance"
        )
    if config.statistics_sketch is not None:
        ell, rank = sketch_size(config.statistics_sketch), max([config.r, *config.rank_pattern.values()])
        if ell < rank:
            raise ValueError(
                f"statistics_sketch={config.statistics_sketch!r} keeps {ell} directions per input group, fewer than "
                f"the rank {rank} a task's B_t needs: use statistics_sketch >= {rank} ('auto' = 256 rows, "
                "ideally several times the rank), or None for the exact covariance."
            )
    config.share_input_statistics = _boolean("share_input_statistics", config.share_input_statistics)
    config.solver = _choice("solver", config.solver, SOLVERS, "'auto' (exact up to 1024 input features)")
    config.random_seed = _non_negative_int("random_seed", config.random_seed, "use e.g. 0")
    if config.random_seed >= 2**63:
        raise ValueError(f"random_seed must be < 2**63, got {config.random_seed!r}: use e.g. 0.")
    config.init_weights = _boolean("init_weights", config.init_weights)


# ---------------------------------------------------------------------------------------------- unknown fields
def _check_known_fields(cls: type, kwargs: dict) -> None:
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        # the wording must not contain "got an unexpected keyword argument": PEFT's PeftConfig.from_peft_type catches
        # TypeErrors with that text and retries without the fields (with a warning to upgrade PEFT, the wrong package)
        raise UnknownConfigFieldError(
            f"{cls.__name__} of peft-inflora {_package_version()} has no field(s) {unknown}. If they come from an "
            "adapter_config.json saved by a newer peft-inflora, upgrade it: pip install -U peft-inflora (they are not "
            "ignored because they may change how later tasks are designed or protected; delete them from "
            "adapter_config.json only if you are sure they do not matter). If they are typos, the known fields are: "
            f"{sorted(known)}."
        )


def _refuse_unknown_fields(init):
    """Wrap the dataclass ``__init__`` so unknown keywords raise :class:`UnknownConfigFieldError` (also when PEFT's
    ``PeftConfig.from_pretrained`` builds the config, which bypasses :meth:`InfLoRAConfig.check_kwargs`)."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _check_known_fields(type(self), kwargs)
        init(self, *args, **kwargs)

    return __init__


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("peft-inflora")
    except PackageNotFoundError:
        return "(not installed)"


# ---------------------------------------------------------------------------------------------- field validators
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, hint: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}: {hint}.")
    return int(value)


def _non_negative_int(name: str, value: Any, hint: str) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}: {hint}.")
    return int(value)


def _real(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} of type {type(value).__name__}.")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}.")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...], hint: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}: use {hint}.")
    return value


def _regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({exc}); fix or escape it.") from exc


def _all_strings(name: str, values) -> None:
    bad = [value for value in values if not isinstance(value, str) or not value]
    if bad:
        raise ValueError(f"{name} must contain only non-empty module names, got {bad!r} in {values!r}.")


def _module_names(name: str, value: Any) -> Optional[Union[set[str], str]]:
    """``None``, a regex string, or a set of names (lists are turned into sets, as PEFT's configs do)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string: give module names like ['k_proj'] or a regex.")
        _regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        _all_strings(name, value)
        return set(value)
    raise ValueError(
        f"{name} must be a list of module names or a regex string, got {value!r} of type {type(value).__name__}: "
        "e.g. ['k_proj', 'v_proj']."
    )
