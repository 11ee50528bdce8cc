"""Robustness (issue 7, parts 1, 2, 3 and 6).

1. Bad inputs: every bad input fails with an error of a documented type whose message says what to change, and the
   failed call loses nothing: the model's full state dict (parameters and buffers, compared bit for bit), its modules,
   ``requires_grad`` flags and continual state (tasks done, task in progress, memory) are what they were before. For
   loading errors the base model handed to ``PeftModel.from_pretrained`` is left as it was given.
2. Interference, measured: ``InfLoRAModel.interference_report`` bounds how far training the new task moves the
   adapted layers' outputs on an old task, and is ~0 when the memory keeps all the old tasks' energy.
3. Precision and determinism: half-precision models give finite float32+ statistics; equal data and seeds give
   bit-identical designs; a failing eigensolver falls back with a warning.
6. Security: nothing in the package unpickles; pickle adapter files are refused and never executed.

Decisions documented here (and in the docstrings):

* an ``adapter_config.json`` with fields this version does not know is refused (``UnknownConfigFieldError``, naming the
  fields and saying to upgrade peft-inflora), not dropped with a warning as PEFT does for its own configs: such a field
  may change how later tasks are designed or protected;
* an adapter folder holding only ``adapter_model.bin`` is refused (``AdapterFileError``) before anything is loaded.
  (PEFT itself would unpickle it with ``torch.load(weights_only=True)``, which also refuses to run code: tested too.)
"""

from __future__ import annotations

import ast
import copy
import os
import pathlib
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import (
    causal_lm_batches,
    image_classification_batches,
    text_classification_batches,
    tiny_bert,
    tiny_llama,
    tiny_vit,
)
from torch import nn

import peft_inflora
from peft_inflora import (
    AdapterFileError,
    InfLoRAConfig,
    StatisticsError,
    SubspaceExhaustedError,
    SubspaceWarning,
    TaskLifecycleError,
    UnknownConfigFieldError,
)
from peft_inflora.subspace import Memory, design_eigen


D_IN, D_HID, D_OUT = 16, 12, 4


# ============================================================================================ models and data
class MLP(nn.Module):
    """``lin0 -> tanh -> lin1``; ``forward(x, labels=None)`` returns the MSE loss when labels are given."""

    def __init__(self, d_in: int = D_IN) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, D_HID)
        self.lin1 = nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None):
        out = self.lin1(torch.tanh(self.lin0(x)))
        return out if labels is None else nn.functional.mse_loss(out, labels)


class MixedModules(MLP):
    """The MLP plus modules InfLoRA cannot adapt, registered *after* ``lin0`` (so ``lin0`` is met first)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, D_IN)
        self.conv = nn.Conv2d(3, 3, 1)


def fresh_mlp(d_in: int = D_IN) -> MLP:
    torch.manual_seed(0)
    return MLP(d_in)


def mlp_model(**config) -> PeftModel:
    kwargs = dict(r=3, target_modules=["lin0", "lin1"])
    kwargs.update(config)
    return get_peft_model(fresh_mlp(), InfLoRAConfig(**kwargs))


def subspace_batches(seed: int, dim: int, d_in: int = D_IN, n_batches: int = 3, batch: int = 16) -> list[dict]:
    """Inputs confined to a random ``dim``-dimensional subspace of R^d_in (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_in, dim, generator=g))[0]
    return [{"x": torch.randn(batch, dim, generator=g) @ basis.T, "labels": torch.randn(batch, D_OUT, generator=g)}
            for _ in range(n_batches)]


def sgd_steps(model: nn.Module, batches: list[dict], steps: int = 5, lr: float = 0.5) -> None:
    """A few plain SGD steps on the model's loss (``.loss`` of a transformers output, or the returned tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    model.train()
    for step in range(steps):
        out = model(**batches[step % len(batches)])
        loss = out if isinstance(out, torch.Tensor) else out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def run_task(model, batches, steps: int = 5, lr: float = 0.5) -> None:
    model.begin_task(batches, progress=False)
    sgd_steps(model, batches, steps, lr)
    model.end_task(batches, progress=False)


def inflora_layers(model) -> dict:
    return model.base_model.inflora_layers()


# ============================================================================================ "nothing lost"
@dataclass
class Snapshot:
    state: dict
    requires_grad: dict
    module_types: dict
    training: bool
    continual: Optional[dict]


def snapshot(model: nn.Module) -> Snapshot:
    """Everything a failed call must leave alone: all tensors of the state dict (parameters and buffers), which
    parameters train, which module sits where, and, for a PeftModel, each adapter's continual state."""
    continual = None
    if isinstance(model, PeftModel):
        continual = {}
        for name in model.peft_config:
            capacity = [(c.layers, c.d_in, c.memory_dimension, c.free_dimension, c.memory_form)
                        for c in model.base_model.capacity_report(name)]
            continual[name] = (model.base_model.tasks_done(name), model.base_model.task_in_progress(name), capacity)
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        module_types={n: type(m) for n, m in model.named_modules()},
        training=model.training,
        continual=continual,
    )


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    # NaN != NaN: compare NaN positions and the rest (for a deliberately diverged A_t)
    return a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0),
                                                                                     b.nan_to_num(0.0))


