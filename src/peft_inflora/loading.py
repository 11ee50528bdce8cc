"""Checking and resizing a saved continual state before it is loaded, and the undo of a failed load.

``InfLoRAConfig.from_pretrained`` checks the weights file of a local adapter folder (:func:`check_adapter_weights`)
before PEFT injects any layer; the state dict is then checked against the layers it is loaded into and the continual
state resized to the saved shapes (:func:`checked_load_plan`, :func:`resize_for_load`); a load that fails before any
weight is set takes the freshly injected adapter out of the model again (:func:`undo_failed_load`).
:class:`AdapterFileMixin` holds the two tuner hooks (``_get_adapter_state_dict``,
``_remap_adapter_state_dict_for_load``) through which PEFT's saving and loading reach this module and
:mod:`.storage`.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Union

import torch
from peft.tuners.tuners_utils import _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .errors import AdapterFileError
from .layer import InfLoRALayer
from .storage import expand_shared_state, memory_storage_dtype, shared_state_for_save


if TYPE_CHECKING:
    from .config import InfLoRAConfig


def check_adapter_weights(folder: Union[str, os.PathLike]) -> None:
    """Check the weights file of a local adapter folder without loading any tensor (nothing is unpickled).

    * ``adapter_model.safetensors`` present: its header must parse and cover the file (catches truncated and
      corrupted files; NaN / inf values and shapes are checked when the weights are loaded into the model);
    * only ``adapter_model.bin`` present: refused. It is a pickle file, and unpickling can run arbitrary code;
      peft-inflora only loads safetensors;
    * neither: nothing to check here (a config-only folder is fine for reading the config).

    Raises:
        AdapterFileError: naming the file and what to do.
    """
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    folder = str(folder)
    safetensors_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    pickle_file = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(safetensors_file):
        from safetensors import safe_open

        try:
            with safe_open(safetensors_file, framework="pt") as handle:
                list(handle.keys())
        except Exception as exc:  # SafetensorError, OSError, ...
            raise AdapterFileError(
                f"The adapter weights file {safetensors_file} cannot be read ({type(exc).__name__}: {exc}): it is "
                "truncated or corrupted, e.g. by an interrupted download or copy. Download or copy the adapter again "
                "(for the Hub: delete it from the Hugging Face cache first), or save it again with "
                "model.save_pretrained(folder)."
            ) from exc
    elif os.path.isfile(pickle_file):
        raise AdapterFileError(
            f"{folder} holds the adapter weights only as {WEIGHTS_NAME}, a pickle file, and no "
            f"{SAFETENSORS_WEIGHTS_NAME}: peft-inflora loads adapter weights only from safetensors, because "
            "unpickling a file can run arbitrary code. Save the adapter again with model.save_pretrained(folder) "
            "(safetensors is the default; do not pass safe_serialization=False), or, if you trust the file, "
            f"convert it once: safetensors.torch.save_file(torch.load('{pickle_file}', weights_only=True), "
            f"'{safetensors_file}')."
        )


def checked_load_plan(model: nn.Module, config: Any, adapter_name: str,
                      state_dict: dict[str, torch.Tensor]) -> list[tuple]:
    """Every InfLoRA tensor of the checkpoint, checked against the layers it is loaded into: present, the
    layer's shapes, finite, consistent ranks. Raises ``ValueError`` naming the file and what to do."""
    source = getattr(config, "_loaded_from", None)
    where = f"The adapter in {source}" if source else "The adapter checkpoint"
    trained_on = getattr(config, "base_model_name_or_path", None)
    base_hint = f" ({trained_on})" if trained_on else ""
    prefix = "base_model.model."
    uses_prefix = any(k.startswith(prefix) for k in state_dict)
    plan = []
    for module_name, module in model.named_modules():
        if not isinstance(module, InfLoRALayer) or adapter_name not in module.inflora_A:
            continue
        for attr in InfLoRALayer.resizable_state_names + ("inflora_memory_form",):
            key = f"{module_name}.{attr}.{adapter_name}"
            if uses_prefix and not key.startswith(prefix):
                key = prefix + key
            if key not in state_dict:
                raise ValueError(
                    f"{where} has no '{key}': it is truncated, or was saved from a model with other adapted "
                    "layers. Load it onto the base model and target_modules it was trained with"
                    f"{base_hint}, or download / copy the adapter again."
                )
            plan.append((module, attr, state_dict[key], key))
    saved = {(id(m), a): t for m, a, t, _ in plan}
    for module, attr, tensor, key in plan:
        fixed = {"inflora_A": (0, module.out_features), "inflora_B": (1, module.in_features),
                 "inflora_past_A": (0, module.out_features), "inflora_past_B": (1, module.in_features),
                 "inflora_memory": (0, module.in_features)}.get(attr)
        vectors = ("inflora_task_ranks", "inflora_energy_thresholds")
        ndim = 0 if attr == "inflora_memory_form" else 1 if attr in vectors else 2
        if tensor.dim() != ndim or (fixed is not None and tensor.shape[fixed[0]] != fixed[1]):
            raise ValueError(
                f"{where}: '{key}' has shape {tuple(tensor.shape)} but the base model's layer is "
                f"{module.out_features} x {module.in_features}: this adapter was saved for a base model with "
                f"other shapes. Load it onto the base model it was trained on{base_hint}."
            )
        if attr in ("inflora_A", "inflora_B", "inflora_past_A", "inflora_past_B", "inflora_memory") and (
                not torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: '{key}' holds NaN or inf values: the adapter file is corrupted. Download "
                             "or copy the adapter again, or save it again from the model it came from.")
    layer_names = {id(m): k.rsplit(".inflora_", 1)[0] for m, _, _, k in plan}
    for module in {id(m): m for m, _, _, _ in plan}.values():
        get = lambda attr: saved[(id(module), attr)]  # noqa: E731
        consistent = (
            get("inflora_A").shape[1] == get("inflora_B").shape[0]
            and get("inflora_past_A").shape[1] == get("inflora_past_B").shape[0]
            and int(get("inflora_task_ranks").sum()) == get("inflora_past_B").shape[0]
            and get("inflora_energy_thresholds").numel() == get("inflora_task_ranks").numel()
            and bool((get("inflora_task_ranks") >= 0).all())
            and int(get("inflora_memory_form")) in (0, 1)
            and get("inflora_memory").shape[1] <= module.in_features
        )
        if not consistent:
            raise ValueError(
                f"{where}: the continual state saved for layer '{layer_names[id(module)]}' is inconsistent "
                "(ranks of A, B, the past factors and task_ranks do not agree): the adapter file is corrupted. "
                "Download or copy the adapter again, or save it again from the model it came from."
            )
    return plan


