"""Export the finished tasks of an InfLoRA adapter as a plain PEFT LoRA adapter (``LoraConfig``).

For an adapted layer ``W`` (``d_out x d_in``) the finished tasks add one low-rank update

    dW = past_A @ past_B        past_A: (d_out, R),  past_B: (R, d_in),  R = sum_j r_j

which is exactly what a LoRA layer adds, ``scaling * lora_B @ lora_A`` with ``lora_B`` ``(d_out, r)`` and ``lora_A``
``(r, d_in)``. So:

* **exact** (``rank=None``): ``lora_A = past_B``, ``lora_B = past_A``, ``r = R`` and ``lora_alpha = R`` (scaling 1);
  layers whose ``R`` differs from the most common one get ``rank_pattern`` / ``alpha_pattern`` entries.
* **truncated** (``rank=k``): the best rank-``k`` approximation of ``dW`` (Eckart-Young), computed from the factors
  without forming ``dW``: ``past_A = Q1 R1`` and ``past_B^T = Q2 R2`` (reduced QR, ``R1`` ``(a, R)``, ``R2``
  ``(b, R)``, ``a = min(d_out, R)``, ``b = min(d_in, R)``), ``R1 R2^T = U diag(s) V^T`` (SVD of an ``a x b`` matrix),
  so ``dW = (Q1 U) diag(s) (Q2 V)^T`` and the singular values of ``dW`` are ``s``. Keeping the top
  ``k' = min(k, len(s))`` and splitting ``s`` evenly between the factors::

      lora_B = Q1 U_k' diag(sqrt(s_k'))         (d_out, k')
      lora_A = diag(sqrt(s_k')) V_k'^T Q2^T     (k', d_in)
      relative error = ||dW - lora_B lora_A||_F / ||dW||_F = sqrt(sum_{i > k'} s_i^2) / sqrt(sum_i s_i^2)

  (0.0 when ``dW = 0``).
* **energy share** (``rank=t``, a float in ``(0, 1]``, what PEFT's ``convert_to_lora`` calls a threshold): per layer
  the truncation above with the fewest ``k'`` leading singular values that hold the share ``t`` of the energy,
  ``sum_{i <= k'} s_i^2 >= t * sum_i s_i^2``, so the relative error is at most ``sqrt(1 - t)``.

The export is relative to the *pristine* base model, for ``fold="adapter"`` and ``fold="base"`` alike: the finished
tasks' factors are stored in the adapter in both cases. Factors are written in float32 (computed in float64 when
truncating). Layers with ``R = 0`` are left out. ``target_modules`` lists the exported modules by full name (an
anchored regex instead, if some other module of the model would also match a listed name), ``fan_in_fan_out`` is kept
(GPT-2 ``Conv1D``), and the adapter's ``modules_to_save`` copies (e.g. a trained classifier head) are written in the
key format PEFT saves them in, so ``PeftModel.from_pretrained(base_model, folder)`` of plain ``peft`` loads the result
with no ``peft_inflora`` installed.

PEFT's own conversion, ``peft.save_as_lora(folder, model, rank)`` / ``peft.convert_to_lora(model, rank)``, takes the
same path: it asks every layer ``supports_lora_conversion``, which runs :func:`check_exportable`, and converts each
InfLoRA layer with :func:`convert_layer_to_lora` (routed there by
:func:`peft_inflora.registry.install_lora_conversion`), so it writes the same tensors; the ``LoraConfig`` is
PEFT's (no ``task_type``, ``revision``, ``fan_in_fan_out``). See ``docs/export.md``.
"""

from __future__ import annotations

import collections
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, get_pattern_key
from safetensors.torch import save_file
from torch import nn

from .errors import TaskLifecycleError
from .layer import InfLoRALayer
from .subspace.factors import (  # noqa: F401  (public here too: the export's math)
    ExportRank,
    energy_rank,
    lora_factors,
    relative_truncation_error,
    spectrum_of_product,
)


