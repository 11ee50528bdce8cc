"""InfLoRA on bitsandbytes-quantized base layers (QLoRA style): 4-bit ``Linear4bit`` and 8-bit ``Linear8bitLt``.

The base weight ``W`` (``d_out x d_in``) stays quantized and frozen; the adapter is float32 (or the dtype PEFT gives
it) and the forward is the one of :class:`~peft_inflora.layer.Linear`::

    y = Q(W) x + past_A (past_B x) + A_t (B_t x)        (the low-rank terms on x cast to the adapter's dtype)

so the statistics hooks read the layer's real input ``x`` and the continual state is the same as on a float base.

* ``fold="adapter"`` (the default) is the only fold: ``fold="base"`` would requantize ``Q(W + A_t B_t)`` at every
  ``end_task``. The rounding error lands in every input direction, the old tasks' included, so old-task outputs
  would move with every new task (what InfLoRA exists to prevent), and the folded tasks could no longer be taken
  out exactly (``unload``, ``delete_adapter``, loading onto the pristine base). It is refused before anything
  changes, when the adapter is created or loaded.
* ``merge_adapter`` / ``merge_and_unload`` dequantize, add ``dW = past_A past_B + A_t B_t`` and requantize, as PEFT's
  LoRA does, and report the rounding error ``||Q(W + dW) - (Q(W) + dW)||_F / ||dW||_F`` per layer
  (:class:`QuantizedMergeWarning`, and ``layer.rounding_errors``). ``unmerge_adapter`` restores the quantized weight
  kept from before the merge bit for bit (PEFT's LoRA requantizes once more), so a merge / unmerge round trip leaves
  the continual sequence exact; the price is a second quantized weight per merged layer while merged.

bitsandbytes is never imported here: a module can only be a bitsandbytes layer once bitsandbytes is imported, so the
classes are looked up in ``sys.modules`` and the method core runs without it.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from .errors import QuantizedMergeWarning
from .layer import Linear


def _bitsandbytes():
    """The bitsandbytes module if it is imported (no bitsandbytes layer can exist otherwise), else ``None``."""
    return sys.modules.get("bitsandbytes")


def quantized_layer_class(base: nn.Module) -> Optional[type]:
    """The InfLoRA layer class for a bitsandbytes base layer (:class:`Linear4bit` / :class:`Linear8bitLt`), or
    ``None`` when ``base`` is not one of them."""
    bnb = _bitsandbytes()
    if bnb is None:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        return Linear4bit
    if isinstance(base, bnb.nn.Linear8bitLt):
        return Linear8bitLt
    return None


def fold_base_error(key: str, bits: int) -> ValueError:
    return ValueError(
        f"fold='base' is not supported on the {bits}-bit quantized layer '{key}': folding a finished task into a "
        "quantized weight requantizes it, and the rounding error would change the outputs of the old tasks and could "
        "not be taken out again. Use fold='adapter' (the default): the base weight stays bit-exact and the finished "
        "tasks cost one low-rank product per layer. An adapter saved with fold='base' loads onto a quantized base as "
        "fold='adapter' with the same saved state: `config = InfLoRAConfig.from_pretrained(path); config.fold = "
        "'adapter'; PeftModel.from_pretrained(model, path, config=config)`. Nothing was changed."
    )


def check_quantized_target(key: str, base: nn.Module, fold: str) -> None:
    """The checks for a bitsandbytes base layer, made before any module is replaced; raises with what to change."""
    layer_cls = quantized_layer_class(base)
    if layer_cls is None:
        return
    name = f"{type(base).__module__}.{type(base).__qualname__}"
    if fold == "base":
        raise fold_base_error(key, layer_cls.bits)
    weight = base.weight
    if layer_cls is Linear8bitLt and (base.state.has_fp16_weights or weight.dtype != torch.int8):
        raise TypeError(
            f"InfLoRA cannot adapt module '{key}' ({name}): its weights are kept in 16 bits "
            "(`has_fp16_weights=True`, `llm_int8_has_fp16_weight=True` in BitsAndBytesConfig), so they are trained "
            "and not int8. Load the model with `llm_int8_has_fp16_weight=False` (the default). Nothing was changed."
        )
    if layer_cls is Linear4bit and (not getattr(weight, "bnb_quantized", False) or weight.quant_state is None):
        raise TypeError(
            f"InfLoRA cannot adapt module '{key}' ({name}): its weight is not quantized yet (bitsandbytes quantizes "
            "a Linear4bit when it is moved to its device). Load the model with `from_pretrained(..., "
            "quantization_config=BitsAndBytesConfig(load_in_4bit=True))`, or call `.to(device)` first. Nothing was "
            "changed."
        )


def prepare_quantized_model(model: nn.Module) -> None:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` trainable through on CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weight for inference at its first
    eval-mode forward without grad (``support_avx512bf16_for_cpu``), and the backward through a repacked layer is
    silently wrong (its ``gemv_4bit`` kernel has no autograd formula): the gradients reaching the adapter are off.
    A continual sequence alternates such forwards (statistics passes, evaluation) with training, so the repacking is
    turned off for all ``Linear4bit`` layers of the model (adapted or not: gradients flow through all of them), and
    weights already repacked are unpacked again (as bitsandbytes does itself before saving). No-op without
    bitsandbytes or on other devices' weights."""
    bnb = _bitsandbytes()
    if bnb is None:
        return
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            if hasattr(module, "quant_state"):
                module.quant_state = weight.quant_state