def resize_for_load(plan: list[tuple], adapter_name: str) -> None:
    """Resize the continual-state tensors of every layer in ``plan`` (from :func:`checked_load_plan`) to the saved
    shapes, which grow with the tasks learned, so the checkpoint loads into them. With ``fold="base"`` the saved
    finished tasks are added into the base weights (replacing any folded before)."""
    saved = {(id(m), a): t for m, a, t, _ in plan}
    for module, attr, tensor, _ in plan:
        if attr == "inflora_past_A" and module.fold[adapter_name] == "base":
            module.remove_folded_past(adapter_name)  # before its factors are replaced
    for module, attr, tensor, _ in plan:
        container = getattr(module, attr)
        current = container[adapter_name]
        if current.shape != tensor.shape:
            new = torch.zeros(tensor.shape, dtype=current.dtype, device=current.device)
            container[adapter_name] = (nn.Parameter(new, requires_grad=current.requires_grad)
                                       if isinstance(current, nn.Parameter) else new)
        if attr == "inflora_past_A" and module.fold[adapter_name] == "base":
            device = current.device
            module.add_past_to_base(tensor.to(device), saved[(id(module), "inflora_past_B")].to(device),
                                    saved[(id(module), "inflora_task_ranks")], sign=1.0)


def undo_failed_load(model: nn.Module, adapter_name: str) -> None:
    """After loading adapter weights failed: take the adapter out of ``model`` (a ``PeftModel``) again, so that the
    base model the caller passed to ``PeftModel.from_pretrained`` is left as it was (its modules, weights and
    ``requires_grad`` flags), and ``load_adapter`` leaves the other adapters as they were. Best effort: a failure here
    must not hide the load error."""
    from .model import InfLoRAModel  # here: model.py imports this module

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, InfLoRAModel) or adapter_name not in tuner.peft_config:
        return  # layers injected by other means (e.g. transformers' integration): nothing we can safely undo
    layers = [m for m in tuner.model.modules() if isinstance(m, InfLoRALayer) and adapter_name in m.inflora_A]
    if any(layer.tasks_done(adapter_name) or layer.task_in_progress(adapter_name) for layer in layers):
        return  # never throw away learned state: only a freshly injected, empty adapter is taken out
    try:
        if len(tuner.peft_config) > 1:
            tuner.delete_adapter(adapter_name)
            return
        base = tuner.model
        for key, module in list(base.named_modules()):
            if isinstance(module, InfLoRALayer):
                original = module.get_base_layer()
            elif isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save copies made for the adapter
                original = module.original_module
            else:
                continue
            try:
                parent, _, child_name = _get_submodules(base, key)
            except AttributeError:  # inside a wrapper that was already replaced
                continue
            setattr(parent, child_name, original)
        if "peft_config" in base.__dict__:
            del base.peft_config
        flags = getattr(tuner, "_requires_grad_before_injection", {})
        for name, param in base.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])
    except Exception:  # pragma: no cover - defensive
        warnings.warn(f"Could not take the adapter '{adapter_name}' out of the model after the failed load.")