#: ``rank`` of an export: ``None`` (exact), an int ``k >= 1`` (largest rank per layer), a float in ``(0, 1]`` (share
#: of each layer's energy to keep)
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# files whose presence means a folder already holds a PEFT adapter
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, "adapter_model.bin")
# PeftModel saves the keys of the wrapped model under this prefix
PEFT_KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExportedLayer:
    """One adapted layer in a LoRA export.

    Attributes:
        name: module name in the base model (the key in ``target_modules``).
        source_rank: ``R``, the summed rank of the finished tasks' branches (columns of ``past_A``).
        rank: rank of the exported LoRA factors: ``R`` (exact), ``min(k, len(singular_values))`` (truncated), or
            ``energy_rank(singular_values, t)`` (energy share ``t``).
        relative_error: ``||dW - lora_B lora_A||_F / ||dW||_F`` of the truncation, from the singular values in
            float64 (0.0 for the exact export and when ``dW = 0``). The float32 rounding of the written factors adds
            about 1e-7 relative on top.
        singular_values: the singular values of ``dW = past_A past_B``, float64, descending (``min(d_out, d_in, R)``
            of them): what truncating to any rank would keep (the spectrum to choose ``rank`` from).
        fan_in_fan_out: the base layer stores its weight as ``(d_in, d_out)`` (transformers' ``Conv1D``).
    """

    name: str
    source_rank: int
    rank: int
    relative_error: float
    singular_values: torch.Tensor = field(repr=False)
    fan_in_fan_out: bool = False