class _QuantizedLinear(Linear):
    """InfLoRA on a bitsandbytes layer: :class:`~peft_inflora.layer.Linear`'s forward and continual state, with
    merging by dequantize / add / requantize and ``fold="adapter"`` only."""

    bits: int = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, fold: str = "adapter",
                 **kwargs: Any) -> None:
        kwargs.pop("fan_in_fan_out", None)
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, r, fold=fold, fan_in_fan_out=False, is_target_conv_1d_layer=False,
                         **kwargs)
        self.rounding_errors: dict[str, float] = {}  # adapter -> relative rounding error of its merge
        self._weight_before_merge: Optional[tuple] = None

    # ------------------------------------------------------------------ quantized weight access
    def dequantized_weight(self) -> torch.Tensor:
        """``Q(W)`` (``d_out x d_in``) in the dtype the weight was quantized from."""
        raise NotImplementedError

    def _requantize(self, weight: torch.Tensor) -> None:
        """Replace the base layer's quantized weight with ``Q(weight)``."""
        raise NotImplementedError

    def _snapshot(self) -> tuple:
        """Everything that makes up the quantized weight, to put back with :meth:`_restore`."""
        raise NotImplementedError

    def _restore(self, snapshot: tuple) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def update_layer(self, adapter_name: str, r: int, fold: str, inference_mode: bool = False,
                     cache_past_weight: bool = True, **kwargs: Any) -> None:
        if fold == "base":
            raise fold_base_error(adapter_name, self.bits)
        super().update_layer(adapter_name, r, fold, inference_mode=inference_mode,
                             cache_past_weight=cache_past_weight, **kwargs)

    def _add_to_base_weight(self, A: torch.Tensor, B: torch.Tensor, sign: float) -> None:
        if A.shape[1] == 0:
            return
        raise RuntimeError(f"InfLoRA does not fold tasks into a {self.bits}-bit quantized weight: use fold='adapter'.")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``dW = past_A past_B + A_t B_t`` (``d_out x d_in``, float32: the quantized weight has no float dtype)."""
        return self._merge_delta(adapter)

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W <- Q(Q(W) + dW)`` per adapter; warns with the rounding error (also kept in ``rounding_errors``)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.inflora_A:
                continue
            weight = self.dequantized_weight()
            delta = self.get_delta_weight(adapter).to(weight.device)
            target = weight.to(torch.float32) + delta
            if safe_merge and not torch.isfinite(target).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            if self._weight_before_merge is None:
                self._weight_before_merge = self._snapshot()
            delta_norm = float(torch.linalg.vector_norm(delta))
            error = 0.0
            if delta_norm > 0:  # nothing to add: keep the quantized weight as it is
                self._requantize(target.to(weight.dtype))
                error = float(torch.linalg.vector_norm(self.dequantized_weight().float() - target)) / delta_norm
            self.rounding_errors[adapter] = error
            warnings.warn(
                f"Merged InfLoRA adapter '{adapter}' into a {self.bits}-bit quantized weight "
                f"({self.out_features} x {self.in_features}): requantizing rounds the merged weight by "
                f"||Q(W + dW) - (W + dW)|| / ||dW|| = {error:.3g}, so outputs differ from the unmerged model. "
                "`unmerge_adapter()` restores the quantized weight exactly.",
                QuantizedMergeWarning,
                stacklevel=2,
            )
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Put back the quantized weight from before the first merge, bit for bit."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self._weight_before_merge is not None:
            self._restore(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_adapters.clear()
        self.rounding_errors.clear()


class Linear4bit(_QuantizedLinear):
    """InfLoRA on ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4, QLoRA)."""

    bits = 4

    def dequantized_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return dequantize_bnb_weight(weight, state=weight.quant_state)

    def _requantize(self, weight: torch.Tensor) -> None:
        bnb = _bitsandbytes()
        base = self.get_base_layer()
        old = base.weight
        # as PEFT's LoRA (lora/bnb.py), on a copy of the old parameter's attributes (which the snapshot keeps)
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)

    def _snapshot(self) -> tuple:
        base = self.get_base_layer()
        return base.weight, getattr(base, "quant_state", None)

    def _restore(self, snapshot: tuple) -> None:
        base = self.get_base_layer()
        weight, quant_state = snapshot
        device = base.weight.device
        base.weight = weight if weight.device == device else weight.to(device)
        if hasattr(base, "quant_state"):
            base.quant_state = base.weight.quant_state if quant_state is not None else None


class Linear8bitLt(_QuantizedLinear):
    """InfLoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), int8 weights)."""

    bits = 8

    def dequantized_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        return dequantize_bnb_weight(base.weight, state=base.state)

    def _requantize(self, weight: torch.Tensor) -> None:
        bnb = _bitsandbytes()
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                        has_fp16_weights=old.has_fp16_weights).to(old.device)
        base.state.reset_grads()  # the forward takes CB / SCB from the new weight

    def _snapshot(self) -> tuple:
        base = self.get_base_layer()
        return base.weight, base.weight.CB, base.weight.SCB, base.state.CB, base.state.SCB

    def _restore(self, snapshot: tuple) -> None:
        base = self.get_base_layer()
        weight, weight_cb, weight_scb, state_cb, state_scb = snapshot
        device = base.weight.device
        move = (lambda t: t if t is None or t.device == device else t.to(device))  # noqa: E731
        base.weight = move(weight)
        base.weight.CB, base.weight.SCB = move(weight_cb), move(weight_scb)
        base.state.reset_grads()
        base.state.CB, base.state.SCB = move(state_cb), move(state_scb)
