"""InfLoRAModel: wraps the target layers and runs the continual lifecycle of each adapter.

    begin_task(batches)  statistics pass -> C_t per input group -> design B_t (rows in the complement of the memory),
                         fresh A_t = 0: only A_t (and modules_to_save) train
    end_task(batches)    statistics pass with the trained branch -> GPM / DualGPM memory update -> fold A_t B_t into
                         the past (adapter factors or base weight)
    abort_task()         discard the current branch

Every check runs and every new tensor is computed before the first piece of state is replaced, so a failing call
leaves the adapter as it was.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features, _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bnb import check_quantized_target, prepare_quantized_model, quantized_layer_class
from .config import INFLORA_TARGET_MODULES_MAPPING, InfLoRAConfig
from .export import LoraExport, check_export_rank, check_save_directory, export_to_lora
from .layer import InfLoRALayer, Linear
from .sketch import sketch_size
from .statistics import InputGroup, collect_statistics
from .subspace import (
    Memory,
    captured_energy_ratio,
    design_eigen,
    design_random,
    energy_threshold,
    memory_capacity,
    update_memory,
)


class SubspaceExhaustedError(ValueError):
    """The memory of some layer spans its whole input space: a new task has no free direction to learn in."""


class TaskLifecycleError(RuntimeError):
    """begin_task / end_task / abort_task called out of order."""


class SubspaceWarning(UserWarning):
    """Fewer free directions than the configured rank remain in some layer."""


@dataclass
class LayerCapacity:
    """One adapted layer's memory after the tasks done so far.

    ``free_dimension = d_in - memory_dimension`` directions are left for the ``B_t`` of later tasks; the next task
    gets its full ``rank`` only while ``free_dimension >= rank`` (:attr:`can_host_next_task`).
    ``energy_thresholds`` holds the threshold each finished task's memory update used (below the configured
    schedule where ``adaptive_threshold`` capped the memory to keep room for the remaining tasks)."""

    layers: list[str]
    d_in: int
    memory_dimension: int
    free_dimension: int
    memory_form: str
    rank: int = 0
    tasks_done: int = 0
    energy_thresholds: list[float] = field(default_factory=list)

    @property
    def energy_threshold(self) -> Optional[float]:
        """The threshold of the last finished task (``None`` before the first)."""
        return self.energy_thresholds[-1] if self.energy_thresholds else None

    @property
    def can_host_next_task(self) -> bool:
        return self.free_dimension >= self.rank

    @property
    def tasks_at_full_rank(self) -> int:
        """How many more tasks find ``rank`` free directions if each adds ``rank`` directions to the memory."""
        return self.free_dimension // self.rank if self.rank > 0 else 0


@dataclass
class LayerInterference:
    """How much the designed ``B_t`` of the task in progress reads the inputs of some (old) task, in one input group.

    ``X`` (``N x d_in``) holds the group's input vectors over the batches given to
    :meth:`InfLoRAModel.interference_report` (non-padding tokens, as the model produces them now).

    Attributes:
        layers: the adapted layers of the group (they read the same input).
        d_in: input dimension.
        rank: rows of ``B_t`` (the largest in the group).
        tokens: ``N``.
        input_norm: ``||X||_F``.
        design_norm: ``max over the group's layers of ||B_t||_2`` (spectral norm).
        leakage: ``max over the group's layers of ||X B_t^T||_F / (||B_t||_2 ||X||_F)``, in ``[0, 1]``: 0 when the
            inputs lie in the memory (orthogonal to every row of ``B_t``), 1 when they all lie along ``B_t``'s top
            right singular vector.
    """

    layers: list[str]
    d_in: int
    rank: int
    tokens: int
    input_norm: float
    design_norm: float
    leakage: float

    def bound(self, delta_a_norm: float) -> float:
        """Largest ``||X B_t^T (A' - A)^T||_F`` (the change of the layer's outputs on ``X``) for
        ``||A' - A||_2 = delta_a_norm``: ``leakage * delta_a_norm * design_norm * input_norm``."""
        return self.leakage * delta_a_norm * self.design_norm * self.input_norm


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
        f"InfLoRA cannot adapt module '{key}' of type {cls.__name__}: only torch.nn.Linear and transformers' Conv1D "
        f"are supported, and bitsandbytes' Linear4bit / Linear8bitLt.{lookalike} Remove it from `target_modules` "
        "(or narrow the pattern). Nothing was changed."
    )


