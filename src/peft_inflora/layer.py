"""InfLoRA tuner layers: one wrapped linear map and its continual state.

For a wrapped layer ``W`` (``d_out x d_in``) and input ``x`` (``... x d_in``), while task ``t`` trains:

    y = W x + sum_{j<t} A_j B_j x + A_t B_t x

* ``inflora_B[adapter]``  ``(r_t, d_in)``  the designed ``B_t``, a frozen buffer (``r_t = 0``: no task in progress);
* ``inflora_A[adapter]``  ``(d_out, r_t)`` the trainable ``A_t``, zero at the start of each task;
* ``inflora_past_A`` / ``inflora_past_B``  ``(d_out, R)`` / ``(R, d_in)``: every finished task's factors stacked,
  ``R = sum_j r_j``, so all past branches cost one low-rank product ``past_A (past_B x)``;
* ``inflora_memory``  ``(d_in, k)`` float32: the orthonormal basis of the memory ``M`` (form 0) or of its complement
  ``P`` (form 1, DualGPM); ``inflora_memory_form`` a 0-dim int buffer;
* ``inflora_task_ranks``  ``(T,)`` int64: ``r_j`` of every finished task (how ``past_*`` splits into tasks);
* ``inflora_energy_thresholds``  ``(T,)`` float32: the energy threshold each finished task's memory update used
  (below the configured schedule where ``adaptive_threshold`` capped the memory).

With ``fold="base"`` the past product is added into ``W`` when a task ends and the forward skips it; the factors are
still kept (and saved) so the adapter can be loaded onto a pristine base model, disabled, or unloaded exactly.

With ``fold="adapter"`` and ``cache_past_weight=True`` (the default) the forward runs ``W + past_A past_B`` as one
cached ``d_out x d_in`` weight (not saved; rebuilt whenever ``W`` or the past factors change), so a step costs the same
after 10 tasks as after 1; the price is one more weight per adapted layer while the model is used. Layers where that
is not safe (not a plain frozen ``nn.Linear``, hooks on the base layer, several active adapters) use the two factors.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from .errors import NoTaskInProgressError
from .subspace import Memory


MEMORY_FORM_CODES = {"basis": 0, "complement": 1}
MEMORY_FORM_NAMES = {code: name for name, code in MEMORY_FORM_CODES.items()}


class InfLoRALayer(BaseTunerLayer):
    """State and math shared by the InfLoRA layer variants (PEFT's config / layer / model split)."""

    # trainable per-adapter tensors (PEFT toggles requires_grad over these)
    adapter_layer_names = ("inflora_A",)
    # frozen per-adapter state, all persistent so it is saved with the adapter
    other_param_names = (
        "inflora_B",
        "inflora_past_A",
        "inflora_past_B",
        "inflora_memory",
        "inflora_memory_form",
        "inflora_task_ranks",
        "inflora_energy_thresholds",
        "r",
        "fold",
        "cache_past_weight",
    )
    # buffers whose shape changes with the continual state: resized when a checkpoint is loaded
    resizable_state_names = ("inflora_A", "inflora_B", "inflora_past_A", "inflora_past_B", "inflora_memory",
                             "inflora_task_ranks", "inflora_energy_thresholds")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.fold: dict[str, str] = {}
        self.cache_past_weight: dict[str, bool] = {}
        # adapter -> (key, W + past_A past_B, (past_A, past_B))
        self._past_weight_cache: dict[str, tuple[tuple, torch.Tensor, tuple]] = {}
        self.inflora_A = nn.ParameterDict({})
        self.inflora_B = BufferDict({}, persistent=True)
        self.inflora_past_A = BufferDict({}, persistent=True)
        self.inflora_past_B = BufferDict({}, persistent=True)
        self.inflora_memory = BufferDict({}, persistent=True)
        self.inflora_memory_form = BufferDict({}, persistent=True)
        self.inflora_task_ranks = BufferDict({}, persistent=True)
        self.inflora_energy_thresholds = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer())}")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, r: int, fold: str, inference_mode: bool = False,
                     cache_past_weight: bool = True, **kwargs: Any) -> None:
        """Create an adapter with empty continual state: no task done, empty memory, no branch in progress."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"r={r} is larger than this layer allows (in_features={self.in_features}, "
                f"out_features={self.out_features}): use r <= {min(self.in_features, self.out_features)}."
            )
        self.r[adapter_name] = r
        self.fold[adapter_name] = fold
        self.cache_past_weight[adapter_name] = bool(cache_past_weight)
        d_in, d_out = self.in_features, self.out_features
        self.inflora_A[adapter_name] = nn.Parameter(torch.zeros(d_out, 0))
        self.inflora_B[adapter_name] = torch.zeros(0, d_in)
        self.inflora_past_A[adapter_name] = torch.zeros(d_out, 0)
        self.inflora_past_B[adapter_name] = torch.zeros(0, d_in)
        self.inflora_memory[adapter_name] = torch.zeros(d_in, 0)
        self.inflora_memory_form[adapter_name] = torch.tensor(MEMORY_FORM_CODES["basis"], dtype=torch.int64)
        self.inflora_task_ranks[adapter_name] = torch.zeros(0, dtype=torch.int64)
        self.inflora_energy_thresholds[adapter_name] = torch.zeros(0, dtype=torch.float32)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        # the memory basis must stay at least float32 whatever the model dtype: it defines the protected subspace
        if adapter_name in self.inflora_memory:
            memory = self.inflora_memory[adapter_name]
            if memory.dtype not in (torch.float32, torch.float64):
                self.inflora_memory[adapter_name] = memory.float()

    # ------------------------------------------------------------------ continual state
    def task_in_progress(self, adapter_name: str) -> bool:
        """True between ``begin_task`` and ``end_task``: the layer holds a designed ``B_t`` (shape metadata only)."""
        return self.inflora_B[adapter_name].shape[0] > 0

    def tasks_done(self, adapter_name: str) -> int:
        return int(self.inflora_task_ranks[adapter_name].numel())

    def energy_thresholds(self, adapter_name: str) -> list[float]:
        """The energy threshold each finished task's memory update used, in task order."""
        return [float(t) for t in self.inflora_energy_thresholds[adapter_name].tolist()]

    def get_memory(self, adapter_name: str) -> Memory:
        """The layer's memory as a float64 :class:`Memory`."""
        form = MEMORY_FORM_NAMES[int(self.inflora_memory_form[adapter_name].item())]
        return Memory(self.inflora_memory[adapter_name].detach().to(torch.float64), form)

    def set_memory(self, adapter_name: str, memory: Memory) -> None:
        device = self.inflora_B[adapter_name].device
        self.inflora_memory[adapter_name] = memory.basis.to(device=device, dtype=torch.float32).contiguous()
        self.inflora_memory_form[adapter_name] = torch.tensor(
            MEMORY_FORM_CODES[memory.form], dtype=torch.int64, device=device
        )

    def set_design(self, adapter_name: str, design: torch.Tensor, init_weights: bool = True,
                   generator: Optional[torch.Generator] = None, requires_grad: bool = True) -> None:
        """Install ``B_t`` (``r_t x d_in``) and a fresh ``A_t`` (``d_out x r_t``): zeros, or small random values
        when ``init_weights=False`` (used by tests that need a non-identity adapter).

        ``B_t`` is kept in at least float32 (it defines the protected subspace); ``A_t`` keeps the dtype PEFT gave the
        adapter's (empty) ``A``: float32 by default, the base model's dtype with ``autocast_adapter_dtype=False``."""
        ref = self.inflora_past_A[adapter_name]
        r_t = design.shape[0]
        dtype = torch.float32 if ref.dtype not in (torch.float32, torch.float64) else ref.dtype
        current_a = self.inflora_A[adapter_name]
        a_dtype = current_a.dtype if current_a.dtype.is_floating_point else dtype
        self.inflora_B[adapter_name] = design.to(device=ref.device, dtype=dtype).contiguous()
        if init_weights:
            a = torch.zeros(self.out_features, r_t, dtype=a_dtype)
        else:
            a = torch.randn(self.out_features, r_t, dtype=torch.float64, generator=generator).to(a_dtype) * 0.1
        self.inflora_A[adapter_name] = nn.Parameter(a.to(ref.device), requires_grad=requires_grad)

    def clear_branch(self, adapter_name: str) -> None:
        """Discard the current task's branch (``A_t``, ``B_t``): back to no task in progress."""
        ref = self.inflora_B[adapter_name]
        requires_grad = self.inflora_A[adapter_name].requires_grad
        self.inflora_B[adapter_name] = ref.new_zeros(0, self.in_features)
        self.inflora_A[adapter_name] = nn.Parameter(
            self.inflora_A[adapter_name].detach().new_zeros(self.out_features, 0), requires_grad=requires_grad
        )

    @torch.no_grad()
    def fold_task(self, adapter_name: str, energy_threshold: float = float("nan")) -> None:
        """Move the finished task's branch into the past: ``past_A <- [past_A, A_t]``, ``past_B <- [past_B; B_t]``;
        with ``fold="base"`` also ``W <- W + A_t B_t``. Exact: the layer's output does not change. The energy
        threshold of the task's memory update is recorded with its rank."""
        self.commit_fold(adapter_name, self.folded_state(adapter_name, energy_threshold))

    @torch.no_grad()
    def folded_state(self, adapter_name: str, energy_threshold: float = float("nan")) -> dict[str, torch.Tensor]:
        """What :meth:`fold_task` will install, computed without changing anything: the new ``inflora_past_A``,
        ``inflora_past_B``, ``inflora_task_ranks`` and ``inflora_energy_thresholds`` of the adapter (``end_task``
        computes these for every layer, agrees across processes, then commits them with :meth:`commit_fold`)."""
        if self.merged:
            raise RuntimeError("Cannot end a task while the adapter is merged: call `unmerge_adapter()` first.")
        A = self.inflora_A[adapter_name].detach()
        B = self.inflora_B[adapter_name]
        past_A, past_B = self.inflora_past_A[adapter_name], self.inflora_past_B[adapter_name]
        ranks = self.inflora_task_ranks[adapter_name]
        thresholds = self.inflora_energy_thresholds[adapter_name]
        return {
            "inflora_past_A": torch.cat([past_A, A.to(past_A.dtype)], dim=1).contiguous(),
            "inflora_past_B": torch.cat([past_B, B.to(past_B.dtype)], dim=0).contiguous(),
            "inflora_task_ranks": torch.cat([ranks, ranks.new_tensor([A.shape[1]])]),
            "inflora_energy_thresholds": torch.cat([thresholds, thresholds.new_tensor([energy_threshold])]),
        }

    @torch.no_grad()
    def commit_fold(self, adapter_name: str, folded: dict[str, torch.Tensor]) -> None:
        """Install a :meth:`folded_state` (with ``fold="base"`` first adding ``A_t B_t`` into ``W``, the one step
        that computes) and clear the branch."""
        if self.fold[adapter_name] == "base":
            self._add_to_base_weight(self.inflora_A[adapter_name].detach(), self.inflora_B[adapter_name], sign=1.0)
        for attr, tensor in folded.items():
            getattr(self, attr)[adapter_name] = tensor
        self.clear_branch(adapter_name)

    def _add_to_base_weight(self, A: torch.Tensor, B: torch.Tensor, sign: float) -> None:
        if A.shape[1] == 0:
            return
        weight = self.get_base_weight()
        delta = transpose(A.to(torch.float32).contiguous() @ B.to(torch.float32).contiguous(), self.fan_in_fan_out)
        self.set_base_weight((weight.to(torch.float32) + sign * delta.to(weight.device)).to(weight.dtype))

    def past_delta_in_base(self, adapter_name: str) -> bool:
        return self.fold[adapter_name] == "base" and self.inflora_past_A[adapter_name].shape[1] > 0

    # ------------------------------------------------------------------ LoRA conversion
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Asked by PEFT's ``convert_to_lora`` / ``save_as_lora`` of every tuner layer before anything is converted.

        True: PEFT converts this layer with the factors of ``InfLoRAModel.to_lora`` (its per-layer conversion is
        routed to :func:`peft_inflora.export.convert_layer_to_lora`; False only if that routing could not be installed
        on this PEFT version, and then PEFT refuses the conversion). A layer that does not hold ``adapter_name``
        converts to nothing. Refuses like ``to_lora`` (:func:`peft_inflora.export.check_exportable`), before any
        file is written:

        Raises:
            TaskLifecycleError: a task of the adapter is in progress, or none is finished.
            ValueError: the finished tasks hold NaN or inf.
        """
        from .export import check_exportable  # here, not at the top: export imports this module
        from .registry import lora_conversion_installed

        if not lora_conversion_installed():
            return False
        check_exportable({None: self}, adapter_name)
        return True

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``dW = past_A past_B + A_t B_t`` (``d_out x d_in``, transposed for ``fan_in_fan_out``, in the base weight's
        dtype); with ``fold="base"`` the past is already inside ``W`` and only ``A_t B_t`` is returned."""
        return self._merge_delta(adapter).to(self.get_base_weight().dtype)

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """What ``merge`` adds to the base weight, ``W' - W`` (PEFT >= 0.22's ``get_additive_delta``): the same
        ``dW`` as :meth:`get_delta_weight`, in the adapter's dtype (``A_t``'s) instead of the base weight's."""
        return self._merge_delta(adapter_name).to(self.inflora_A[adapter_name].dtype)

    def _merge_delta(self, adapter: str) -> torch.Tensor:
        """``dW`` of :meth:`get_delta_weight` in float32, in the base weight's layout."""
        A, B = self.inflora_A[adapter], self.inflora_B[adapter]
        delta = A.detach().to(torch.float32) @ B.to(torch.float32)
        if self.fold[adapter] == "adapter":
            delta = delta + self.inflora_past_A[adapter].float() @ self.inflora_past_B[adapter].float()
        return transpose(delta, self.fan_in_fan_out)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.inflora_A:
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(adapter).to(weight.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self.set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.inflora_A:
                weight = self.get_base_weight()
                self.set_base_weight(weight - self.get_delta_weight(adapter).to(weight.device))

    def add_past_to_base(self, past_A: torch.Tensor, past_B: torch.Tensor, ranks: torch.Tensor,
                         sign: float = 1.0) -> None:
        """``W <- W + sign * sum_j A_j B_j``, one task at a time in the order ``fold_task`` added them (reverse order
        when subtracting), so a reloaded ``fold="base"`` model has bit-identical weights."""
        bounds = [0] + torch.cumsum(ranks, 0).tolist()
        spans = list(zip(bounds[:-1], bounds[1:]))
        for start, stop in spans if sign > 0 else reversed(spans):
            self._add_to_base_weight(past_A[:, start:stop], past_B[start:stop], sign=sign)

    def remove_folded_past(self, adapter_name: str) -> None:
        """With ``fold="base"``: subtract the finished tasks from ``W`` (used by unload / delete_adapter / load)."""
        if self.past_delta_in_base(adapter_name):
            self.add_past_to_base(self.inflora_past_A[adapter_name], self.inflora_past_B[adapter_name],
                                  self.inflora_task_ranks[adapter_name], sign=-1.0)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.fold:
            self.remove_folded_past(adapter_name)
        self._past_weight_cache.pop(adapter_name, None)
        super().delete_adapter(adapter_name)


class Linear(nn.Module, InfLoRALayer):
    """InfLoRA on ``torch.nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, fold: str = "adapter",
                 fan_in_fan_out: bool = False, is_target_conv_1d_layer: bool = False, **kwargs: Any) -> None:
        super().__init__()
        InfLoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, fold, inference_mode=kwargs.get("inference_mode", False),
                          cache_past_weight=kwargs.get("cache_past_weight", True))

    def _past_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        past_A, past_B = self.inflora_past_A[adapter], self.inflora_past_B[adapter]
        return F.linear(F.linear(self._cast_input_dtype(x, past_B.dtype), past_B), past_A)

    def _cached_weight_with_past(self, adapter: str) -> Optional[torch.Tensor]:
        """``W + past_A past_B`` (``d_out x d_in``, the base weight's dtype) for the one active ``fold="adapter"``
        adapter, or ``None`` when the layer must use the factors (cache off, no finished task, several active
        adapters, a base layer that is not a plain frozen ``nn.Linear`` or has hooks, e.g. Accelerate offloading).

        The cached sum is a plain attribute (never saved, never trained) keyed on the storage and in-place version
        counters of ``W``, ``past_A`` and ``past_B``: ``end_task``, ``load``, ``merge`` or ``.to()`` rebuild it."""
        base = self.base_layer
        past_A, past_B = self.inflora_past_A[adapter], self.inflora_past_B[adapter]
        if (not self.cache_past_weight.get(adapter, False) or self.fold[adapter] != "adapter"
                or past_A.shape[1] == 0 or len(self.active_adapters) != 1 or type(base) is not nn.Linear
                or base.weight.requires_grad or base._forward_hooks or base._forward_pre_hooks
                or hasattr(base, "_hf_hook") or torch.compiler.is_compiling()):
            return None
        W = base.weight
        # the tensors themselves are part of the key (and kept alive by it), so a freed tensor's address reused by a
        # new one with the same version counter can never pass for it
        key = (W.data_ptr(), W._version, W.dtype, W.device, past_A.data_ptr(), past_A._version, past_B.data_ptr(),
               past_B._version)
        cached = self._past_weight_cache.get(adapter)
        if cached is None or cached[0] != key or cached[2][0] is not past_A or cached[2][1] is not past_B:
            # outside inference mode, so a cache built under torch.inference_mode() can serve a training forward
            with torch.inference_mode(False), torch.no_grad():
                exact = torch.promote_types(W.dtype, torch.float32)
                weight = (W.to(exact) + past_A.to(exact) @ past_B.to(exact)).to(W.dtype)
            self._past_weight_cache[adapter] = cached = (key, weight, (past_A, past_B))
        return cached[1]

    def _without_hidden_past(self, result: torch.Tensor, x: torch.Tensor, visible) -> torch.Tensor:
        """``fold="base"`` puts every adapter's finished tasks into the one shared ``W``: take out those of the
        adapters not in ``visible`` (all of them when the adapters are disabled), so each adapter sees only its own."""
        for adapter in self.fold:
            if adapter not in visible and self.past_delta_in_base(adapter):
                result = result - self._past_output(x, adapter).to(result.dtype)
        return result

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """Used by PEFT's ``merge_and_unload`` / ``unload``: with ``merge``, the base layer with the merged adapters
        in it and without the ``fold="base"`` tasks of the adapters that were not merged. (``InfLoRAModel.unload``
        takes every adapter's folded tasks out before unloading.)"""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            for adapter in list(self.fold):
                if adapter not in self.merged_adapters:
                    self.remove_folded_past(adapter)
        return self.get_base_layer()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            # finished tasks live inside W: take them out again to give the base model's output
            result = self._without_hidden_past(self.base_layer(x, *args, **kwargs), x, visible=())
        elif self.merged:
            result = self._without_hidden_past(self.base_layer(x, *args, **kwargs), x, visible=self.merged_adapters)
        else:
            adapter = self.active_adapters[0] if self.active_adapters else None
            cached = self._cached_weight_with_past(adapter) if adapter in self.inflora_A else None
            if cached is not None:  # W x + past_A past_B x as one matmul
                base_output = F.linear(x, cached, self.base_layer.bias)
            else:
                base_output = self.base_layer(x, *args, **kwargs)
            result = self._without_hidden_past(base_output, x, visible=self.active_adapters)
            torch_result_dtype = result.dtype
            for adapter in self.active_adapters:
                if adapter not in self.inflora_A:
                    continue
                A, B = self.inflora_A[adapter], self.inflora_B[adapter]
                if (cached is None and self.fold[adapter] == "adapter"
                        and self.inflora_past_A[adapter].shape[1] > 0):
                    result = result + self._past_output(x, adapter).to(torch_result_dtype)
                if B.shape[0] > 0:
                    x_cast = self._cast_input_dtype(x, A.dtype)
                    result = result + F.linear(F.linear(x_cast, B.to(A.dtype)), A).to(torch_result_dtype)
                elif self.training and torch.is_grad_enabled() and A.requires_grad:
                    raise NoTaskInProgressError(
                        f"InfLoRA adapter '{adapter}' is being trained but no task has been begun: call "
                        "`model.begin_task(train_batches)` before training (it designs B_t and creates A_t), and "
                        "`model.end_task(train_batches)` after."
                    )
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "inflora." + super().__repr__()
