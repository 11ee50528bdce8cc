"""``cache_past_weight``: with ``fold="adapter"`` the finished tasks run as one cached ``W + past_A past_B``.

The cache must be invisible: same outputs and gradients as the two-factor path, never saved, rebuilt whenever the base
weight or the past factors change, and bypassed where it would be wrong. What it buys: the number of matmuls of an
adapted layer's forward no longer depends on how many tasks are finished.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_model import D_IN, layer, make_mlp_model, outputs, run_tasks, subspace_batches, train
from torch.overrides import TorchFunctionMode


MATMULS = {"linear", "matmul", "mm", "addmm", "bmm", "__matmul__", "einsum"}


class CountMatmuls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in MATMULS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def matmuls_per_forward(model, name: str = "lin0") -> int:
    counter = CountMatmuls()
    with torch.no_grad(), counter:
        layer(model, name)(torch.randn(3, D_IN))
    return counter.n


def tasks(n: int) -> list[list[dict]]:
    return [subspace_batches(10 + k, dim=3) for k in range(n)]


def finished(n_tasks: int, begin_next: bool = True, **config) -> torch.nn.Module:
    model = make_mlp_model(**config)
    run_tasks(model, tasks(n_tasks))
    if begin_next:
        model.begin_task(subspace_batches(99, dim=3), progress=False)
    return model


def test_cached_and_factored_forward_give_the_same_outputs_and_gradients():
    cached, factored = finished(3), finished(3, cache_past_weight=False)
    batches = subspace_batches(5, dim=6)
    torch.testing.assert_close(outputs(cached, batches), outputs(factored, batches), atol=1e-6, rtol=1e-6)
    for model in (cached, factored):
        model.train()
        model(**batches[0]).backward()
    for name in ("lin0", "lin1"):
        g_cached = layer(cached, name).inflora_A["default"].grad
        g_factored = layer(factored, name).inflora_A["default"].grad
        assert g_cached is not None and g_cached.abs().sum() > 0
        torch.testing.assert_close(g_cached, g_factored, atol=1e-6, rtol=1e-5)
    assert layer(cached, "lin0")._past_weight_cache and not layer(factored, "lin0")._past_weight_cache


def test_the_forward_costs_the_same_number_of_matmuls_after_one_task_and_after_five():
    one, five = finished(1), finished(5)
    assert matmuls_per_forward(one) == matmuls_per_forward(five) == 3  # W' x, then A_t (B_t x)
    assert matmuls_per_forward(finished(5, cache_past_weight=False)) == 5  # plus past_A (past_B x)


def test_the_cache_is_not_saved_and_a_reloaded_model_matches(tmp_path):
    model = finished(2, begin_next=False)
    batches = subspace_batches(5, dim=6)
    expected = outputs(model, batches)
    assert not any("cache" in key for key in model.state_dict())
    model.save_pretrained(tmp_path)
    from peft import PeftModel
    from test_model import MLP

    torch.manual_seed(0)  # the base weights make_mlp_model started from
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    torch.testing.assert_close(outputs(loaded, batches), expected, atol=1e-6, rtol=0)


def test_the_cache_follows_every_change_of_the_base_weight_or_the_past():
    model = finished(2)
    reference = finished(2, cache_past_weight=False)
    batches = subspace_batches(5, dim=6)

    def same() -> None:
        torch.testing.assert_close(outputs(model, batches), outputs(reference, batches), atol=1e-5, rtol=1e-5)

    same()
    for m in (model, reference):  # another finished task: past_A / past_B are new tensors
        train(m, subspace_batches(99, dim=3), steps=5)
        m.end_task(subspace_batches(99, dim=3), progress=False)
    same()
    for m in (model, reference):  # an in-place change of W (same storage, new version)
        with torch.no_grad():
            m.base_model.model.lin0.base_layer.weight.mul_(1.5)
    same()
    for m in (model, reference):  # merge writes into W; the merged forward must not add the past twice
        m.merge_adapter()
    same()
    for m in (model, reference):
        m.unmerge_adapter()
    same()
    with model.disable_adapter(), reference.disable_adapter():
        same()
    model.double()  # a new dtype: the cache is rebuilt in float64 and matches the factors to float64 precision
    doubles = [{"x": b["x"].double()} for b in batches]
    with_cache = outputs(model, doubles)
    for module in model.base_model.inflora_layers().values():
        module.cache_past_weight["default"] = False
    torch.testing.assert_close(with_cache, outputs(model, doubles), atol=1e-12, rtol=0)


def test_a_cache_built_under_inference_mode_serves_a_training_step():
    model = finished(2)
    batch = subspace_batches(5, dim=6)[0]
    with torch.inference_mode():
        model(batch["x"])
    model.train()
    model(**batch).backward()
    assert layer(model, "lin0").inflora_A["default"].grad is not None


@pytest.mark.parametrize("reason", ["base weight trains", "forward hook on the base layer", "deepcopy"])
def test_layers_where_a_cache_would_be_wrong_use_the_factors(reason):
    model = finished(3)
    reference = finished(3, cache_past_weight=False)
    batches = subspace_batches(5, dim=6)
    lin0 = layer(model, "lin0")
    if reason == "base weight trains":
        lin0.base_layer.weight.requires_grad_(True)
        layer(reference, "lin0").base_layer.weight.requires_grad_(True)
        assert matmuls_per_forward(model) == 5
    elif reason == "forward hook on the base layer":  # e.g. Accelerate offloading or a statistics hook
        seen = []
        lin0.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        outputs(model, batches)
        assert seen, "the base layer's hook must still run"
    else:  # a copy has its own storage: its cache is rebuilt, not shared with the original's W
        model = copy.deepcopy(model)
        with torch.no_grad():
            layer(model, "lin0").base_layer.weight.add_(1.0)
            layer(reference, "lin0").base_layer.weight.add_(1.0)
    torch.testing.assert_close(outputs(model, batches), outputs(reference, batches), atol=1e-5, rtol=1e-5)


def test_fold_base_does_not_need_the_cache():
    base_folded = finished(2, fold="base")
    assert matmuls_per_forward(base_folded) == 3
    assert not layer(base_folded, "lin0")._past_weight_cache


def test_several_active_adapters_use_the_factors():
    from peft_inflora import InfLoRAConfig

    model = finished(2)
    single = outputs(model, subspace_batches(5, dim=6))
    model.add_adapter("second", InfLoRAConfig(r=2, target_modules=["lin0", "lin1"]))
    lin0 = layer(model, "lin0")
    model.base_model.set_adapter(["default", "second"])
    lin0._past_weight_cache.clear()
    both = outputs(model, subspace_batches(5, dim=6))
    assert not lin0._past_weight_cache
    torch.testing.assert_close(both, single, atol=1e-5, rtol=1e-5)  # "second" has no task yet: adds nothing


def test_a_new_past_tensor_at_a_freed_tensors_address_and_version_is_not_served_from_the_cache():
    """The cache key holds the past factors themselves: a new tensor that lands at the old one's address with the same
    version counter (the allocator may reuse a freed block) must rebuild the sum, not reuse the stale one."""
    model = finished(2, begin_next=False)
    lin0 = layer(model, "lin0")
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        old = lin0.inflora_past_A["default"]
        old.mul_(1.0)  # version 1, the version a tensor made by set_() starts with
        lin0(x)  # builds the cache
        same_place = torch.empty(0).set_(old.untyped_storage(), old.storage_offset(), old.shape, old.stride())
        assert same_place.data_ptr() == old.data_ptr() and same_place._version == old._version
        lin0.inflora_past_A["default"] = same_place  # a different tensor object at the same address ...
        same_place.data.mul_(2.0)  # ... with other values, written without bumping the version counter
        assert same_place._version == old._version
        expected = lin0.base_layer(x) + x @ lin0.inflora_past_B["default"].T @ same_place.T
        torch.testing.assert_close(lin0(x), expected, atol=1e-5, rtol=1e-5)