@dataclass
class LoraExport:
    """A LoRA adapter equal to (or, truncated, the best low-rank approximation of) an InfLoRA adapter's finished
    tasks, made by :meth:`InfLoRAModel.to_lora`.

    Attributes:
        config: the ``peft.LoraConfig`` (``lora_alpha == r`` per layer: scaling 1, like InfLoRA's branches).
        state_dict: the adapter's tensors with the keys ``PeftModel.save_pretrained`` writes
            (``base_model.model.<module>.lora_A.weight`` ``(r, d_in)``, ``...lora_B.weight`` ``(d_out, r)``, float32,
            and the ``modules_to_save`` copies as ``base_model.model.<module>.<parameter>``), on the CPU.
        layers: per exported module name, its :class:`ExportedLayer` (ranks, truncation error, spectrum).
        adapter_name: the InfLoRA adapter this was exported from.
        tasks: number of finished tasks the export holds.
    """

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    layers: dict[str, ExportedLayer]
    adapter_name: str
    tasks: int

    @property
    def exact(self) -> bool:
        """True when every layer kept its full rank ``R`` with no truncation error."""
        return all(layer.rank == layer.source_rank and layer.relative_error == 0.0 for layer in self.layers.values())

    @property
    def relative_errors(self) -> dict[str, float]:
        """``||dW - dW_k||_F / ||dW||_F`` per exported module (0.0 for every layer of an exact export)."""
        return {name: layer.relative_error for name, layer in self.layers.items()}

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], overwrite: bool = False) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``save_directory`` (created if
        needed), the files ``PeftModel.from_pretrained(base_model, save_directory)`` of plain ``peft`` reads.

        Both files are written to a temporary folder next to ``save_directory`` first and then moved in, so a failure
        leaves no half-written adapter. Other files in the folder are left alone.

        Raises:
            FileExistsError: the folder already holds an adapter (``adapter_config.json`` / ``adapter_model.*``) and
                ``overwrite`` is False, or ``save_directory`` is a file.
        """
        directory = check_save_directory(save_directory, overwrite)
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".lora-export-", dir=parent)
        try:
            self.config.save_pretrained(staging)
            save_file(self.state_dict, os.path.join(staging, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
            os.makedirs(directory, exist_ok=True)
            for name in (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME):  # the config last: it marks the folder as an adapter
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- checks
def check_export_rank(rank: Any) -> ExportRank:
    """``rank`` as ``None`` (exact export), an int >= 1 (largest rank per layer) or a float in ``(0, 1]`` (share of
    each layer's energy to keep). Raises ``ValueError`` for anything else."""
    if rank is None:
        return None
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and rank >= 1:
        return int(rank)
    if isinstance(rank, float) and 0.0 < rank <= 1.0:
        return rank
    raise ValueError(
        f"rank must be an int >= 1 (the largest rank per layer of the exported LoRA), a float in (0, 1] (the share of "
        f"each layer's energy sum s_i^2 to keep, as in peft.save_as_lora) or None for the exact export (rank = sum "
        f"of the task ranks), got {rank!r}. Nothing was written."
    )


def check_exportable(layers: Mapping[Optional[str], InfLoRALayer], adapter_name: str) -> None:
    """Refuse an export of ``adapter_name`` that would not hold exactly its finished tasks, before anything is written.
    The one check of both export paths: :meth:`InfLoRAModel.to_lora` calls it with all the adapter's layers, and
    PEFT's ``convert_to_lora`` / ``save_as_lora`` reach it through each layer's ``supports_lora_conversion``, which
    PEFT asks of every tuner layer before it converts anything (``None`` keys: layers whose name is unknown there).

    Raises:
        TaskLifecycleError: a task is in progress (``end_task`` or ``abort_task`` first), or no task is finished.
        ValueError: a layer's finished tasks hold NaN or inf.
    """
    layers = {name: layer for name, layer in layers.items() if adapter_name in layer.inflora_A}
    if not layers:
        return
    tasks_done = next(iter(layers.values())).tasks_done(adapter_name)
    if any(layer.task_in_progress(adapter_name) for layer in layers.values()):
        raise TaskLifecycleError(
            f"Task {tasks_done + 1} of adapter '{adapter_name}' is in progress: the LoRA export holds finished tasks "
            "only. Call `end_task(batches)` to keep the task or `abort_task()` to discard it, then export "
            "(`to_lora` or `peft.save_as_lora`). Nothing was written."
        )
    if tasks_done == 0:
        raise TaskLifecycleError(
            f"Adapter '{adapter_name}' has no finished task: there is nothing to export. Learn a task with "
            "`begin_task(batches)`, training and `end_task(batches)` first. Nothing was written."
        )
    broken = [name for name, layer in layers.items()
              if not (torch.isfinite(layer.inflora_past_A[adapter_name]).all()
                      and torch.isfinite(layer.inflora_past_B[adapter_name]).all())]
    if broken:
        which = f"{len(broken)} layer(s) of adapter '{adapter_name}', e.g. '{broken[0]}'," if broken[0] is not None \
            else f"a layer of adapter '{adapter_name}'"
        raise ValueError(
            f"The finished tasks of {which} hold NaN or inf: the adapter is corrupted and cannot be exported. Load it "
            "again from its files. Nothing was written."
        )


def check_save_directory(save_directory: Union[str, os.PathLike], overwrite: bool) -> str:
    """The folder to write an export into, as a str. Raises ``TypeError`` for a non-path, ``FileExistsError`` when
    it is a file or already holds an adapter (unless ``overwrite``)."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a folder path (str or os.PathLike), got {save_directory!r}.")
    directory = os.fspath(save_directory)
    if not directory:
        raise ValueError("save_directory must not be empty: give the folder to write the LoRA adapter into.")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(
            f"save_directory '{directory}' is a file, not a folder: give a new or empty folder for the LoRA adapter. "
            "Nothing was written."
        )
    present = [name for name in ADAPTER_FILES if os.path.exists(os.path.join(directory, name))]
    if present and not overwrite:
        raise FileExistsError(
            f"'{directory}' already holds an adapter ({', '.join(present)}): give another folder, or pass "
            "overwrite=True to replace it. Nothing was written."
        )
    return directory


def layer_lora_factors(layer: InfLoRALayer, adapter_name: str, rank: ExportRank = None
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """:func:`lora_factors` of one layer's finished tasks (``inflora_past_A`` / ``inflora_past_B`` of
    ``adapter_name``, relative to the pristine base for both ``fold`` modes), or ``None`` when the layer holds no
    finished task of the adapter (``R = 0``: nothing to export). The per-layer step of both export paths."""
    if adapter_name not in layer.inflora_past_B or layer.inflora_past_B[adapter_name].shape[0] == 0:
        return None
    return lora_factors(layer.inflora_past_A[adapter_name], layer.inflora_past_B[adapter_name], rank)


def convert_layer_to_lora(layer: InfLoRALayer, rank: ExportRank, adapter_name: str = "default"
                          ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What PEFT's per-layer conversion returns (``peft.tuners.lora.conversion._convert_module_to_lora``, which
    :func:`peft_inflora.registry.install_lora_conversion` routes here for InfLoRA layers): ``(lora_A, lora_B, r)``
    from :func:`layer_lora_factors`, ``lora_A`` ``(r, d_in)``, ``lora_B`` ``(d_out, r)`` in PEFT's LoRA layout for
    ``nn.Linear`` and ``Conv1D`` alike. ``r = 0`` (empty factors) for a layer without a finished task: PEFT then lists
    it in ``exclude_modules``.

    Raises:
        ValueError: ``rank`` is not ``None``, an int >= 1 or a float in ``(0, 1]``.
    """
    rank = check_export_rank(rank)
    factors = layer_lora_factors(layer, adapter_name, rank)
    if factors is None:
        return torch.zeros(0, layer.in_features), torch.zeros(layer.out_features, 0), 0
    lora_A, lora_B, _, _ = factors
    return lora_A, lora_B, int(lora_A.shape[0])