def assert_nothing_lost(before: Snapshot, model: nn.Module) -> None:
    after = snapshot(model)
    assert after.module_types == before.module_types
    assert after.state.keys() == before.state.keys()
    changed = [k for k in before.state if not _bitwise_equal(before.state[k], after.state[k])]
    assert not changed, f"tensors changed by a failed call: {changed}"
    assert after.requires_grad == before.requires_grad
    assert after.training == before.training
    assert after.continual == before.continual
    if not isinstance(model, PeftModel):
        assert "peft_config" not in model.__dict__, "the base model still carries a PEFT config"


# ============================================================================================ 1. bad inputs
# ------------------------------------------------------------------------------------------- creating a model
def test_target_module_missing_from_the_model_is_refused_and_the_base_model_untouched():
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"not found in the base model\. Please check the target modules"):
        get_peft_model(base, InfLoRAConfig(r=2, target_modules=["lin_missing"]))
    assert_nothing_lost(before, base)


@pytest.mark.parametrize("unsupported", ["emb", "conv"])
def test_unsupported_module_type_is_refused_before_any_module_is_replaced(unsupported):
    """``lin0`` is supported and met first: without the upfront check it would already be wrapped."""
    base = MixedModules()
    before = snapshot(base)
    kind = {"emb": "Embedding", "conv": "Conv2d"}[unsupported]
    with pytest.raises(TypeError, match=rf"Target module '{unsupported}' of type {kind} is not supported by InfLoRA: "
                                        r"only torch.nn.Linear .* Remove it from `target_modules`"):
        get_peft_model(base, InfLoRAConfig(r=2, target_modules=["lin0", unsupported]))
    assert_nothing_lost(before, base)


@pytest.mark.parametrize("config", [dict(r=0), dict(r=-3), dict(r=2.5), dict(r=2, rank_pattern={"lin1": 0})])
def test_rank_below_one_is_refused_by_the_config(config):
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"must be an int >= 1, got .*: use "):
        get_peft_model(base, InfLoRAConfig(target_modules=["lin0", "lin1"], **config))
    assert_nothing_lost(before, base)


def test_rank_larger_than_a_layer_allows_is_refused_before_any_module_is_replaced():
    """r=5 fits lin0 (16 -> 12) but not lin1 (12 -> 4); lin0 comes first."""
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"r=5 is larger than layer 'lin1' allows .* use r <= 4, or give this layer a "
                                         r"smaller rank with rank_pattern=\{'lin1': 4\}"):
        get_peft_model(base, InfLoRAConfig(r=5, target_modules=["lin0", "lin1"]))
    assert_nothing_lost(before, base)


def test_adding_a_second_adapter_with_a_too_large_rank_leaves_the_first_adapter_alone():
    model = mlp_model()
    run_task(model, subspace_batches(1, dim=5))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"use r <= 4"):
        model.add_adapter("other", InfLoRAConfig(r=5, target_modules=["lin0", "lin1"]))
    assert "other" not in model.peft_config
    assert_nothing_lost(before, model)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, 95, float("nan")])
def test_energy_threshold_outside_zero_one_is_refused(threshold):
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"energy_threshold must be in \(0, 1\].*fraction of energy, not a percent"):
        get_peft_model(base, InfLoRAConfig(r=2, target_modules=["lin0"], energy_threshold=threshold))
    assert_nothing_lost(before, base)


@pytest.mark.parametrize("field, value, advice", [
    ("design", "svd", r"design must be one of \['eigen', 'random'\], got 'svd': use 'eigen'"),
    ("memory", "ogd", r"memory must be one of \['dualgpm', 'gpm'\], got 'ogd': use 'dualgpm'"),
])
def test_unknown_design_or_memory_kind_is_refused_by_the_config(field, value, advice):
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=advice):
        get_peft_model(base, InfLoRAConfig(r=2, target_modules=["lin0"], **{field: value}))
    assert_nothing_lost(before, base)


@pytest.mark.parametrize("field, value, advice", [
    ("design", "svd", r"design must be one of .* use 'eigen'"),
    ("memory", "ogd", r"memory must be one of .* use 'dualgpm'"),
])
def test_a_config_field_broken_after_creation_is_caught_before_the_task_changes(field, value, advice):
    model = mlp_model()
    batches = subspace_batches(1, dim=5)
    model.begin_task(batches, progress=False)
    sgd_steps(model, batches)
    setattr(model.peft_config["default"], field, value)
    before = snapshot(model)
    with pytest.raises(ValueError, match=advice):
        model.end_task(batches, progress=False)
    assert_nothing_lost(before, model)
    assert model.task_in_progress()


