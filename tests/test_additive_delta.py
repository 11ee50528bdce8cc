"""``get_additive_delta`` (PEFT >= 0.22): ``W' - W``, what ``merge_adapter`` adds to each base weight, in the adapter's
dtype; and ``supports_lora_conversion()`` on the model, a question answered with a bool (``convert_to_lora`` itself
raises saying why, see ``test_export_lora.py``).

Reference: an independent float64 product of the layer's factors, ``past_A past_B + A_t B_t`` (``fold="adapter"``)
or ``A_t B_t`` alone (``fold="base"``: the finished tasks are inside ``W`` already), transposed for ``Conv1D``.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_inflora import InfLoRAConfig


class TwoLayers(nn.Module):
    """``lin (16 -> 12)`` then ``conv`` (transformers' ``Conv1D``, 12 -> 8, weight stored ``d_in x d_out``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.conv = Conv1D(8, 12)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(torch.tanh(self.lin(x)))


def batches(seed: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(16, 16, generator=g).to(dtype)} for _ in range(2)]


def model_with_a_task_in_progress(fold: str, finished: int = 2, dtype: torch.dtype = torch.float32):
    """Two finished tasks (random ``A_t``: ``init_weights=False``), then a third begun."""
    torch.manual_seed(0)
    base = TwoLayers().to(dtype)
    model = get_peft_model(base, InfLoRAConfig(r=3, target_modules=["lin", "conv"], init_weights=False, fold=fold,
                                               energy_threshold=0.5))
    for task in range(finished):
        model.begin_task(batches(task, dtype), progress=False)
        model.end_task(batches(task, dtype), progress=False)
    model.begin_task(batches(finished, dtype), progress=False)
    return model


def additive_delta(layer, adapter: str = "default") -> torch.Tensor:
    """PEFT's public method where PEFT has it (>= 0.22), else the layer's own (the method behind it)."""
    method = getattr(layer, "get_additive_delta", None) or layer._get_additive_delta
    return method(adapter)


def reference_delta(layer, fold: str, transposed: bool) -> torch.Tensor:
    A, B = layer.inflora_A["default"].detach().double(), layer.inflora_B["default"].double()
    delta = A @ B
    if fold == "adapter":
        delta = delta + layer.inflora_past_A["default"].double() @ layer.inflora_past_B["default"].double()
    return delta.T if transposed else delta


@pytest.mark.parametrize("fold", ["adapter", "base"])
def test_the_additive_delta_is_what_merging_adds_to_each_base_weight(fold):
    model = model_with_a_task_in_progress(fold)
    layers = {"lin": model.base_model.model.lin, "conv": model.base_model.model.conv}
    assert all(layer.inflora_past_A["default"].shape[1] > 0 for layer in layers.values())  # finished tasks to add
    deltas = {name: additive_delta(layer) for name, layer in layers.items()}
    before = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
    for name, layer in layers.items():
        expected = reference_delta(layer, fold, transposed=name == "conv")
        assert deltas[name].shape == before[name].shape  # the base weight's layout: Conv1D's is d_in x d_out
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(deltas[name].double(), expected, atol=1e-6, rtol=0)
    model.merge_adapter()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_base_layer().weight - before[name], deltas[name], atol=1e-6, rtol=0)


def test_the_additive_delta_has_the_adapters_dtype_not_the_base_weights():
    model = model_with_a_task_in_progress("adapter", dtype=torch.bfloat16)
    layer = model.base_model.model.lin
    assert layer.get_base_layer().weight.dtype == torch.bfloat16 and layer.inflora_A["default"].dtype == torch.float32
    delta = additive_delta(layer)
    assert delta.dtype == torch.float32  # not rounded to bf16 on the way
    torch.testing.assert_close(delta.double(), reference_delta(layer, "adapter", transposed=False), atol=1e-6,
                               rtol=0)


def test_the_model_answers_whether_it_can_be_converted_to_lora_without_raising():
    model = model_with_a_task_in_progress("adapter")
    assert model.base_model.supports_lora_conversion() is False  # a task in progress: convert_to_lora would refuse
    model.end_task(batches(2), progress=False)
    assert model.base_model.supports_lora_conversion() is True
    assert model.base_model.supports_lora_conversion("other") is False  # no such adapter
    with torch.no_grad():
        model.base_model.model.lin.inflora_past_A["default"][0, 0] = float("nan")
    assert model.base_model.supports_lora_conversion() is False