# ---------------------------------------------------------------------------------------------- config
def _module_names_of_base(model: nn.Module) -> list[str]:
    """Names of the modules the pristine base model has: those of ``model`` without anything inside a tuner layer
    or a ``modules_to_save`` wrapper (the names PEFT will match ``target_modules`` against when loading)."""
    names, inner = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inner):
            continue
        names.append(name)
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            inner.append(name + ".")
    return names


def _targets_resolve(config: LoraConfig, module_names: Iterable[str], ranks: Mapping[str, int]) -> bool:
    """Whether PEFT's own matching, applied to ``config``, adapts exactly the modules of ``ranks`` with their ranks
    and scaling 1."""
    matched = {name for name in module_names if name and check_target_module_exists(config, name)}
    if matched != set(ranks):
        return False
    for name, r in ranks.items():
        got_r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        got_alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        if got_r != r or got_alpha != r:
            return False
    return True


def lora_config_for(ranks: Mapping[str, int], module_names: Iterable[str], *, fan_in_fan_out: bool,
                    modules_to_save: Optional[list[str]], task_type: Any, base_model_name_or_path: Optional[str],
                    revision: Optional[str]) -> LoraConfig:
    """The ``LoraConfig`` adapting exactly the modules of ``ranks`` (full names) with those ranks and scaling 1.

    ``r = lora_alpha`` is the most common rank; other layers get ``rank_pattern`` / ``alpha_pattern`` entries. The
    result is checked with PEFT's own matching against every module name of the base model; if a listed name is also
    the suffix of another module's name (PEFT matches ``target_modules`` entries as suffixes, pattern keys as regex
    suffixes), an anchored, escaped regex is used instead.
    """
    module_names = list(module_names)
    counts = collections.Counter(ranks.values())
    r = max(counts, key=lambda value: (counts[value], value))
    common = dict(r=r, lora_alpha=r, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0, bias="none",
                  init_lora_weights=True, inference_mode=True,
                  modules_to_save=list(dict.fromkeys(modules_to_save)) if modules_to_save is not None else None,
                  task_type=task_type, base_model_name_or_path=base_model_name_or_path, revision=revision)
    others = {name: rank for name, rank in sorted(ranks.items()) if rank != r}
    config = LoraConfig(target_modules=sorted(ranks), rank_pattern=dict(others), alpha_pattern=dict(others), **common)
    if _targets_resolve(config, module_names, ranks):
        return config
    escaped = {re.escape(name): rank for name, rank in others.items()}
    regex = "^(?:" + "|".join(re.escape(name) for name in sorted(ranks)) + ")$"
    config = LoraConfig(target_modules=regex, rank_pattern=dict(escaped), alpha_pattern=dict(escaped), **common)
    if not _targets_resolve(config, module_names, ranks):  # pragma: no cover - anchored escaped names always resolve
        raise RuntimeError("Could not express the exported modules as a LoraConfig that targets exactly them.")
    return config