class AdapterFileMixin:
    """The tuner's hooks into PEFT's saving and loading (mixed into ``InfLoRAModel`` before ``BaseTuner``): what
    ``save_pretrained`` writes (one copy per input group, :mod:`.storage`) and the checks and resizing before
    ``load_state_dict`` (this module)."""

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: InfLoRAConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` writes: PEFT's selection of the adapter's tensors, with ``inflora_B``,
        ``inflora_past_B`` and ``inflora_memory`` kept once per input group (the other layers of the group name the
        layer that holds them) and the memory in ``config.memory_storage_dtype``. See :mod:`peft_inflora.storage`."""
        dtype = memory_storage_dtype(config)  # a bad value raises before anything is written
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return shared_state_for_save(to_return, adapter_name, memory_dtype=dtype)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: InfLoRAConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Before loading: check every layer's saved state is present and fits the base model, then resize the
        continual-state tensors (their shapes grow with the tasks learned) so the checkpoint loads into them. With
        ``fold="base"`` the saved finished tasks are added into the base weights (replacing any folded before).
        Tensors saved once per input group are first copied back to every layer of the group, and a memory saved in
        16 bits is re-orthonormalised (:func:`peft_inflora.storage.expand_shared_state`; files with one copy per
        layer load as they are). See :mod:`peft_inflora.loading`."""
        # set by InfLoRAConfig.from_pretrained: this adapter was injected by the load now running (PeftModel.
        # from_pretrained / load_adapter of a new adapter), so a failure may take it out again
        fresh = config.__dict__.pop("_undo_if_load_fails", False)
        try:
            source = getattr(config, "_loaded_from", None)
            where = f"The adapter in {source}" if source else "The adapter checkpoint"
            state_dict = expand_shared_state(state_dict, where)
            state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            plan = checked_load_plan(model, config, adapter_name, state_dict)
        except Exception:
            if fresh:
                undo_failed_load(model, adapter_name)  # nothing was loaded yet: leave the base model as it was given
            raise
        resize_for_load(plan, adapter_name)
        return state_dict
