"""InfLoRAModel: wraps the target layers and runs the continual lifecycle of each adapter.

    begin_task(batches)  statistics pass -> C_t per input group -> design B_t (rows in the complement of the memory),
                         fresh A_t = 0: only A_t (and modules_to_save) train
    end_task(batches)    statistics pass with the trained branch -> GPM / DualGPM memory update -> fold A_t B_t into
                         the past (adapter factors or base weight)
    abort_task()         discard the current branch
    with task(batches):  begin_task on entry, end_task on normal exit, abort_task when the block raises

Every check runs and every new tensor is computed before the first piece of state is replaced, so a failing call
leaves the adapter as it was.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bnb import prepare_quantized_model
from .config import INFLORA_TARGET_MODULES_MAPPING, InfLoRAConfig
from .dispatch import _check_target, _layer_class_for, _unsupported_module_error
from .distributed import agree
from .errors import (  # noqa: F401  (SubspaceExhaustedError, SubspaceWarning: importable from here, as before)
    StatisticsError,
    SubspaceExhaustedError,
    SubspaceWarning,
    TaskLifecycleError,
)
from .export import LoraExport, check_export_rank, check_exportable, check_save_directory, export_to_lora
from .layer import InfLoRALayer, Linear  # noqa: F401  (Linear: importable from here, as before)
from .lifecycle import design_groups, update_group_memories
from .loading import AdapterFileMixin
from .registry import lora_conversion_installed
from .reports import LayerCapacity, LayerInterference, capacity_report, interference_report
from .statistics import InputGroup, collect_statistics
from .subspace import sketch_size


class InfLoRAModel(AdapterFileMixin, BaseTuner):
    """Creates an InfLoRA model (Liang & Li, CVPR 2024) from a pretrained transformers model.

    Example:

        ```py
        >>> import peft_inflora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_inflora.InfLoRAConfig(r=8, target_modules=["query", "value"]))
        >>> with model.task(train_batches):  # begin_task on entry, end_task on exit, abort_task on an exception
        ...     train(model)  # any loop or trainer
        ```

    ``model.task(batches)`` is the same as ``model.begin_task(batches)``, training, then ``model.end_task(batches)``
    (which remain available for loops that cannot use a ``with`` block); see :meth:`task`.
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
        if not tuner_layers:  # first adapter: remember what a failed load must restore (see loading.undo_failed_load)
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
                    desc: str, progress: bool, exact: bool = False, step: Optional[str] = None) -> list[InputGroup]:
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
                                  desc=desc, progress=progress, step=step)

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
        with agree("begin_task (checks)"):  # every process refuses, or none
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
                    f"Adapter '{name}' has finished all total_tasks={config.total_tasks} tasks: raise `total_tasks` "
                    "in the config (it sets the energy-threshold schedule) to learn more."
                )
        groups = self._statistics(name, layers, batches, f"InfLoRA task {done + 1}: statistics", progress,
                                  step=f"begin_task of task {done + 1} (statistics pass)")
        with agree(f"begin_task of task {done + 1} (design of B_t)"):  # compute on every process, then agree
            designs = design_groups(groups, layers, name, config, done)
        # commit: reached by every process or by none
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
        with agree("end_task (checks)"):  # every process refuses, or none
            name = self._resolve_adapter(adapter_name)
            config = self.peft_config[name]
            config._validate()  # fields may have been changed since the config was built
            layers = self._checked_layers(name)
            if not self.task_in_progress(name):
                raise TaskLifecycleError(
                    f"No task of adapter '{name}' is in progress: call `begin_task(batches)` before training and "
                    "`end_task(batches)` after it."
                )
            diverged = [n for n, layer in layers.items()
                        if not torch.isfinite(layer.inflora_A[name].detach()).all()]
            if diverged:
                raise ValueError(
                    f"The trained A_t of {len(diverged)} layer(s), e.g. '{diverged[0]}', holds NaN or inf: training "
                    "diverged. Call `abort_task()` to discard the branch and train the task again from `begin_task` "
                    "with a smaller learning rate (or gradient clipping). Nothing was changed."
                )
            done = self.tasks_done(name)
        groups = self._statistics(name, layers, batches, f"InfLoRA task {done + 1}: memory", progress,
                                  step=f"end_task of task {done + 1} (statistics pass)")
        with agree(f"end_task of task {done + 1} (memory update and fold)"):  # compute everything, then agree
            memories, used = update_group_memories(groups, layers, name, config, done)
            folded = {n: layer.folded_state(name, energy_threshold=used[n]) for n, layer in layers.items()}
        # commit: reached by every process or by none
        for n, layer in layers.items():
            layer.set_memory(name, memories[n])
            layer.commit_fold(name, folded[n])
        return {n: m.dimension for n, m in memories.items()}

    def abort_task(self, adapter_name: Optional[str] = None) -> None:
        """Discard the branch of the task in progress; memory and finished tasks are untouched."""
        name = self._resolve_adapter(adapter_name)
        layers = self._checked_layers(name)
        if not self.task_in_progress(name):
            raise TaskLifecycleError(f"No task of adapter '{name}' is in progress: nothing to abort.")
        for layer in layers.values():
            layer.clear_branch(name)

    @contextlib.contextmanager
    def task(self, batches: Iterable[Mapping[str, Any]], adapter_name: Optional[str] = None,
             progress: bool = True) -> Iterator[dict[str, int]]:
        """One task as a ``with`` block: ``begin_task(batches)`` on entry, ``end_task(batches)`` on normal exit.

        When the block raises, the task is aborted (``abort_task``: the memory and the finished tasks stay exactly
        as they were before the block) and the exception propagates unchanged. When ``begin_task`` raises (e.g.
        :class:`~peft_inflora.errors.SubspaceExhaustedError`), nothing was begun and nothing is aborted. When
        ``end_task`` raises, it changed nothing: the task stays in progress, to be ended again or aborted.

        Args:
            batches: model-input dicts for both statistics passes, read twice: a list or a DataLoader, not a
                one-shot iterator such as a generator (refused before anything changes).
            adapter_name: the adapter (defaults to the active one).
            progress: show tqdm progress bars.

        Yields:
            What ``begin_task`` returned: the rank ``r_t`` given to each adapted layer.
        """
        name = self._resolve_adapter(adapter_name)
        if isinstance(batches, Iterator):
            raise StatisticsError(
                f"`batches` is an iterator ({type(batches).__name__}): model.task() reads it in begin_task and again "
                "in end_task, and the first pass would use it up. Pass a list of batches or a DataLoader."
            )
        ranks = self.begin_task(batches, adapter_name=name, progress=progress)
        try:
            yield ranks
        except BaseException:
            if self.task_in_progress(name):  # the block may have ended or aborted the task itself
                self.abort_task(name)
            raise
        self.end_task(batches, adapter_name=name, progress=progress)

    def capacity_report(self, adapter_name: Optional[str] = None) -> list[LayerCapacity]:
        """Per adapted layer: the memory's dimension, the free dimension left for new tasks, the layer's rank and the
        energy threshold each finished task used (see :class:`LayerCapacity`)."""
        name = self._resolve_adapter(adapter_name)
        return capacity_report(self.inflora_layers(name), name)

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
        return interference_report(groups, layers, name)

    # ------------------------------------------------------------------ export
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether ``adapter_name`` can be converted to LoRA now (PEFT's question, a bool): its finished tasks are
        finite and no task is in progress. PEFT's ``convert_to_lora`` asks each layer instead, which raises saying
        why not (as :meth:`to_lora` does)."""
        try:
            layers = self.inflora_layers(adapter_name)
            check_exportable(layers, adapter_name)  # to_lora's check, once for all layers
        except (TaskLifecycleError, ValueError):  # an unknown adapter, a task in progress, none finished, NaN
            return False
        return bool(layers) and lora_conversion_installed()

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