# ------------------------------------------------------------------------------------------- task lifecycle
def test_begin_task_twice_is_refused_and_keeps_the_task_in_progress():
    model = mlp_model()
    batches = subspace_batches(1, dim=5)
    model.begin_task(batches, progress=False)
    sgd_steps(model, batches)
    before = snapshot(model)
    with pytest.raises(TaskLifecycleError, match=r"already in progress: call `end_task\(batches\)` to keep it or "
                                                 r"`abort_task\(\)`"):
        model.begin_task(subspace_batches(2, dim=4), progress=False)
    assert_nothing_lost(before, model)


def test_end_task_before_begin_task_is_refused():
    model = mlp_model()
    run_task(model, subspace_batches(1, dim=5))
    before = snapshot(model)
    with pytest.raises(TaskLifecycleError, match=r"No task .* is in progress: call `begin_task\(batches\)` before"):
        model.end_task(subspace_batches(1, dim=5), progress=False)
    assert_nothing_lost(before, model)


@pytest.mark.parametrize("empty", [[], iter([]), (b for b in [])], ids=["list", "iterator", "generator"])
def test_empty_batches_are_refused(empty):
    model = mlp_model()
    before = snapshot(model)
    with pytest.raises(StatisticsError, match=r"`batches` is empty: the statistics pass needs at least one batch"):
        model.begin_task(empty, progress=False)
    assert_nothing_lost(before, model)


def test_batches_that_are_all_padding_are_refused():
    model = get_peft_model(tiny_bert(), InfLoRAConfig(r=4, target_modules=["query", "value"]))
    batches = text_classification_batches(n_batches=2)
    for batch in batches:
        batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    before = snapshot(model)
    with pytest.raises(StatisticsError, match=r"No non-padding tokens reached layer .* Check the batches' "
                                              r"attention_mask"):
        model.begin_task(batches, progress=False)
    assert_nothing_lost(before, model)


def test_batches_without_the_inputs_the_model_needs_are_refused():
    model = get_peft_model(tiny_bert(), InfLoRAConfig(r=4, target_modules=["query", "value"]))
    batches = [{k: v for k, v in batch.items() if k != "input_ids"} for batch in text_classification_batches()]
    before = snapshot(model)
    with pytest.raises(StatisticsError, match=r"must hold the inputs the model's forward needs \(got keys "
                                              r"\['attention_mask'\]\)"):
        model.begin_task(batches, progress=False)
    assert_nothing_lost(before, model)


def test_nan_inputs_make_non_finite_statistics_and_are_refused():
    model = get_peft_model(tiny_vit(), InfLoRAConfig(r=4))
    batches = image_classification_batches(n_batches=2)
    for batch in batches:  # every batch: the default token budget may read only one of them
        batch["pixel_values"][2, 0, 3, 3] = float("nan")
    before = snapshot(model)
    with pytest.raises(StatisticsError, match=r"contain NaN or inf: the model produced non-finite activations .*"
                                              r"check the data, or load the model in a wider dtype"):
        model.begin_task(batches, progress=False)
    assert_nothing_lost(before, model)


def test_a_model_whose_activations_overflow_is_refused():
    base = tiny_bert()
    with torch.no_grad():
        base.bert.embeddings.word_embeddings.weight.mul_(1e38)  # the embedding LayerNorm overflows: inf / NaN
    model = get_peft_model(base, InfLoRAConfig(r=4, target_modules=["query", "value"]))
    before = snapshot(model)
    with pytest.raises(StatisticsError, match=r"NaN or inf"):
        model.begin_task(text_classification_batches(n_batches=2), progress=False)
    assert_nothing_lost(before, model)


def test_non_finite_end_task_batches_are_refused_and_the_task_stays_in_progress():
    model = get_peft_model(tiny_vit(), InfLoRAConfig(r=4))
    batches = image_classification_batches(n_batches=2)
    model.begin_task(batches, progress=False)
    sgd_steps(model, batches, lr=0.05)
    bad = copy.deepcopy(batches)
    bad[0]["pixel_values"][0] = float("inf")
    before = snapshot(model)
    with pytest.raises(StatisticsError, match=r"NaN or inf"):
        model.end_task(bad, progress=False)
    assert_nothing_lost(before, model)
    model.end_task(batches, progress=False)  # the task can still be finished with good data
    assert model.tasks_done() == 1


def test_a_diverged_branch_is_not_folded_into_the_past():
    model = mlp_model()
    batches = subspace_batches(1, dim=5)
    model.begin_task(batches, progress=False)
    with torch.no_grad():
        inflora_layers(model)["lin1"].inflora_A["default"][0, 0] = float("nan")  # what a diverged optimiser leaves
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'lin1', holds NaN or inf: training diverged\. Call `abort_task\(\)`"):
        model.end_task(batches, progress=False)
    assert_nothing_lost(before, model)
    model.abort_task()
    assert model.tasks_done() == 0 and not model.task_in_progress()


def test_more_tasks_than_total_tasks_are_refused():
    model = mlp_model(total_tasks=2, energy_threshold=0.9)
    for seed in (1, 2):
        run_task(model, subspace_batches(seed, dim=3))
    before = snapshot(model)
    with pytest.raises(TaskLifecycleError, match=r"finished all total_tasks=2 tasks: raise `total_tasks` in the "):
        model.begin_task(subspace_batches(3, dim=3), progress=False)
    assert_nothing_lost(before, model)


