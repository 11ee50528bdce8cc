"""InfLoRAModel: the continual lifecycle, interference, save/load, merging and multiple adapters.

Most checks use a two-layer MLP whose inputs we control exactly (so subspaces are known), plus a tiny BERT for the
transformers paths.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import peft_inflora
from peft_inflora import (
    InfLoRAConfig,
    NoTaskInProgressError,
    StatisticsError,
    SubspaceExhaustedError,
    SubspaceWarning,
    TaskLifecycleError,
)


D_IN, D_HID, D_OUT = 16, 12, 4


class MLP(nn.Module):
    """``lin0 -> tanh -> lin1``; forward(x, labels=None) returns a loss when labels are given."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(D_IN, D_HID)
        self.lin1 = nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        out = self.lin1(torch.tanh(self.lin0(x)))
        if labels is None:
            return out
        return nn.functional.mse_loss(out, labels)


def subspace_batches(seed: int, dim: int, n_batches: int = 4, batch: int = 32) -> list[dict]:
    """Inputs confined to a random ``dim``-dimensional subspace of R^D_IN (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D_IN, dim, generator=g))[0]
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, dim, generator=g) @ basis.T
        out.append({"x": x, "labels": torch.randn(batch, D_OUT, generator=g)})
    return out


def make_mlp_model(seed: int = 0, **config_kwargs) -> nn.Module:
    torch.manual_seed(seed)
    # every batch (the paper): these tests check the math against computations over all the batches they pass
    kwargs = {"r": 3, "target_modules": ["lin0", "lin1"], "statistics_max_tokens": None}
    kwargs.update(config_kwargs)
    return get_peft_model(MLP(), InfLoRAConfig(**kwargs))


def train(model: nn.Module, batches: list[dict], steps: int = 20, lr: float = 5e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def layer(model, name: str):
    return model.base_model.inflora_layers()[name]


def outputs(model, batches) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b["x"]) for b in batches])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict, model) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].shape == after[k].shape and torch.equal(before[k], after[k]), k


# ----------------------------------------------------------------------------- begin_task
def test_begin_task_designs_B_from_the_top_eigenvectors_and_creates_zero_A():
    model = make_mlp_model()
    batches = subspace_batches(1, dim=5)
    ranks = model.begin_task(batches, progress=False)
    assert ranks == {"lin0": 3, "lin1": 3}
    lin0 = layer(model, "lin0")
    B = lin0.inflora_B["default"].double().numpy()
    X = torch.cat([b["x"] for b in batches]).double().numpy()
    C = X.T @ X / X.shape[0]
    eigvals, eigvecs = np.linalg.eigh(C)
    top = eigvecs[:, ::-1][:, :3]
    # rows span the top-3 eigenvectors of C and have norm 1/sqrt(3)
    np.testing.assert_allclose(B.T @ B * 3, top @ top.T, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(B, axis=1), 1 / np.sqrt(3), rtol=1e-5)
    assert torch.count_nonzero(lin0.inflora_A["default"]) == 0
    assert lin0.inflora_A["default"].shape == (D_HID, 3)


def test_begin_task_leaves_outputs_unchanged_and_trains_only_A():
    model = make_mlp_model()
    batches = subspace_batches(1, dim=5)
    before = outputs(model, batches)
    model.begin_task(batches, progress=False)
    assert torch.equal(outputs(model, batches), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.lin0.inflora_A.default", "base_model.model.lin1.inflora_A.default"}


def test_training_before_begin_task_raises():
    model = make_mlp_model()
    batches = subspace_batches(1, dim=5)
    model.train()
    with pytest.raises(NoTaskInProgressError, match="begin_task"):
        model(**batches[0])


def test_training_changes_only_A():
    model = make_mlp_model()
    batches = subspace_batches(1, dim=5)
    model.begin_task(batches, progress=False)
    before = snapshot(model)
    train(model, batches)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"base_model.model.lin0.inflora_A.default", "base_model.model.lin1.inflora_A.default"}


# ----------------------------------------------------------------------------- end_task
def test_end_task_folds_the_branch_exactly_and_fills_the_memory():
    model = make_mlp_model(energy_threshold=0.99)
    batches = subspace_batches(1, dim=5)
    model.begin_task(batches, progress=False)
    train(model, batches)
    trained = outputs(model, batches)
    dims = model.end_task(batches, progress=False)
    torch.testing.assert_close(outputs(model, batches), trained, atol=1e-6, rtol=1e-6)
    lin0 = layer(model, "lin0")
    assert lin0.inflora_past_A["default"].shape == (D_HID, 3)
    assert lin0.inflora_past_B["default"].shape == (3, D_IN)
    assert lin0.inflora_task_ranks["default"].tolist() == [3]
    assert not model.task_in_progress() and model.tasks_done() == 1
    # lin0's inputs span 5 roughly equal-energy dimensions: the authors' first-task rule keeps the leading
    # components whose cumulative energy is still below 0.99, i.e. 4 of them, all inside the inputs' span
    assert dims["lin0"] == 4
    memory = lin0.get_memory("default")
    X = torch.cat([b["x"] for b in batches]).double()
    span = torch.linalg.svd(X.T, full_matrices=False)[0][:, :5]
    M = memory.basis
    assert torch.linalg.matrix_norm(M - span @ (span.T @ M)) < 1e-5


def test_old_task_outputs_do_not_move_when_the_memory_keeps_all_energy():
    """Threshold 1.0: the memory holds task 1's whole input span, so task 2 cannot touch task 1's lin0 outputs."""
    model = make_mlp_model(energy_threshold=1.0, target_modules=["lin0"])
    task1, task2 = subspace_batches(1, dim=5), subspace_batches(2, dim=6)
    model.begin_task(task1, progress=False)
    train(model, task1)
    model.end_task(task1, progress=False)
    lin0 = layer(model, "lin0")
    assert lin0.get_memory("default").dimension == 5
    with torch.no_grad():
        before = torch.cat([lin0(b["x"]) for b in task1])
    model.begin_task(task2, progress=False)
    B2 = lin0.inflora_B["default"]
    X1 = torch.cat([b["x"] for b in task1])
    assert (X1 @ B2.T).abs().max() < 1e-5 * X1.abs().max()
    train(model, task2)
    with torch.no_grad():
        after = torch.cat([lin0(b["x"]) for b in task1])
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # ... while task 2's outputs did change
    assert not torch.allclose(outputs(model, task2), outputs(make_mlp_model(target_modules=["lin0"]), task2))


def test_interference_is_bounded_by_the_energy_left_out_of_memory():
    """||B_2 X_1||_F <= ||B_2||_2 ||Q X_1||_F, and ||Q X_1||^2 / ||X_1||^2 is what the threshold left out."""
    model = make_mlp_model(energy_threshold=0.9, energy="linear", target_modules=["lin0"])
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(0, -1.5, D_IN)  # a decaying spectrum, so a 0.9 threshold leaves energy out
    task1 = [{"x": torch.randn(64, D_IN, generator=g) * scales, "labels": torch.randn(64, D_OUT, generator=g)}
             for _ in range(3)]
    task2 = subspace_batches(5, dim=8)
    model.begin_task(task1, progress=False)
    train(model, task1)
    model.end_task(task1, progress=False)
    lin0 = layer(model, "lin0")
    memory = lin0.get_memory("default")
    X1 = torch.cat([b["x"] for b in task1]).double()
    left_out = (memory.project(X1.T).norm() ** 2 / X1.norm() ** 2).item()
    assert 0 < left_out < 0.3  # about 1 - 0.9: the first-task rule stops just below the threshold
    model.begin_task(task2, progress=False)
    train(model, task2)
    A2, B2 = lin0.inflora_A["default"].detach().double(), lin0.inflora_B["default"].double()
    change = (X1 @ B2.T @ A2.T).norm()
    bound = torch.linalg.matrix_norm(A2, 2) * torch.linalg.matrix_norm(B2, 2) * np.sqrt(left_out) * X1.norm()
    assert change <= bound * (1 + 1e-6)
    assert change > 0


def test_gpm_and_dualgpm_models_keep_the_same_projection_across_the_switch():
    models = {kind: make_mlp_model(seed=0, memory=kind, energy_threshold=0.999, target_modules=["lin0"])
              for kind in ("gpm", "dualgpm")}
    forms = []
    for task, dim in enumerate([4, 3, 4]):
        batches = subspace_batches(10 + task, dim=dim)
        for model in models.values():
            model.begin_task(batches, progress=False)
            model.end_task(batches, progress=False)
        gpm = layer(models["gpm"], "lin0").get_memory("default")
        dual = layer(models["dualgpm"], "lin0").get_memory("default")
        forms.append(dual.form)
        torch.testing.assert_close(gpm.projector(), dual.projector(), atol=1e-5, rtol=0)
    assert forms[0] == "basis" and forms[-1] == "complement"  # crossed d_in / 2 = 8


def test_energy_threshold_schedule_with_total_tasks():
    model = make_mlp_model(energy_threshold=0.5, total_tasks=2, energy="linear", target_modules=["lin0"])
    for task in range(2):
        batches = subspace_batches(20 + task, dim=D_IN)
        model.begin_task(batches, progress=False)
        model.end_task(batches, progress=False)
    # task index 1 of 2 uses eps = 0.5 + 0.5 * 1/2 = 0.75 on the second task's energy
    X = torch.cat([b["x"] for b in subspace_batches(21, dim=D_IN)]).double()
    memory = layer(model, "lin0").get_memory("default")
    captured = 1 - (memory.project(X.T).norm() ** 2 / X.norm() ** 2).item()
    assert captured >= 0.75 - 1e-6
    with pytest.raises(TaskLifecycleError, match="total_tasks"):
        model.begin_task(subspace_batches(30, dim=3), progress=False)


# ----------------------------------------------------------------------------- errors leave state unchanged
@pytest.mark.parametrize(
    "action, error, match",
    [
        ("end_before_begin", TaskLifecycleError, "begin_task"),
        ("begin_twice", TaskLifecycleError, "already in progress"),
        ("empty_batches", StatisticsError, "empty"),
        ("single_dict", StatisticsError, "iterable of batches"),
        ("wrong_inputs", StatisticsError, "inputs the model's forward needs"),
        ("abort_without_task", TaskLifecycleError, "nothing to abort"),
    ],
)
def test_lifecycle_errors_say_what_to_do_and_change_nothing(action, error, match):
    model = make_mlp_model()
    batches = subspace_batches(1, dim=5)
    if action == "begin_twice":
        model.begin_task(batches, progress=False)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        if action == "end_before_begin":
            model.end_task(batches, progress=False)
        elif action == "begin_twice":
            model.begin_task(batches, progress=False)
        elif action == "empty_batches":
            model.begin_task([], progress=False)
        elif action == "single_dict":
            model.begin_task(batches[0], progress=False)
        elif action == "wrong_inputs":
            model.begin_task([{"pixels": torch.zeros(2, D_IN)}], progress=False)
        elif action == "abort_without_task":
            model.abort_task()
    assert_same_state(before, model)


def test_abort_task_discards_the_branch_only():
    model = make_mlp_model()
    task1, task2 = subspace_batches(1, dim=5), subspace_batches(2, dim=4)
    model.begin_task(task1, progress=False)
    train(model, task1)
    model.end_task(task1, progress=False)
    before = snapshot(model)
    out = outputs(model, task2)
    model.begin_task(task2, progress=False)
    train(model, task2)
    model.abort_task()
    assert not model.task_in_progress()
    assert_same_state(before, model)
    assert torch.equal(outputs(model, task2), out)


def test_exhausted_subspace_raises_and_short_subspace_warns():
    model = make_mlp_model(r=3, energy_threshold=1.0, energy="linear", target_modules=["lin0"])
    full = subspace_batches(1, dim=D_IN - 2)
    model.begin_task(full, progress=False)
    model.end_task(full, progress=False)
    assert layer(model, "lin0").get_memory("default").free_dimension == 2
    with pytest.warns(SubspaceWarning, match="Only 2 of r=3"):
        ranks = model.begin_task(subspace_batches(2, dim=D_IN), progress=False)
    assert ranks["lin0"] == 2
    model.end_task(subspace_batches(2, dim=D_IN), progress=False)
    before = snapshot(model)
    with pytest.raises(SubspaceExhaustedError, match="energy_threshold"):
        model.begin_task(subspace_batches(3, dim=D_IN), progress=False)
    assert_same_state(before, model)


def test_non_finite_statistics_raise_before_anything_changes():
    model = make_mlp_model()
    bad = subspace_batches(1, dim=5)
    bad[1]["x"][0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(StatisticsError, match="NaN or inf"):
        model.begin_task(bad, progress=False)
    assert_same_state(before, model)


def test_unsupported_target_module_type_is_named():
    class WithNorm(MLP):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(D_IN)

    with pytest.raises(TypeError, match="'norm' of type LayerNorm"):
        get_peft_model(WithNorm(), InfLoRAConfig(r=2, target_modules=["norm"]))


# ----------------------------------------------------------------------------- save / load
def run_tasks(model, tasks, steps=10):
    for batches in tasks:
        model.begin_task(batches, progress=False)
        train(model, batches, steps=steps)
        model.end_task(batches, progress=False)


@pytest.mark.parametrize("fold", ["adapter", "base"])
def test_save_load_gives_identical_outputs_and_identical_next_design(tmp_path, fold):
    model = make_mlp_model(fold=fold, energy_threshold=0.9)
    base_state = {k: v.clone() for k, v in MLP().state_dict().items()}
    torch.manual_seed(0)
    pristine = MLP()  # same seed as make_mlp_model: identical base weights
    pristine_state = copy.deepcopy(pristine.state_dict())
    tasks = [subspace_batches(1, dim=5), subspace_batches(2, dim=4)]
    run_tasks(model, tasks)
    model.save_pretrained(tmp_path)
    pristine.load_state_dict(pristine_state)
    loaded = PeftModel.from_pretrained(pristine, tmp_path)
    probe = subspace_batches(7, dim=D_IN)
    assert torch.equal(outputs(loaded, probe), outputs(model, probe))
    assert loaded.tasks_done() == 2
    nxt = subspace_batches(3, dim=6)
    model.begin_task(nxt, progress=False)
    loaded.begin_task(nxt, progress=False)
    for name in ("lin0", "lin1"):
        assert torch.equal(layer(loaded, name).inflora_B["default"], layer(model, name).inflora_B["default"])
    assert base_state  # (independent MLP draw: not used further)


def test_a_task_in_progress_is_saved_and_can_be_finished_after_loading(tmp_path):
    model = make_mlp_model()
    batches = subspace_batches(1, dim=5)
    model.begin_task(batches, progress=False)
    train(model, batches)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=True)
    assert loaded.task_in_progress()
    assert torch.equal(outputs(loaded, batches), outputs(model, batches))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        "base_model.model.lin0.inflora_A.default", "base_model.model.lin1.inflora_A.default"}
    loaded.end_task(batches, progress=False)
    model.end_task(batches, progress=False)
    assert torch.equal(outputs(loaded, batches), outputs(model, batches))


def test_loaded_adapter_without_is_trainable_becomes_trainable_at_begin_task(tmp_path):
    model = make_mlp_model()
    run_tasks(model, [subspace_batches(1, dim=5)])
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.begin_task(subspace_batches(2, dim=4), progress=False)
    assert all(p.requires_grad for n, p in loaded.named_parameters() if "inflora_A" in n)


def test_loading_onto_a_base_model_with_other_shapes_fails_clearly(tmp_path):
    model = make_mlp_model()
    run_tasks(model, [subspace_batches(1, dim=5)])
    model.save_pretrained(tmp_path)

    class Wider(MLP):
        def __init__(self):
            super().__init__()
            self.lin0 = nn.Linear(D_IN + 2, D_HID)

    with pytest.raises((ValueError, RuntimeError), match="other shapes|size mismatch"):
        PeftModel.from_pretrained(Wider(), tmp_path)


# ----------------------------------------------------------------------------- merging, disabling, unloading
@pytest.mark.parametrize("fold", ["adapter", "base"])
def test_merge_unmerge_disable_unload(fold):
    model = make_mlp_model(fold=fold)
    torch.manual_seed(0)
    pristine = copy.deepcopy(MLP().state_dict())
    task1, task2 = subspace_batches(1, dim=5), subspace_batches(2, dim=4)
    run_tasks(model, [task1])
    model.begin_task(task2, progress=False)
    train(model, task2)
    probe = subspace_batches(9, dim=D_IN)
    adapted = outputs(model, probe)
    base_model = MLP()
    base_model.load_state_dict(pristine)
    base_out = torch.cat([base_model(b["x"]) for b in probe]).detach()

    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, probe), base_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs(model, probe), adapted, atol=0, rtol=0)

    model.merge_adapter()
    torch.testing.assert_close(outputs(model, probe), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(TaskLifecycleError, match="unmerge_adapter"):
        model.end_task(task2, progress=False)
    model.unmerge_adapter()
    torch.testing.assert_close(outputs(model, probe), adapted, atol=1e-5, rtol=1e-5)

    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("inflora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(torch.cat([merged(b["x"]) for b in probe]).detach(), adapted, atol=1e-5, rtol=1e-5)

    unloaded = copy.deepcopy(model).unload()
    torch.testing.assert_close(torch.cat([unloaded(b["x"]) for b in probe]).detach(), base_out, atol=1e-5,
                               rtol=1e-5)


def test_fold_base_and_fold_adapter_give_the_same_model():
    a, b = make_mlp_model(fold="adapter"), make_mlp_model(fold="base")
    tasks = [subspace_batches(1, dim=5), subspace_batches(2, dim=4)]
    run_tasks(a, tasks)
    run_tasks(b, tasks)
    probe = subspace_batches(9, dim=D_IN)
    torch.testing.assert_close(outputs(a, probe), outputs(b, probe), atol=1e-5, rtol=1e-5)
    w_a = a.base_model.model.lin0.base_layer.weight
    w_b = b.base_model.model.lin0.base_layer.weight
    assert not torch.equal(w_a, w_b)  # fold="base" moved the finished tasks into W


# ----------------------------------------------------------------------------- multiple adapters
def test_each_named_adapter_keeps_its_own_continual_state():
    model = make_mlp_model()
    model.add_adapter("other", InfLoRAConfig(r=2, target_modules=["lin0", "lin1"]))
    task1 = subspace_batches(1, dim=5)
    run_tasks(model, [task1])
    assert model.tasks_done("default") == 1 and model.tasks_done("other") == 0
    model.set_adapter("other")
    model.begin_task(task1, progress=False)
    assert model.task_in_progress("other") and not model.task_in_progress("default")
    assert layer(model, "lin0").inflora_B["other"].shape == (2, D_IN)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.model.lin0.inflora_A.other", "base_model.model.lin1.inflora_A.other"}
    model.end_task(task1, progress=False)
    assert model.tasks_done("other") == 1
    model.delete_adapter("other")
    assert model.tasks_done("default") == 1


# ----------------------------------------------------------------------------- transformers model
def test_bert_query_and_value_share_one_design_per_block():
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = get_peft_model(BertForSequenceClassification(cfg),
                           InfLoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (4, 9), generator=g), "attention_mask": torch.ones(4, 9,
                dtype=torch.long), "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(2)]
    model.begin_task(batches, progress=False)
    layers = model.base_model.inflora_layers()
    for block in range(2):
        prefix = f"bert.encoder.layer.{block}.attention.self."
        query, value = layers[prefix + "query"], layers[prefix + "value"]
        assert torch.equal(query.inflora_B["default"], value.inflora_B["default"])
    assert not torch.equal(layers["bert.encoder.layer.0.attention.self.query"].inflora_B["default"],
                           layers["bert.encoder.layer.1.attention.self.query"].inflora_B["default"])
    assert peft_inflora.InfLoRAConfig is InfLoRAConfig


def test_statistics_pass_restores_train_mode_and_runs_in_eval_mode():
    model = make_mlp_model()
    seen = []
    model.base_model.model.lin0.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    model.train()
    model.begin_task(subspace_batches(1, dim=5, n_batches=2), progress=False)
    assert seen == [False, False] and model.training
    model.eval()
    model.end_task(subspace_batches(1, dim=5, n_batches=2), progress=False)
    assert not model.training


def test_auto_peft_model_and_peft_config_load_the_method(tmp_path):
    from peft import AutoPeftModelForSequenceClassification, PeftConfig

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, InfLoRAConfig(r=2, modules_to_save=["classifier"]))
    batch = {"input_ids": torch.randint(0, 64, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    model.begin_task([batch], progress=False)
    model.end_task([batch], progress=False)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, InfLoRAConfig) and config.peft_type == "INFLORA"
    assert config.target_modules == {"query", "value"}  # the BERT default
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert loaded.tasks_done() == 1
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