def _check_target(config: InfLoRAConfig, key: str, target: nn.Module) -> None:
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


def _undo_failed_load(model: nn.Module, adapter_name: str) -> None:
    """After loading adapter weights failed: take the adapter out of ``model`` (a ``PeftModel``) again, so that the
    base model the caller passed to ``PeftModel.from_pretrained`` is left as it was (its modules, weights and
    ``requires_grad`` flags), and ``load_adapter`` leaves the other adapters as they were. Best effort: a failure here
    must not hide the load error."""
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


class InfLoRAModel(BaseTuner):
    """Creates an InfLoRA model (Liang & Li, CVPR 2024) from a pretrained transformers model.

    Example:

        ```py
        >>> import peft_inflora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_inflora.InfLoRAConfig(r=8, target_modules=["query", "value"]))
        >>> model.begin_task(train_batches)
        >>> ...  # train
        >>> model.end_task(train_batches)
        ```
    """

    prefix: str = "inflora_"
    tuner_layer_cls = InfLoRALayer
    target_module_mapping = INFLORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------ injection
    def _create_and_replace(self, inflora_config: InfLoRAConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r_key = get_pattern_key((inflora_config.rank_pattern or {}).keys(), current_key)
        r = (inflora_config.rank_pattern or {}).get(r_key, inflora_config.r)
        if isinstance(target, InfLoRALayer):
            target.update_layer(adapter_name, r, inflora_config.fold, inference_mode=inflora_config.inference_mode,
                                cache_past_weight=inflora_config.cache_past_weight)
            return
        new_module = self._create_new_module(inflora_config, adapter_name, target, r, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _prepare_model(self, peft_config: InfLoRAConfig, model: nn.Module) -> None:
        """Check every module the config targets before the first one is replaced (PEFT replaces them one by one),
        so an unsupported module type or a rank too large for some layer fails with the model untouched."""
        super()._prepare_model(peft_config, model)
        tuner_layers = [key + "." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        if not tuner_layers:  # first adapter: remember what a failed load must restore (see _undo_failed_load)
            self._requires_grad_before_injection = {n: p.requires_grad for n, p in model.named_parameters()}
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in tuner_layers):
                continue
            if self._check_target_module_exists(peft_config, key):
                _check_target(peft_config, key, module)
        prepare_quantized_model(model)

    @staticmethod
    def _create_new_module(inflora_config: InfLoRAConfig, adapter_name: str, target: nn.Module, r: int,
                           current_key: str) -> nn.Module:
        layer_cls = _layer_class_for(target)
        if layer_cls is None:
            raise _unsupported_module_error(current_key, target)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        fan_in_fan_out = inflora_config.fan_in_fan_out
        if isinstance(base, Conv1D):
            if not fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting "
                              "fan_in_fan_out to True.")
            fan_in_fan_out = inflora_config.fan_in_fan_out = True
        elif fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                          "fan_in_fan_out to False.")
            fan_in_fan_out = inflora_config.fan_in_fan_out = False
        return layer_cls(target, adapter_name, r=r, fold=inflora_config.fold, fan_in_fan_out=fan_in_fan_out,
                         is_target_conv_1d_layer=isinstance(base, Conv1D),
                         inference_mode=inflora_config.inference_mode,
                         cache_past_weight=inflora_config.cache_past_weight)

    # ------------------------------------------------------------------ state access
    def _resolve_adapter(self, adapter_name: Optional[str]) -> str:
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(f"{len(self.active_adapters)} adapters are active ({self.active_adapters}): pass "
                                 "`adapter_name=` to say which one.")
            adapter_name = self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter '{adapter_name}': known adapters are {sorted(self.peft_config)}.")
        return adapter_name

    def inflora_layers(self, adapter_name: Optional[str] = None) -> dict[str, InfLoRALayer]:
        """The adapted layers of an adapter, by module name (relative to the wrapped model)."""
        adapter_name = self._resolve_adapter(adapter_name)
        return {n: m for n, m in self.model.named_modules()
                if isinstance(m, InfLoRALayer) and adapter_name in m.inflora_A}

    def tasks_done(self, adapter_name: Optional[str] = None) -> int:
        """Number of tasks finished (``end_task`` called) by the adapter."""
        layers = self.inflora_layers(adapter_name)
        return next(iter(layers.values())).tasks_done(self._resolve_adapter(adapter_name)) if layers else 0

    def task_in_progress(self, adapter_name: Optional[str] = None) -> bool:
        """True between ``begin_task`` and ``end_task`` / ``abort_task``."""
        name = self._resolve_adapter(adapter_name)
        return any(layer.task_in_progress(name) for layer in self.inflora_layers(name).values())

    def _checked_layers(self, adapter_name: str) -> dict[str, InfLoRALayer]:
        layers = self.inflora_layers(adapter_name)
        if not layers:
            raise ValueError(f"Adapter '{adapter_name}' adapts no layer.")
        merged = [n for n, m in layers.items() if m.merged]
        if merged:
            raise TaskLifecycleError(
                f"The adapter is merged into the base weights (e.g. '{merged[0]}'): call `unmerge_adapter()` before "
                "begin_task / end_task."
            )
        return layers

    def _statistics(self, adapter_name: str, layers: Mapping[str, InfLoRALayer], batches: Iterable,
                    desc: str, progress: bool, exact: bool = False) -> list[InputGroup]:
        """Statistics pass with the config's settings; with ``statistics_sketch`` each group's statistics are split by
        its current memory. ``exact=True`` keeps the exact covariance of every batch given, even when
        ``statistics_sketch`` or a token budget is set (the interference report needs ``X^T X`` of the data it is
        asked about)."""
        config = self.peft_config[adapter_name]
        dtype = torch.float64 if config.statistics_dtype == "float64" else torch.float32
        sketch = None if exact else sketch_size(config.statistics_sketch)
        memories = {n: layer.get_memory(adapter_name) for n, layer in layers.items()} if sketch else None
        return collect_statistics(self.model, layers, batches, dtype=dtype,
                                  share_inputs=config.share_input_statistics,
                                  max_batches=None if exact else config.statistics_max_batches,
                                  max_tokens=None if exact else config.statistics_max_tokens, sketch=sketch,
                                  memories=memories,
                                  desc=desc, progress=progress)

    # ------------------------------------------------------------------ lifecycle
    def begin_task(self, batches: Iterable[Mapping[str, Any]], adapter_name: Optional[str] = None,
                   progress: bool = True) -> dict[str, int]:
        """Start a new task: collect ``C_t`` over ``batches`` (current model, all past branches active), design
        ``B_t`` in every input group and create ``A_t`` (zeros, trainable).

        Args:
            batches: iterable of model-input dicts (e.g. a DataLoader over the task's training data).
            adapter_name: the adapter (defaults to the active one).
            progress: show a tqdm progress bar.

        Returns:
            The rank ``r_t`` given to each adapted layer (``r``, or fewer when the free subspace is smaller).
        """
        name = self._resolve_adapter(adapter_name)
        config = self.peft_config[name]
        config._validate()  # fields may have been changed since the config was built
        layers = self._checked_layers(name)
        if self.task_in_progress(name):
            raise TaskLifecycleError(
                f"Task {self.tasks_done(name) + 1} of adapter '{name}' is already in progress: call "
                "`end_task(batches)` to keep it or `abort_task()` to discard it before beginning another."
            )
        done = self.tasks_done(name)
        if config.total_tasks is not None and done >= config.total_tasks:
            raise TaskLifecycleError(
                f"Adapter '{name}' has finished all total_tasks={config.total_tasks} tasks: raise `total_tasks` in "
                "the config (it sets the energy-threshold schedule) to learn more."
            )
        groups = self._statistics(name, layers, batches, f"InfLoRA task {done + 1}: statistics", progress)

        designs: dict[str, torch.Tensor] = {}
        exhausted, short = [], []
        for index, group in enumerate(groups):
            leader = layers[group.leader]
            r_max = max(layers[n].r[name] for n in group.names)
            memory = leader.get_memory(name)
            if config.design == "eigen":
                design = design_eigen(group.accumulator.covariance(), memory, r_max, scale=config.design_scale,
                                      solver=config.solver)
            else:
                generator = torch.Generator().manual_seed(config.random_seed + 1_000_003 * done + index)
                design = design_random(memory, r_max, scale=config.design_scale, generator=generator)
            if design.shape[0] == 0:
                exhausted.append((group.leader, memory))
            elif design.shape[0] < r_max:
                short.append((group.leader, design.shape[0], r_max, memory))
            for n in group.names:
                designs[n] = design[: layers[n].r[name]]
        if exhausted:
            lead, memory = exhausted[0]
            raise SubspaceExhaustedError(
                f"No free direction is left for task {done + 1} in {len(exhausted)} layer group(s), e.g. '{lead}': "
                f"the memory spans {memory.dimension} of its {memory.d_in} input dimensions. Lower "
                f"`energy_threshold` (now {config.energy_threshold}) so the memory keeps fewer directions, or "
                "continue with a new adapter. Nothing was changed."
            )
        if short:
            lead, got, want, memory = short[0]
            warnings.warn(
                f"Only {got} of r={want} directions are free for task {done + 1} in {len(short)} layer group(s), "
                f"e.g. '{lead}' (memory {memory.dimension} of {memory.d_in} dims): the task's branch gets rank {got} "
                "there. Lower `energy_threshold` to leave more room for later tasks.",
                SubspaceWarning,
                stacklevel=2,
            )
        if config.inference_mode:
            # loaded without is_trainable=True: learning a new task makes the adapter trainable again
            config.inference_mode = False
            self.set_requires_grad(name, True)
        generator = torch.Generator().manual_seed(config.random_seed + done)
        for n, layer in layers.items():
            layer.set_design(name, designs[n], init_weights=config.init_weights, generator=generator,
                             requires_grad=name in self.active_adapters)
        return {n: int(d.shape[0]) for n, d in designs.items()}

    def end_task(self, batches: Iterable[Mapping[str, Any]], adapter_name: Optional[str] = None,
                 progress: bool = True) -> dict[str, int]:
        """Finish the task in progress: collect ``C_t`` with the trained branch active, update each input group's
        memory (GPM / DualGPM at the energy threshold ``eps_t``) and fold ``A_t B_t`` into the past.

        Returns:
            The memory dimension of each adapted layer after the update.
        """
        name = self._resolve_adapter(adapter_name)
        config = self.peft_config[name]
        config._validate()  # fields may have been changed since the config was built
        layers = self._checked_layers(name)
        if not self.task_in_progress(name):
            raise TaskLifecycleError(
                f"No task of adapter '{name}' is in progress: call `begin_task(batches)` before training and "
                "`end_task(batches)` after it."
            )
        diverged = [n for n, layer in layers.items() if not torch.isfinite(layer.inflora_A[name].detach()).all()]
        if diverged:
            raise ValueError(
                f"The trained A_t of {len(diverged)} layer(s), e.g. '{diverged[0]}', holds NaN or inf: training "
                "diverged. Call `abort_task()` to discard the branch and train the task again from `begin_task` with "
                "a smaller learning rate (or gradient clipping). Nothing was changed."
            )
        done = self.tasks_done(name)
        threshold = energy_threshold(config.energy_threshold, done, config.total_tasks)
        tasks_left = config.total_tasks - done - 1 if config.adaptive_threshold else None
        groups = self._statistics(name, layers, batches, f"InfLoRA task {done + 1}: memory", progress)
        memories: dict[str, Memory] = {}
        used: dict[str, float] = {}
        for group in groups:
            memory = layers[group.leader].get_memory(name)
            covariance = group.accumulator.covariance()
            cap = None
            if tasks_left is not None:
                cap = memory_capacity(memory.d_in, max(layers[n].r[name] for n in group.names), tasks_left)
            new_memory = update_memory(memory, covariance, threshold, kind=config.memory, energy=config.energy,
                                       solver=config.solver, max_dimension=cap)
            group_threshold = threshold
            if cap is not None and new_memory.dimension >= cap:  # capped: the energy the memory really keeps
                group_threshold = min(threshold, captured_energy_ratio(new_memory, covariance, config.energy))
            for n in group.names:
                memories[n], used[n] = new_memory, group_threshold
        for n, layer in layers.items():
            layer.set_memory(name, memories[n])
            layer.fold_task(name, energy_threshold=used[n])
        return {n: m.dimension for n, m in memories.items()}

    def abort_task(self, adapter_name: Optional[str] = None) -> None:
        """Discard the branch of the task in progress; memory and finished tasks are untouched."""
        name = self._resolve_adapter(adapter_name)
        layers = self._checked_layers(name)
        if not self.task_in_progress(name):
            raise TaskLifecycleError(f"No task of adapter '{name}' is in progress: nothing to abort.")
        for layer in layers.values():
            layer.clear_branch(name)

    def capacity_report(self, adapter_name: Optional[str] = None) -> list[LayerCapacity]:
        """Per adapted layer: the memory's dimension, the free dimension left for new tasks, the layer's rank and the
        energy threshold each finished task used (see :class:`LayerCapacity`)."""
        name = self._resolve_adapter(adapter_name)
        report = []
        for n, layer in self.inflora_layers(name).items():
            memory = layer.get_memory(name)
            report.append(LayerCapacity([n], memory.d_in, memory.dimension, memory.free_dimension, memory.form,
                                        rank=layer.r[name], tasks_done=layer.tasks_done(name),
                                        energy_thresholds=layer.energy_thresholds(name)))
        return report

    def interference_report(self, batches: Iterable[Mapping[str, Any]], adapter_name: Optional[str] = None,
                            progress: bool = False) -> list[LayerInterference]:
        """Measure, per input group, how much the task in progress can disturb the outputs on ``batches``.

        Pass batches of an *old* task (or any data whose outputs must not move). A statistics pass over them (the
        model as it is now, nothing changes) gives each group's inputs ``X`` (``N x d_in``, padding left out), and
        with the designed ``B_t`` of each layer::

            leakage = max over the group's layers of ||X B_t^T||_F / (||B_t||_2 ||X||_F)       (in [0, 1])

        Bound: training changes only ``A_t`` (the rest of the layer is frozen), so for every layer of the group and
        any two values ``A``, ``A'`` of its ``A_t`` (e.g. before and after training) the outputs on these inputs
        change by::

            ||X B_t^T (A' - A)^T||_F  <=  leakage * ||A' - A||_2 * design_norm * input_norm

        (:meth:`LayerInterference.bound`). Called right after ``begin_task`` (``A_t = 0``, the outputs of the old
        model), ``X`` is what every adapted layer reads on the old task before training, so this bounds how far
        training the new task moves each adapted layer's outputs on it (for inputs that reach it unchanged; layers
        further down also see the change of the layers above). With ``energy_threshold=1.0`` the memory spans the
        old tasks' inputs and the leakage is 0 up to float error. This pass reads every batch given and keeps the
        exact ``d_in x d_in`` statistics, whatever ``statistics_max_tokens``, ``statistics_max_batches`` and
        ``statistics_sketch`` say.

        Raises:
            TaskLifecycleError: no task is in progress (there is no ``B_t`` to measure): call ``begin_task`` first.
            StatisticsError: as for ``begin_task`` (empty batches, all padding, non-finite activations, ...).
        """
        name = self._resolve_adapter(adapter_name)
        layers = self._checked_layers(name)
        if not self.task_in_progress(name):
            raise TaskLifecycleError(
                f"No task of adapter '{name}' is in progress: the interference report measures the designed B_t of "
                "the task in progress. Call `begin_task(new_task_batches)` first, then pass an old task's batches."
            )
        groups = self._statistics(name, layers, batches, "InfLoRA interference", progress, exact=True)
        report = []
        for group in groups:
            S = group.accumulator.sum.to(torch.float64)  # X^T X
            input_sq = float(torch.diagonal(S).sum().clamp_min(0.0))
            leakage, design_norm, rank = 0.0, 0.0, 0
            for n in group.names:
                B = layers[n].inflora_B[name].detach().to(device=S.device, dtype=torch.float64)
                if B.shape[0] == 0:
                    continue
                spectral = float(torch.linalg.matrix_norm(B, ord=2))
                read = float(((B @ S) * B).sum().clamp_min(0.0))  # trace(B X^T X B^T) = ||X B^T||_F^2
                if spectral > 0 and input_sq > 0:
                    leakage = max(leakage, (read / input_sq) ** 0.5 / spectral)
                design_norm, rank = max(design_norm, spectral), max(rank, B.shape[0])
            report.append(LayerInterference(list(group.names), int(S.shape[0]), rank,
                                            int(group.accumulator.count.item()), input_sq ** 0.5, design_norm,
                                            leakage))
        return report

    # ------------------------------------------------------------------ export
    def to_lora(self, save_directory: Optional[Union[str, os.PathLike]] = None,
                rank: Optional[Union[int, float]] = None, adapter_name: Optional[str] = None,
                overwrite: bool = False) -> LoraExport:
        """Export the finished tasks as a plain PEFT LoRA adapter, relative to the pristine base model.

        Per adapted layer the finished tasks add ``dW = past_A past_B`` (``d_out x R`` times ``R x d_in``). Exact
        (``rank=None``): ``lora_B = past_A``, ``lora_A = past_B``, LoRA rank ``R`` with ``lora_alpha = R`` (scaling
        1). ``rank=k``: the best rank-``k`` approximation of ``dW`` (SVD from QRs of the factors), with the relative
        Frobenius error ``||dW - dW_k||_F / ||dW||_F`` reported per layer. Both ``fold`` modes export the same
        update. The result loads with ``PeftModel.from_pretrained(base_model, save_directory)`` of plain ``peft``,
        without ``peft_inflora``. See :mod:`peft_inflora.export`.

        Args:
            save_directory: if given, write ``adapter_config.json`` and ``adapter_model.safetensors`` there
                (as :meth:`LoraExport.save_pretrained`).
            rank: ``None`` for the exact export, an int >= 1 for the largest rank per layer, or a float in
                ``(0, 1]``: per layer the fewest directions holding that share of ``sum s_i^2`` (PEFT's threshold).
            adapter_name: the adapter (defaults to the active one).
            overwrite: replace an adapter already in ``save_directory``.

        Returns:
            The :class:`LoraExport`: ``config`` (``LoraConfig``), ``state_dict`` (PEFT's saved keys), ``layers``
            (per layer: ranks, ``relative_error``, singular values of ``dW``).

        Raises:
            TaskLifecycleError: a task is in progress (call ``end_task`` or ``abort_task`` first), or no task is
                finished.
            ValueError: bad ``rank``, several active adapters and no ``adapter_name``, an unknown adapter, NaN / inf
                in the finished tasks.
            FileExistsError: ``save_directory`` already holds an adapter (pass ``overwrite=True``) or is a file.

        Every check runs before anything is written. ``peft.save_as_lora(folder, model, rank)`` /
        ``peft.convert_to_lora(model, rank)`` reach the same checks and per-layer factors (see :mod:`.export`).
        """
        name = self._resolve_adapter(adapter_name)
        check_export_rank(rank)
        if save_directory is not None:
            check_save_directory(save_directory, overwrite)
        layers = self.inflora_layers(name)
        if not layers:
            raise ValueError(f"Adapter '{name}' adapts no layer: there is nothing to export.")
        export = export_to_lora(self.model, layers, name, self.peft_config[name], rank=rank)
        if save_directory is not None:
            export.save_pretrained(save_directory, overwrite=overwrite)
        return export

    # ------------------------------------------------------------------ unloading
    def unload(self) -> nn.Module:
        """The base model without InfLoRA layers and without any task's low-rank update (``fold="base"`` tasks are
        taken out of the weights again); as in PEFT, trained ``modules_to_save`` copies are kept. Use
        ``merge_and_unload()`` to keep what was learned."""
        for module in self.model.modules():
            if isinstance(module, InfLoRALayer):
                for adapter in list(module.fold):
                    module.remove_folded_past(adapter)
        return self._unload_and_optionally_merge(merge=False)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _checked_load_plan(model: nn.Module, config: InfLoRAConfig, adapter_name: str,
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
            ndim = 0 if attr == "inflora_memory_form" else 1 if attr in ("inflora_task_ranks",
                                                                          "inflora_energy_thresholds") else 2
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

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: InfLoRAConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Before loading: check every layer's saved state is present and fits the base model, then resize the
        continual-state tensors (their shapes grow with the tasks learned) so the checkpoint loads into them. With
        ``fold="base"`` the saved finished tasks are added into the base weights (replacing any folded before)."""
        # set by InfLoRAConfig.from_pretrained: this adapter was injected by the load now running (PeftModel.
        # from_pretrained / load_adapter of a new adapter), so a failure may take it out again
        fresh = config.__dict__.pop("_undo_if_load_fails", False)
        try:
            state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            plan = cls._checked_load_plan(model, config, adapter_name, state_dict)
        except Exception:
            if fresh:
                _undo_failed_load(model, adapter_name)  # nothing was loaded yet: leave the base model as it was given
            raise
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
        return state_dict