def test_an_exhausted_subspace_is_refused_with_what_to_change():
    """d_in = 4, threshold 1.0: two tasks of 2 input dimensions each fill the whole input space."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(4, 6))
    model = get_peft_model(_SequentialX(base), InfLoRAConfig(r=2, target_modules=["lin"], energy_threshold=1.0,
                                                             energy="linear"))
    for seed in (1, 2):
        run_task(model, subspace_batches(seed, dim=2, d_in=4))
    assert model.base_model.capacity_report()[0].free_dimension == 0
    before = snapshot(model)
    with pytest.raises(SubspaceExhaustedError, match=r"memory spans 4 of its 4 input dimensions\. Lower "
                                                     r"`energy_threshold` .* or continue with a new adapter"):
        model.begin_task(subspace_batches(3, dim=2, d_in=4), progress=False)
    assert_nothing_lost(before, model)


def test_fewer_free_directions_than_r_warn_and_give_a_smaller_rank():
    """Not an error: the task gets the directions that are left, and the warning says what to change."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(4, 6))
    model = get_peft_model(_SequentialX(base), InfLoRAConfig(r=3, target_modules=["lin"], energy_threshold=1.0,
                                                             energy="linear"))
    run_task(model, subspace_batches(1, dim=3, d_in=4))
    with pytest.warns(SubspaceWarning, match=r"Only 1 of r=3 directions are free .* Lower `energy_threshold`"):
        ranks = model.begin_task(subspace_batches(2, dim=4, d_in=4), progress=False)
    assert ranks == {"inner.lin": 1}