# ---------------------------------------------------------------------------------------------- export
def modules_to_save_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` copies (e.g. a trained classifier head) with the keys
    ``PeftModel.save_pretrained`` writes: ``base_model.model.<module>.<parameter>`` (CPU copies).

    Raises:
        ValueError: the adapter uses another auxiliary wrapper (e.g. trainable tokens), which the export cannot carry.
    """
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for key, tensor in module.adapter_state_dict(adapter_name, module.state_dict()).items():
                state[f"{PEFT_KEY_PREFIX}{name}.{key}"] = tensor.detach().to("cpu").clone().contiguous()
        elif isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "_adapters", ()):
            raise ValueError(
                f"Adapter '{adapter_name}' trains module '{name}' through a {type(module).__name__}, which the LoRA "
                "export does not carry: only `modules_to_save` copies are exported. Nothing was written."
            )
    return state


def export_to_lora(model: nn.Module, layers: Mapping[str, InfLoRALayer], adapter_name: str, peft_config: Any,
                   rank: ExportRank = None) -> LoraExport:
    """Build the LoRA export of ``adapter_name``'s finished tasks (nothing is written; see
    :meth:`LoraExport.save_pretrained`). PEFT's ``convert_to_lora`` builds its adapter from the same per-layer
    factors (:func:`convert_layer_to_lora`) after the same checks (:func:`check_exportable`).

    Args:
        model: the model the InfLoRA layers sit in (``InfLoRAModel.model``), for module names and
            ``modules_to_save``.
        layers: the adapter's InfLoRA layers by module name.
        adapter_name: the InfLoRA adapter.
        peft_config: its ``InfLoRAConfig`` (``modules_to_save``, ``task_type``, base model name and revision).
        rank: ``None`` for the exact export, an int for the largest rank per layer, a float in ``(0, 1]`` for the
            share of each layer's energy to keep.

    Raises:
        TaskLifecycleError: a task is in progress, or no task is finished.
        ValueError: ``rank`` is not None, an int >= 1 or a float in ``(0, 1]``, a layer's finished tasks hold NaN or
            inf, no layer has a finished task, or the adapter uses an auxiliary wrapper other than ``modules_to_save``.
    """
    rank = check_export_rank(rank)
    check_exportable(layers, adapter_name)
    exported: dict[str, ExportedLayer] = {}
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        factors = layer_lora_factors(layer, adapter_name, rank)
        if factors is None:
            continue  # no finished task in this layer: nothing to add, left out of target_modules
        lora_A, lora_B, s, error = factors
        exported[name] = ExportedLayer(name=name, source_rank=int(layer.inflora_past_B[adapter_name].shape[0]),
                                       rank=int(lora_A.shape[0]), relative_error=error, singular_values=s,
                                       fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)))
        state[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = lora_A
        state[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = lora_B
    if not exported:
        raise ValueError(
            f"Adapter '{adapter_name}' has no finished task in any layer: there is nothing to export. Learn a task "
            "with `begin_task(batches)`, training and `end_task(batches)` first. Nothing was written."
        )
    state.update(modules_to_save_state(model, adapter_name))
    fan_in_fan_out = all(layer.fan_in_fan_out for layer in exported.values())
    config = lora_config_for(
        {name: layer.rank for name, layer in exported.items()},
        _module_names_of_base(model),
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=getattr(peft_config, "modules_to_save", None),
        task_type=getattr(peft_config, "task_type", None),
        base_model_name_or_path=getattr(peft_config, "base_model_name_or_path", None),
        revision=getattr(peft_config, "revision", None),
    )
    tasks = next(iter(layers.values())).tasks_done(adapter_name)
    return LoraExport(config=config, state_dict=state, layers=exported, adapter_name=adapter_name, tasks=tasks)