class _SequentialX(nn.Module):
    """Wraps a module so it takes ``x`` (and ignores ``labels`` but for the loss), like the MLP."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, labels=None):
        out = self.inner(x)
        return out if labels is None else nn.functional.mse_loss(out[:, :D_OUT], labels)


# ------------------------------------------------------------------------------------------- loading adapters
@pytest.fixture
def saved_adapter(tmp_path) -> pathlib.Path:
    """An MLP adapter after one task, saved with save_pretrained (safetensors)."""
    model = mlp_model()
    run_task(model, subspace_batches(1, dim=5))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder


def _copy(folder: pathlib.Path, name: str) -> pathlib.Path:
    target = folder.parent / name
    shutil.copytree(folder, target)
    return target


def test_a_good_adapter_loads(saved_adapter):
    """The reference for the failures below: the same folder, unmodified, loads onto the same base."""
    loaded = PeftModel.from_pretrained(fresh_mlp(), saved_adapter)
    assert loaded.tasks_done() == 1


def test_an_adapter_for_a_base_model_with_other_shapes_is_refused_and_the_base_left_as_given(saved_adapter):
    base = fresh_mlp(d_in=D_IN + 2)
    before = snapshot(base)
    folder = re.escape(str(saved_adapter))
    with pytest.raises(ValueError, match=rf"The adapter in {folder}: .* this adapter was saved for a base model "
                                         r"with other shapes\. Load it onto the base model it was trained on"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert_nothing_lost(before, base)


def test_load_adapter_of_a_misfitting_adapter_keeps_the_loaded_one(saved_adapter, tmp_path):
    wide = get_peft_model(fresh_mlp(d_in=D_IN + 2), InfLoRAConfig(r=3, target_modules=["lin0", "lin1"]))
    wide.save_pretrained(tmp_path / "wide")
    model = PeftModel.from_pretrained(fresh_mlp(), saved_adapter)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"other shapes"):
        model.load_adapter(tmp_path / "wide", adapter_name="wide")
    assert "wide" not in model.peft_config
    assert_nothing_lost(before, model)


def test_an_adapter_for_other_target_modules_is_refused(saved_adapter):
    weights = load_file(saved_adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".lin1." not in k}, saved_adapter / "adapter_model.safetensors")
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"has no '.*lin1.*': it is truncated, or was saved from a model with other "
                                         r"adapted layers\. Load it onto the base model and target_modules"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert_nothing_lost(before, base)


def test_a_failed_load_gives_a_transformers_base_model_back_with_its_own_classifier(tmp_path):
    """The adapted layers and the modules_to_save wrapper of the classifier are taken out again."""
    model = get_peft_model(tiny_bert(), InfLoRAConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                      modules_to_save=["classifier"]))
    run_task(model, text_classification_batches(n_batches=2), lr=0.05)
    model.save_pretrained(tmp_path / "bert")
    path = tmp_path / "bert" / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if "layer.1" in k and k.endswith(".inflora_memory"))
    weights[key][0, 0] = float("inf")
    save_file(weights, path)
    base = tiny_bert()
    classifier = base.classifier
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"holds NaN or inf values: the adapter file is corrupted"):
        PeftModel.from_pretrained(base, tmp_path / "bert")
    assert_nothing_lost(before, base)
    assert base.classifier is classifier


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_corrupted_safetensors_file_is_refused_naming_it(saved_adapter, damage):
    path = saved_adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40] if damage == "truncated" else b"\x00garbage" * 64)
    base = fresh_mlp()
    before = snapshot(base)
    file = re.escape(str(path))
    with pytest.raises(AdapterFileError, match=rf"{file} cannot be read .* truncated or corrupted.* Download or "
                                               r"copy the adapter again"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert_nothing_lost(before, base)


def test_non_finite_values_in_a_readable_adapter_file_are_refused(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if "inflora_past_A" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, path)
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"holds NaN or inf values: the adapter file is corrupted\. Download or copy"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert_nothing_lost(before, base)


def test_inconsistent_continual_state_in_an_adapter_file_is_refused(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if "inflora_task_ranks" in k)
    weights[key] = weights[key] + 1  # ranks no longer add up to the past factors' size
    save_file(weights, path)
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"is inconsistent .* the adapter file is corrupted"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert_nothing_lost(before, base)


@pytest.mark.parametrize("loader", ["PeftModel.from_pretrained", "InfLoRAConfig.from_pretrained"])
def test_a_config_with_fields_from_a_newer_version_is_refused_naming_them(saved_adapter, loader):
    import json

    config_path = saved_adapter / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved.update(orthogonality_solver="lobpcg", replay_buffer=16)
    config_path.write_text(json.dumps(saved))
    base = fresh_mlp()
    before = snapshot(base)
    with pytest.raises(UnknownConfigFieldError, match=r"no field\(s\) \['orthogonality_solver', 'replay_buffer'\]\. "
                                                      r"If they come from .* newer peft-inflora, upgrade it: pip "
                                                      r"install -U peft-inflora"):
        if loader == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(base, saved_adapter)
        else:
            InfLoRAConfig.from_pretrained(saved_adapter)
    assert_nothing_lost(before, base)


def test_unknown_config_fields_are_also_a_type_error_when_typed_in_code():
    with pytest.raises(TypeError, match=r"\['energy_treshold'\].* If they are typos, the known fields are"):
        InfLoRAConfig(energy_treshold=0.9)


# ============================================================================================ 6. security
PWNED = {"flag": False}


def _payload_ran() -> str:
    PWNED["flag"] = True
    return "pwned"


class _Malicious:
    """Unpickling this object calls ``_payload_ran``: the classic pickle code-execution payload."""

    def __reduce__(self):
        return (_payload_ran, ())


def _write_pickle_adapter(saved_adapter: pathlib.Path, malicious: bool) -> pathlib.Path:
    folder = _copy(saved_adapter, "pickled")
    weights = load_file(folder / "adapter_model.safetensors")
    os.remove(folder / "adapter_model.safetensors")
    payload = dict(weights, **({"trap": _Malicious()} if malicious else {}))
    torch.save(payload, folder / "adapter_model.bin")
    return folder


def test_an_adapter_folder_with_only_adapter_model_bin_is_refused(saved_adapter):
    folder = _write_pickle_adapter(saved_adapter, malicious=False)
    base = fresh_mlp()
    before = snapshot(base)
    name = re.escape(str(folder))
    with pytest.raises(AdapterFileError, match=rf"{name} holds the adapter weights only as adapter_model\.bin, a "
                                               r"pickle file.* loads adapter weights only from safetensors.* Save "
                                               r"the adapter again with model\.save_pretrained"):
        PeftModel.from_pretrained(base, folder)
    assert_nothing_lost(before, base)


def test_a_malicious_pickle_adapter_never_runs(saved_adapter):
    folder = _write_pickle_adapter(saved_adapter, malicious=True)
    # the payload is live: an unrestricted unpickler runs it
    PWNED["flag"] = False
    torch.load(folder / "adapter_model.bin", weights_only=False)
    assert PWNED["flag"]
    PWNED["flag"] = False
    with pytest.raises(AdapterFileError):
        PeftModel.from_pretrained(fresh_mlp(), folder)
    assert not PWNED["flag"]
    # defence in depth: PEFT's own loader (what would run without our check) unpickles with weights_only=True
    from peft.utils import load_peft_weights

    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_peft_weights(str(folder), device="cpu")
    assert not PWNED["flag"]


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def unsafe_deserialisation(source: str) -> list[str]:
    """Calls in ``source`` that can unpickle: imports of pickle-like modules, ``torch.load`` without
    ``weights_only=True``, ``numpy.load(..., allow_pickle=True)``, ``pickle``-like names used at all."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            problems.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Name) and node.id in PICKLE_MODULES:
            problems.append(f"name {node.id}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "load" and isinstance(func, ast.Attribute) and ast.unparse(func.value) == "torch":
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(f"line {node.lineno}: {ast.unparse(node)}")
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"line {node.lineno}: {ast.unparse(node)}")
    return problems


def test_the_scanner_finds_unsafe_deserialisation():
    assert unsafe_deserialisation("import pickle")
    assert unsafe_deserialisation("from dill import loads")
    assert unsafe_deserialisation("import torch\ntorch.load(path)")
    assert unsafe_deserialisation("import torch\ntorch.load(path, weights_only=False)")
    assert unsafe_deserialisation("import numpy as np\nnp.load(path, allow_pickle=True)")
    assert not unsafe_deserialisation("import torch\ntorch.load(path, weights_only=True)")
    assert not unsafe_deserialisation("message = 'adapter_model.bin is a pickle file'")


def test_the_package_source_never_unpickles():
    package = pathlib.Path(peft_inflora.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) >= 5
    problems = {str(p.relative_to(package)): unsafe_deserialisation(p.read_text()) for p in sources}
    assert not {k: v for k, v in problems.items() if v}


# ============================================================================================ 2. interference
def test_interference_report_needs_a_task_in_progress_and_changes_nothing():
    model = mlp_model()
    task1 = subspace_batches(1, dim=5)
    run_task(model, task1)
    before = snapshot(model)
    with pytest.raises(TaskLifecycleError, match=r"No task .* is in progress: the interference report measures the "
                                                 r"designed B_t .* Call `begin_task\(new_task_batches\)` first"):
        model.interference_report(task1)
    assert_nothing_lost(before, model)
    model.begin_task(subspace_batches(2, dim=5), progress=False)
    before = snapshot(model)
    report = model.interference_report(task1)
    assert_nothing_lost(before, model)
    assert [g.layers for g in report] == [["lin0"], ["lin1"]]
    assert all(g.tokens == 48 and g.rank == 3 for g in report)


def test_interference_report_reads_every_batch_whatever_the_statistics_budget():
    """The report bounds the outputs on the batches it is given, so it must not sample them like begin_task does."""
    model = mlp_model(statistics_max_tokens=8, statistics_max_batches=1)
    task1 = subspace_batches(1, dim=5)  # 3 batches of 16 tokens
    run_task(model, task1)
    model.begin_task(subspace_batches(2, dim=5), progress=False)
    report = model.interference_report(task1)
    assert all(g.tokens == 48 for g in report)
    X = torch.cat([b["x"] for b in task1])
    assert report[0].input_norm == pytest.approx(float(torch.linalg.norm(X)), rel=1e-6)


def _layer_inputs(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The inputs (tokens x d_in) every adapted layer reads over ``batches`` (eval mode, no grad)."""
    seen: dict[str, list] = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].detach()))
               for name, layer in inflora_layers(model).items()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for n, xs in seen.items()}


def test_training_a_new_task_moves_old_outputs_no_more_than_the_interference_report_bounds():
    """Tiny ViT, 3 tasks, threshold 0.9 (so old inputs leak into B_t). For every old task and adapted layer, on the
    inputs the layer read before training:  ||Y_after - Y_before||_F <= leakage * ||dA||_2 * design_norm * input_norm.
    """
    model = get_peft_model(tiny_vit(), InfLoRAConfig(r=4, energy_threshold=0.9))
    tasks = [image_classification_batches(seed=500 + t, n_batches=2, shift=1.5 * t) for t in range(3)]
    run_task(model, tasks[0])
    largest_leakage, largest_change = 0.0, 0.0
    for t in (1, 2):
        model.begin_task(tasks[t], progress=False)
        layers = inflora_layers(model)
        a_before = {n: layer.inflora_A["default"].detach().clone() for n, layer in layers.items()}
        measured = []
        for old in range(t):
            report = {n: group for group in model.interference_report(tasks[old]) for n in group.layers}
            inputs = _layer_inputs(model, tasks[old])
            with torch.no_grad():
                outputs = {n: layers[n](x) for n, x in inputs.items()}
            measured.append((report, inputs, outputs))
            for n, x in inputs.items():  # the report measured exactly these inputs
                B = layers[n].inflora_B["default"].double()
                x = x.double()
                direct = (x @ B.T).norm() / (torch.linalg.matrix_norm(B, 2) * x.norm())
                assert report[n].input_norm == pytest.approx(x.norm().item(), rel=1e-6)
                assert report[n].tokens == x.shape[0]
                assert report[n].leakage == pytest.approx(direct.item(), rel=1e-6, abs=1e-9)
        sgd_steps(model, tasks[t], steps=5, lr=1.0)
        for report, inputs, outputs in measured:
            for n, x in inputs.items():
                with torch.no_grad():
                    change = (layers[n](x) - outputs[n]).double().norm().item()
                delta_a = torch.linalg.matrix_norm((layers[n].inflora_A["default"].detach() - a_before[n]).double(), 2)
                bound = report[n].bound(delta_a.item())
                float_slack = 1e-6 * outputs[n].double().norm().item()
                assert change <= bound * (1 + 1e-5) + float_slack, (n, change, bound)
                largest_leakage = max(largest_leakage, report[n].leakage)
                largest_change = max(largest_change, change)
        model.end_task(tasks[t], progress=False)
    # the bound was tested where it has something to bound
    assert largest_leakage > 1e-3 and largest_change > 1e-3


def test_with_threshold_one_the_leakage_is_zero_and_old_logits_do_not_move():
    """energy_threshold=1.0: the memory spans every old input, so training a new task leaves old outputs (logits of
    the whole model, only lin0 adapted) unchanged up to float error."""
    model = mlp_model(r=2, target_modules=["lin0"], energy_threshold=1.0)
    tasks = [subspace_batches(10 + t, dim=4) for t in range(3)]

    def logits(batches):
        model.eval()
        with torch.no_grad():
            return torch.cat([model(b["x"]) for b in batches])

    run_task(model, tasks[0])
    for t in (1, 2):
        old_logits = [logits(tasks[j]) for j in range(t)]
        model.begin_task(tasks[t], progress=False)
        for j in range(t):
            (group,) = model.interference_report(tasks[j])
            assert group.rank == 2 and group.leakage < 1e-6
        new_before = logits(tasks[t])
        sgd_steps(model, tasks[t], steps=10, lr=0.5)
        assert (logits(tasks[t]) - new_before).norm() > 1e-2  # the new task did learn something
        for j in range(t):
            relative = (logits(tasks[j]) - old_logits[j]).norm() / old_logits[j].norm()
            assert relative < 1e-5, (t, j, relative.item())
        model.end_task(tasks[t], progress=False)


# ============================================================================================ 3. precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("statistics_dtype", ["float32", "float64"])
def test_half_precision_statistics_are_accumulated_wide_and_stay_finite(dtype, statistics_dtype):
    """Tiny Llama in fp16 / bf16 with the final norm scaled so the adapted lm_head reads activations of ~1e3-1e4: the
    covariance sum (~1e9) would overflow an fp16 accumulator (max 65504); ours is float32 or float64."""
    base = tiny_llama().to(dtype)
    with torch.no_grad():
        base.model.norm.weight.mul_(3000.0)
    model = get_peft_model(base, InfLoRAConfig(r=4, target_modules=["lm_head"], statistics_dtype=statistics_dtype,
                                               statistics_max_tokens=None))  # compared with X over every batch
    batches = causal_lm_batches(n_batches=2)
    real_tokens = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    X = _layer_inputs(model, batches)["lm_head"][real_tokens]  # the statistics leave padding out
    assert X.dtype == dtype and 1e3 <= X.abs().max().item() <= 6e4
    S = X.double().T @ X.double()
    assert S.abs().max().item() > torch.finfo(torch.float16).max  # would overflow in fp16

    accumulators = []
    original = peft_inflora.statistics.CovarianceAccumulator.__post_init__

    def spy(self):
        original(self)
        accumulators.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft_inflora.statistics.CovarianceAccumulator, "__post_init__", spy)
        model.begin_task(batches, progress=False)
    assert accumulators and all(a.sum.dtype in (torch.float32, torch.float64) for a in accumulators)
    assert all(torch.isfinite(a.sum).all() for a in accumulators)
    tolerance = (1e-6 if statistics_dtype == "float32" else 1e-12) * S.abs().max().item()
    torch.testing.assert_close(accumulators[0].sum.double(), S, rtol=0, atol=tolerance)
    B = inflora_layers(model)["lm_head"].inflora_B["default"]
    assert B.dtype in (torch.float32, torch.float64) and torch.isfinite(B).all()
    reference = design_eigen(S / X.shape[0], Memory.empty(X.shape[1]), 4)
    torch.testing.assert_close(B.double() @ B.double().T, reference @ reference.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("design", ["eigen", "random"])
def test_the_same_data_and_seed_give_bit_identical_designs(design):
    """Two fresh models, the global RNG in different states: B_t and the memory agree bit for bit, task after task."""
    tasks = [text_classification_batches(seed=100 + t, low=3 + 40 * t, high=60 + 40 * t) for t in range(2)]
    models = []
    for global_seed in (1, 12345):
        torch.manual_seed(global_seed)
        models.append(get_peft_model(tiny_bert(seed=7), InfLoRAConfig(r=4, target_modules=["query", "value"],
                                                                      design=design, random_seed=3)))
    for t, batches in enumerate(tasks):
        for i, model in enumerate(models):
            torch.manual_seed(1000 * i + t)  # training would consume the global RNG differently
            model.begin_task(batches, progress=False)
        first, second = (inflora_layers(m) for m in models)
        assert all(first[n].inflora_B["default"].shape[0] == 4 for n in first)
        for n in first:
            assert torch.equal(first[n].inflora_B["default"], second[n].inflora_B["default"]), n
        for model in models:
            model.end_task(batches, progress=False)
        for n in first:
            assert torch.equal(first[n].inflora_memory["default"], second[n].inflora_memory["default"]), n
    # and the two tasks did get different designs (the test compares something that moves)
    assert not torch.equal(first[n].inflora_past_B["default"][:4], first[n].inflora_past_B["default"][4:])


def _fail_once(monkeypatch, name: str) -> list:
    """Make ``torch.linalg.<name>`` raise LinAlgError on its first call, then behave; returns the call log."""
    real = getattr(torch.linalg, name)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[0].shape)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError(f"linalg.{name}: The algorithm failed to converge (ill-conditioned)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, name, flaky)
    return calls


def _ill_conditioned_batches(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -6, D_IN)  # covariance condition number ~1e12
    return [{"x": torch.randn(32, D_IN, generator=g) * scales, "labels": torch.randn(32, D_OUT, generator=g)}
            for _ in range(3)]


def test_a_failing_eigh_in_the_memory_update_falls_back_with_a_warning(monkeypatch):
    batches = _ill_conditioned_batches(0)
    reference = mlp_model(energy="linear", energy_threshold=0.99)
    run_task(reference, batches)
    model = mlp_model(energy="linear", energy_threshold=0.99)
    model.begin_task(batches, progress=False)
    sgd_steps(model, batches)
    calls = _fail_once(monkeypatch, "eigh")
    with pytest.warns(RuntimeWarning, match=r"torch\.linalg\.eigh failed .* falling back to eigh in float64"):
        model.end_task(batches, progress=False)
    assert len(calls) >= 2  # failed once, then the fallback ran
    for name, layer in inflora_layers(model).items():
        got = layer.get_memory("default")
        want = inflora_layers(reference)[name].get_memory("default")
        assert got.dimension == want.dimension
        torch.testing.assert_close(got.projector(), want.projector(), atol=1e-5, rtol=0)


def test_a_failing_svd_in_the_design_falls_back_with_a_warning(monkeypatch):
    batches = _ill_conditioned_batches(1)
    reference = mlp_model()
    reference.begin_task(batches, progress=False)
    model = mlp_model()
    calls = _fail_once(monkeypatch, "svd")
    with pytest.warns(RuntimeWarning, match=r"torch\.linalg\.svd failed .* falling back to the eigendecomposition"):
        model.begin_task(batches, progress=False)
    assert len(calls) >= 2
    for name, layer in inflora_layers(model).items():
        B, want = layer.inflora_B["default"], inflora_layers(reference)[name].inflora_B["default"]
        assert B.shape == want.shape and torch.isfinite(B).all()
        torch.testing.assert_close(B, want, atol=1e-4, rtol=0)  # same rows, signs fixed the same way


def test_old_task_logits_move_no_more_than_the_interference_report_predicts():
    """MLP ``logits = lin1(tanh(lin0 x))`` with both layers adapted, 3 tasks in overlapping input subspaces, threshold
    0.8 (old inputs leak into B_t). From the report of each layer (on the old task's inputs, before training) the
    change of the old task's logits is bounded by

        ||logits' - logits||_F <= ||W1'||_2 * bound_lin0(||dA0||_2) + bound_lin1(||dA1||_2)

    (tanh is 1-Lipschitz; W1' is lin1's effective weight after training: base + folded past + A_t B_t)."""
    model = mlp_model(r=3, target_modules=["lin0", "lin1"], energy_threshold=0.8)
    g = torch.Generator().manual_seed(3)
    shared = torch.linalg.qr(torch.randn(D_IN, 4, generator=g))[0]  # a direction set every task uses

    def task(seed: int) -> list[dict]:
        batches = subspace_batches(seed, dim=5)
        return [{"x": b["x"] + 0.7 * torch.randn(b["x"].shape[0], 4, generator=g) @ shared.T, "labels": b["labels"]}
                for b in batches]

    tasks = [task(40 + t) for t in range(3)]

    def logits(batches):
        with torch.no_grad():
            return torch.cat([model(b["x"]) for b in batches]).double()

    model.eval()
    run_task(model, tasks[0])
    checked = 0
    for t in (1, 2):
        model.begin_task(tasks[t], progress=False)
        layers = inflora_layers(model)
        a_before = {n: layers[n].inflora_A["default"].detach().clone() for n in ("lin0", "lin1")}
        reports = {j: {g.layers[0]: g for g in model.interference_report(tasks[j])} for j in range(t)}
        before = {j: logits(tasks[j]) for j in range(t)}
        sgd_steps(model, tasks[t], steps=8, lr=0.5)
        d_a = {n: torch.linalg.matrix_norm((layers[n].inflora_A["default"].detach() - a_before[n]).double(), 2).item()
               for n in a_before}
        with torch.no_grad():  # lin1's effective weight: its output on the identity, minus the bias
            eye = torch.eye(D_HID)
            w1 = (layers["lin1"](eye) - layers["lin1"](torch.zeros(1, D_HID))).T.double()
        for j in range(t):
            r0, r1 = reports[j]["lin0"], reports[j]["lin1"]
            predicted = torch.linalg.matrix_norm(w1, 2).item() * r0.bound(d_a["lin0"]) + r1.bound(d_a["lin1"])
            change = (logits(tasks[j]) - before[j]).norm().item()
            assert change <= predicted * (1 + 1e-6) + 1e-6 * before[j].norm().item(), (t, j, change, predicted)
            assert r0.leakage > 1e-3 and change > 1e-4  # the bound is tested where it has something to bound
            checked += 1
        model.end_task(tasks[t], progress=False)
    assert checked == 3
