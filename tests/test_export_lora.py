"""Export to plain LoRA (issue 8, part 2): ``model.to_lora()``, and PEFT's ``save_as_lora`` (issue 15, part 3).

Specification checked here:

1. The exact export of an adapter's finished tasks, loaded with plain ``peft`` (``PeftModel.from_pretrained``) onto the
   pristine base model in a process that cannot import ``peft_inflora``, gives the InfLoRA model's logits: for
   ``fold="adapter"``, for ``fold="base"`` (whose finished tasks sit inside ``W``) with layers of different total ranks
   (``rank_pattern``), and for GPT-2's ``Conv1D`` (``fan_in_fan_out``). The trained classifier head
   (``modules_to_save``), the task type and the base model's path go along.
2. Truncation to rank ``k`` is the best rank-``k`` approximation of ``dW = past_A past_B``: the reported relative error
   ``||dW - dW_k||_F / ||dW||_F`` equals ``sqrt(sum of the discarded s_i^2) / ||s||`` of an independent float64 numpy
   SVD of the dense ``dW``, ``rank`` = full gives ~0, and the loaded LoRA layers add exactly the reported factors
   (scaling 1, also with per-layer ranks).
3. Bad input is refused with an error that says what to change, before anything is written or changed.
4. PEFT's own conversion (issue 15, part 3): ``peft.save_as_lora`` / ``peft.convert_to_lora`` write the tensors of
   ``to_lora`` (exact and truncated), with a config that adapts the same modules with the same ranks, scaling and
   ``modules_to_save`` (PEFT does not carry ``task_type``, ``revision``, ``fan_in_fan_out``), loading to the InfLoRA
   model's logits in the process without ``peft_inflora`` (both ``fold`` modes, ``Conv1D``); a task in progress, no
   finished task, NaN and a rank ``to_lora`` does not take are refused with ``to_lora``'s errors, no file written.

Tolerance of the end-to-end comparison: the exported LoRA adds ``lora_B (lora_A x)`` with the float32 factors InfLoRA
holds; InfLoRA adds the same product, or runs ``W + past_A past_B`` rounded once in float32 (``fold="base"``, and
``fold="adapter"`` with its cached past weight). The outputs differ by float32 reassociation only (measured: at most
1.2e-7 on these models); ``atol = 1e-5`` on logits of magnitude ~1 leaves room for other BLAS kernels, and is far
below what the tasks' low-rank update moves the logits by (> 1e-2, asserted), so a 0.1 % error in any ``dW`` fails
the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from peft import PeftModel, convert_to_lora, get_peft_model, save_as_lora
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tiny_models import causal_lm_batches, text_classification_batches, tiny_bert, tiny_gpt2, train_steps
from torch import nn

from peft_inflora import InfLoRAConfig, LoraExport, TaskLifecycleError


ATOL = 1e-5


# ============================================================================================ helpers
def learn_tasks(model: nn.Module, make_batches: Callable[[int], list[dict]], n_tasks: int, steps: int = 6,
                lr: float = 0.1) -> None:
    """``n_tasks`` tasks: begin_task, a few Adam steps (A_t starts random: ``init_weights=False``), end_task. The large
    learning rate makes the tasks' update move the tiny models' logits by > 1e-2."""
    for task in range(n_tasks):
        batches = make_batches(task)
        model.begin_task(batches, progress=False)
        train_steps(model, batches, steps=steps, lr=lr)
        model.end_task(batches, progress=False)


def logits(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.reshape(-1)
                          for b in batches])


def past_factors(model: PeftModel, name: str = "default") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per adapted layer, ``(past_A, past_B)`` as float64 numpy arrays."""
    return {n: (layer.inflora_past_A[name].double().numpy(), layer.inflora_past_B[name].double().numpy())
            for n, layer in model.base_model.inflora_layers(name).items()}


def folder_contents(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.exists() else {}


class MLP(nn.Module):
    """``lin0 (16 -> 12) -> tanh -> lin1 (12 -> 4)``; returns the MSE loss when ``labels`` are given."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.lin1 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None):
        out = self.lin1(torch.tanh(self.lin0(x)))
        return out if labels is None else nn.functional.mse_loss(out, labels)


def mlp_batches(seed: int, n_batches: int = 2, batch: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, 16, generator=g), "labels": torch.randn(batch, 4, generator=g)}
            for _ in range(n_batches)]


def mlp_model(tasks: int = 0, **config) -> PeftModel:
    """An InfLoRA MLP (r=3, random A_t) that has finished ``tasks`` tasks (random inputs, no training)."""
    torch.manual_seed(0)
    kwargs = dict(r=3, target_modules=["lin0", "lin1"], init_weights=False, energy_threshold=0.5)
    kwargs.update(config)
    model = get_peft_model(MLP(), InfLoRAConfig(**kwargs))
    for task in range(tasks):
        model.begin_task(mlp_batches(10 + task), progress=False)
        model.end_task(mlp_batches(10 + task), progress=False)
    return model


# ============================================================================================ 1. exact, plain peft
# Runs in a fresh interpreter (-I: no PYTHONPATH / user site) where importing peft_inflora raises: the editable install
# of this package would otherwise be importable from site-packages. It loads each base model from the path the exported
# adapter_config.json names and the LoRA with PeftModel.from_pretrained, and writes the logits.
PLAIN_PEFT_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class BlockPeftInflora(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "peft_inflora" or name.startswith("peft_inflora."):
                raise ImportError(f"{name} is blocked in this process")
            return None


    sys.meta_path.insert(0, BlockPeftInflora())

    import json

    import torch
    import transformers
    from peft import LoraConfig, PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    for case in json.load(open(sys.argv[1])):
        config = PeftConfig.from_pretrained(case["adapter"])
        assert type(config) is LoraConfig, type(config)
        base = getattr(transformers, case["auto_class"]).from_pretrained(config.base_model_name_or_path)
        model = PeftModel.from_pretrained(base, case["adapter"]).eval()
        tensors = load_file(case["batches"])

        def logits():
            with torch.no_grad():
                return torch.cat([model(input_ids=tensors[f"{i}.input_ids"],
                                        attention_mask=tensors[f"{i}.attention_mask"]).logits.reshape(-1)
                                  for i in range(case["n_batches"])])

        exported = logits()
        lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        for layer in lora_layers:  # the same model without the tasks' low-rank update (head kept)
            layer.lora_B["default"].weight.data.zero_()
        save_file({"logits": exported, "without_update": logits()}, case["output"])
        print(case["name"], type(model).__name__, "lora layers:", len(lora_layers))

    try:
        import peft_inflora  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("peft_inflora could be imported")
    loaded = sorted(m for m in sys.modules if m.startswith("peft_inflora"))
    assert not loaded, loaded
    print("peft_inflora never imported")
    """
)


@dataclass
class Case:
    name: str
    auto_class: str
    reference: torch.Tensor  # InfLoRA model's logits
    base_logits: torch.Tensor  # pristine base model's logits
    exported: Optional[torch.Tensor] = None  # the plain-peft process's logits
    without_update: Optional[torch.Tensor] = None  # same, all lora_B zeroed: head only
    export: Optional[LoraExport] = None
    folder: Optional[str] = None
    peft_folder: Optional[str] = None  # written by peft.save_as_lora(folder, model, rank=None)
    peft_exported: Optional[torch.Tensor] = None  # the plain-peft process's logits of that adapter
    peft_without_update: Optional[torch.Tensor] = None


def _build_case(root, name: str, auto_class: str, make_base: Callable[[], nn.Module],
                make_batches: Callable[[int], list[dict]], n_tasks: int, **config) -> tuple[Case, list[dict]]:
    import transformers

    base_dir, adapter_dir = root / name / "base", root / name / "lora"
    make_base().save_pretrained(base_dir)  # the pristine base, also what the exported config points to
    base = getattr(transformers, auto_class).from_pretrained(base_dir)
    model = get_peft_model(base, InfLoRAConfig(init_weights=False, **config))
    learn_tasks(model, make_batches, n_tasks)
    probe = make_batches(99)
    export = model.to_lora(adapter_dir)  # through PeftModel's attribute forwarding to InfLoRAModel
    peft_dir = root / name / "peft-lora"
    save_as_lora(peft_dir, model, rank=None)  # PEFT's own conversion: exact
    case = Case(name, auto_class, logits(model, probe), logits(make_base(), probe), export=export,
                folder=str(adapter_dir), peft_folder=str(peft_dir))
    tensors = {f"{i}.{k}": b[k] for i, b in enumerate(probe) for k in ("input_ids", "attention_mask")}
    save_file(tensors, root / name / "batches.safetensors")
    entry = dict(name=name, auto_class=auto_class, adapter=str(adapter_dir), n_batches=len(probe),
                 batches=str(root / name / "batches.safetensors"), output=str(root / name / "logits.safetensors"))
    peft_entry = dict(entry, name=f"{name}@peft", adapter=str(peft_dir), output=str(root / name / "peft.safetensors"))
    return case, [entry, peft_entry]


@dataclass
class PlainPeftRun:
    cases: dict[str, Case]
    stdout: str


@pytest.fixture(scope="module")
def plain_peft_cases(tmp_path_factory) -> PlainPeftRun:
    """Three InfLoRA models after 2-3 tasks, exported by ``to_lora`` and by ``peft.save_as_lora``, and both exports
    evaluated in one plain-peft process."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    bert_batches = lambda task: text_classification_batches(seed=100 + task, low=3 + 30 * (task % 3),  # noqa: E731
                                                            high=40 + 30 * (task % 3))
    gpt2_batches = lambda task: causal_lm_batches(seed=300 + task, low=3 + 30 * (task % 3),  # noqa: E731
                                                  high=40 + 30 * (task % 3))
    built = [
        _build_case(root, "bert_fold_adapter", "AutoModelForSequenceClassification", tiny_bert, bert_batches, 3,
                    r=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
        _build_case(root, "bert_fold_base", "AutoModelForSequenceClassification", tiny_bert, bert_batches, 2,
                    r=4, rank_pattern={"value": 2}, target_modules=["query", "value"],
                    modules_to_save=["classifier"], task_type="SEQ_CLS", fold="base"),
        _build_case(root, "gpt2_conv1d", "AutoModelForCausalLM", tiny_gpt2, gpt2_batches, 2,
                    r=3, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    ]
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps([entry for _, entries in built for entry in entries]))
    script = root / "plain_peft.py"
    script.write_text(PLAIN_PEFT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(script), str(manifest)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "peft_inflora never imported" in proc.stdout
    for case, (entry, peft_entry) in built:
        outputs = load_file(entry["output"])
        case.exported, case.without_update = outputs["logits"], outputs["without_update"]
        outputs = load_file(peft_entry["output"])
        case.peft_exported, case.peft_without_update = outputs["logits"], outputs["without_update"]
    return PlainPeftRun({case.name: case for case, _ in built}, proc.stdout)


@pytest.mark.parametrize("name", ["bert_fold_adapter", "bert_fold_base", "gpt2_conv1d"])
def test_exported_lora_gives_the_inflora_models_logits_in_a_process_without_peft_inflora(plain_peft_cases, name):
    case = plain_peft_cases.cases[name]
    assert case.export.exact and case.export.max_relative_error == 0.0
    # the comparison can fail: the finished tasks' low-rank update alone moves the logits by far more than ATOL
    # (a 0.1 % error in dW would show), and so does the whole adapter
    assert (case.reference - case.without_update).abs().max() > 1e-2
    assert (case.reference - case.base_logits).abs().max() > 1e-2
    torch.testing.assert_close(case.exported, case.reference, atol=ATOL, rtol=0)
    # loaded as the task type's PeftModel class, with every adapted layer a LoRA layer
    line = next(line for line in plain_peft_cases.stdout.splitlines() if line.startswith(f"{name} "))
    assert line.split()[1].startswith("PeftModelFor") and line.endswith(f"lora layers: {len(case.export.layers)}")


def test_exact_export_has_rank_sum_of_task_ranks_and_scaling_one(plain_peft_cases):
    case = plain_peft_cases.cases["bert_fold_base"]
    with open(os.path.join(case.folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    # 2 tasks: query r=4 -> R=8 (the common rank), value r=2 -> R=4 (rank_pattern); alpha = rank everywhere
    assert config["r"] == config["lora_alpha"] == 8
    values = {f"bert.encoder.layer.{i}.attention.self.value": 4 for i in range(2)}
    assert config["rank_pattern"] == values and config["alpha_pattern"] == values
    assert sorted(config["target_modules"]) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value"))
    assert config["modules_to_save"][0] == "classifier"  # (PEFT's sequence-classification model also lists "score")
    assert config["base_model_name_or_path"].endswith(os.path.join("bert_fold_base", "base"))
    assert config["fan_in_fan_out"] is False and config["use_dora"] is False and config["use_rslora"] is False


def test_exported_tensors_are_the_float32_past_factors_and_the_trained_head(plain_peft_cases):
    case = plain_peft_cases.cases["bert_fold_base"]
    saved = load_file(os.path.join(case.folder, "adapter_model.safetensors"))
    assert saved.keys() == case.export.state_dict.keys()
    for key, tensor in saved.items():
        assert torch.equal(tensor, case.export.state_dict[key])
        if ".lora_" in key:
            assert tensor.dtype == torch.float32
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.value"
    assert saved[f"{prefix}.lora_A.weight"].shape == (4, 32) and saved[f"{prefix}.lora_B.weight"].shape == (32, 4)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= saved.keys()
    layer = case.export.layers["bert.encoder.layer.0.attention.self.value"]
    assert (layer.source_rank, layer.rank, layer.relative_error) == (4, 4, 0.0)


def test_conv1d_export_keeps_fan_in_fan_out(plain_peft_cases):
    case = plain_peft_cases.cases["gpt2_conv1d"]
    assert case.export.config.fan_in_fan_out is True
    assert all(layer.fan_in_fan_out and layer.rank == 6 for layer in case.export.layers.values())  # 2 tasks x r=3
    saved = load_file(os.path.join(case.folder, "adapter_model.safetensors"))
    # PEFT's LoRA layout on Conv1D too: lora_A (r, in_features), lora_B (out_features, r); c_attn is 32 -> 96
    assert saved["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (6, 32)
    assert saved["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 6)


def test_peft_model_to_lora_is_the_tuner_method():
    model = mlp_model(tasks=2)
    via_peft, via_tuner = model.to_lora(), model.base_model.to_lora()
    assert via_peft.state_dict.keys() == via_tuner.state_dict.keys()
    assert all(torch.equal(via_peft.state_dict[k], via_tuner.state_dict[k]) for k in via_peft.state_dict)
    assert via_peft.tasks == 2 and via_peft.adapter_name == "default"


# ============================================================================================ 2. truncation
def test_truncation_error_is_the_discarded_share_of_an_independent_float64_svd():
    model = mlp_model(tasks=3)  # lin0: R = 9 (d_in 16, d_out 12); lin1: R = 9 (d_in 12, d_out 4: rank(dW) <= 4)
    factors = past_factors(model)
    for k in (1, 2, 5):
        export = model.to_lora(rank=k)
        assert not export.exact
        for name, (past_A, past_B) in factors.items():
            dW = past_A @ past_B
            s = np.linalg.svd(dW, compute_uv=False)
            kept = min(k, min(dW.shape))
            expected = np.sqrt(np.sum(s[kept:] ** 2)) / np.linalg.norm(s)
            layer = export.layers[name]
            assert layer.source_rank == 9 and layer.rank == kept
            assert layer.relative_error == pytest.approx(expected, rel=1e-9, abs=1e-12)
            np.testing.assert_allclose(layer.singular_values.numpy(), s[: layer.singular_values.numel()],
                                       rtol=1e-9, atol=1e-12)
            # the written float32 factors realise that error (Eckart-Young: no rank-k matrix does better)
            lora_A = export.state_dict[f"base_model.model.{name}.lora_A.weight"].double().numpy()
            lora_B = export.state_dict[f"base_model.model.{name}.lora_B.weight"].double().numpy()
            assert lora_A.shape == (kept, dW.shape[1]) and lora_B.shape == (dW.shape[0], kept)
            actual = np.linalg.norm(dW - lora_B @ lora_A) / np.linalg.norm(dW)
            assert actual == pytest.approx(expected, abs=1e-6)
    # lin1 (4 outputs) has rank(dW) <= 4: truncating to 5 loses nothing there, but lin0 does lose something
    errors = model.to_lora(rank=5).relative_errors
    assert errors["lin1"] < 1e-12 < errors["lin0"]


def test_truncating_to_the_full_rank_reproduces_dW():
    model = mlp_model(tasks=3)
    export = model.to_lora(rank=9)
    for name, (past_A, past_B) in past_factors(model).items():
        dW = past_A @ past_B
        assert export.layers[name].relative_error < 1e-12
        lora_A = export.state_dict[f"base_model.model.{name}.lora_A.weight"].double().numpy()
        lora_B = export.state_dict[f"base_model.model.{name}.lora_B.weight"].double().numpy()
        assert np.linalg.norm(dW - lora_B @ lora_A) / np.linalg.norm(dW) < 1e-6


def test_a_truncated_export_loads_in_peft_and_adds_exactly_its_factors(tmp_path):
    # query and value: 3 tasks of r=4 -> R=12; value rank_pattern 2 -> R=6; rank=8 -> query 8, value 6 (rank_pattern)
    torch.manual_seed(0)
    config = InfLoRAConfig(r=4, rank_pattern={"value": 2}, target_modules=["query", "value"],
                           modules_to_save=["classifier"], init_weights=False)
    model = get_peft_model(tiny_bert(), config)
    learn_tasks(model, lambda t: text_classification_batches(seed=100 + t), 3, steps=0)
    factors = past_factors(model)
    export = model.to_lora(tmp_path / "k8", rank=8)
    assert {n: layer.rank for n, layer in export.layers.items()} == {
        n: 8 if n.endswith("query") else 6 for n in factors}
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "k8")
    lora_layers = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()
                   if isinstance(m, LoraLayer)}
    assert lora_layers.keys() == factors.keys()
    for name, (past_A, past_B) in factors.items():
        u, s, vt = np.linalg.svd(past_A @ past_B)
        k = export.layers[name].rank
        best = (u[:, :k] * s[:k]) @ vt[:k]  # independent best rank-k approximation
        assert lora_layers[name].scaling["default"] == 1.0
        delta = lora_layers[name].get_delta_weight("default").double().numpy()
        np.testing.assert_allclose(delta, best, atol=1e-6)
        err = np.linalg.norm(past_A @ past_B - delta) / np.linalg.norm(past_A @ past_B)
        assert err == pytest.approx(export.layers[name].relative_error, abs=1e-6)


@pytest.mark.parametrize("share", [0.5, 0.9, 0.999, 1.0])
def test_an_energy_share_keeps_the_fewest_directions_that_hold_it_as_peft_counts_them(share):
    from peft.tuners.lora.conversion import _find_cutoff_index

    model = mlp_model(tasks=3)
    export = model.to_lora(rank=share)
    config, state = convert_to_lora(model, rank=share)  # PEFT's threshold: the same factors
    assert state.keys() == export.state_dict.keys()
    assert all(torch.equal(state[key], export.state_dict[key]) for key in state)
    for name, (past_A, past_B) in past_factors(model).items():
        dW = past_A @ past_B
        s = np.linalg.svd(dW, compute_uv=False)[: min(dW.shape + (9,))]
        energy = np.cumsum(s ** 2) / np.sum(s ** 2)
        k = int(np.argmax(energy >= share - 1e-12)) + 1  # fewest leading directions holding the share
        layer = export.layers[name]
        assert layer.rank == k == config.rank_pattern[name] == config.alpha_pattern[name]
        # PEFT's own cutoff on the same spectrum picks the same rank
        assert _find_cutoff_index(torch.from_numpy(s), share) == k
        expected = np.sqrt(max(0.0, 1.0 - energy[k - 1]))
        assert layer.relative_error == pytest.approx(expected, abs=1e-7)
        assert layer.relative_error <= np.sqrt(1 - share) + 1e-7


# ============================================================================================ targeting
def test_layers_without_a_finished_task_are_left_out(tmp_path):
    model = mlp_model(tasks=2)
    lin1 = model.base_model.model.lin1
    lin1.inflora_past_A["default"] = torch.zeros(4, 0)  # as if lin1 had learned nothing (R = 0)
    lin1.inflora_past_B["default"] = torch.zeros(0, 12)
    export = model.to_lora(tmp_path / "lora")
    assert list(export.layers) == ["lin0"] and set(export.config.target_modules) == {"lin0"}
    assert not any("lin1" in key for key in export.state_dict)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path / "lora")
    assert isinstance(loaded.base_model.model.lin0, LoraLayer)
    assert type(loaded.base_model.model.lin1) is nn.Linear


class Nested(nn.Module):
    """``lin0 (16 -> 12) -> tanh -> block.lin0 (12 -> 4)``: one module name is the suffix of another."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.block = nn.Module()
        self.block.lin0 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None):
        out = self.block.lin0(torch.tanh(self.lin0(x)))
        return out if labels is None else nn.functional.mse_loss(out, labels)


def test_a_name_that_would_also_match_another_module_is_targeted_with_an_anchored_regex(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Nested(), InfLoRAConfig(r=2, target_modules="lin0", init_weights=False))  # top-level only
    model.begin_task(mlp_batches(1), progress=False)
    model.end_task(mlp_batches(1), progress=False)
    export = model.to_lora(tmp_path / "lora")
    # the list ["lin0"] would also adapt block.lin0 (PEFT matches list entries as suffixes)
    assert isinstance(export.config.target_modules, str)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Nested(), tmp_path / "lora")
    assert isinstance(loaded.base_model.model.lin0, LoraLayer)
    assert type(loaded.base_model.model.block.lin0) is nn.Linear
    x = mlp_batches(5)[0]["x"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=0)


# ============================================================================================ 3. bad input
def assert_refused(model: PeftModel, out, error: type, match: str, **kwargs) -> None:
    """``to_lora(out, **kwargs)`` raises ``error`` matching ``match``; the folder and the model are unchanged."""
    files_before = folder_contents(out)
    existed = out.exists()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        model.to_lora(out, **kwargs)
    assert out.exists() == existed and folder_contents(out) == files_before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".lora-export-")]  # no staging folder left
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    for key, tensor in state_before.items():
        torch.testing.assert_close(state_after[key], tensor, rtol=0, atol=0, equal_nan=True)


def test_a_task_in_progress_is_refused_until_end_task_or_abort_task(tmp_path):
    model = mlp_model(tasks=1)
    model.begin_task(mlp_batches(20), progress=False)
    assert_refused(model, tmp_path / "out", TaskLifecycleError,
                   r"in progress.*`end_task\(batches\)`.*`abort_task\(\)`")
    model.abort_task()
    assert model.to_lora(tmp_path / "out").tasks == 1


def test_an_adapter_with_no_finished_task_is_refused(tmp_path):
    assert_refused(mlp_model(tasks=0), tmp_path / "out", TaskLifecycleError, r"no finished task.*begin_task")


@pytest.mark.parametrize("rank", [0, -3, 2.5, 0.0, True, "4"])
def test_a_rank_that_is_not_an_int_of_at_least_one_is_refused(tmp_path, rank):
    assert_refused(mlp_model(tasks=1), tmp_path / "out", ValueError, r"rank must be an int >= 1", rank=rank)


def test_several_active_adapters_need_adapter_name(tmp_path):
    model = mlp_model(tasks=1)
    model.add_adapter("other", InfLoRAConfig(r=2, target_modules=["lin0", "lin1"]))
    model.base_model.set_adapter(["default", "other"])
    assert_refused(model, tmp_path / "out", ValueError, r"2 adapters are active.*adapter_name=")
    assert_refused(model, tmp_path / "out", ValueError, r"Unknown adapter 'typo'", adapter_name="typo")
    assert_refused(model, tmp_path / "out", TaskLifecycleError, r"'other' has no finished task", adapter_name="other")
    assert model.to_lora(tmp_path / "out", adapter_name="default").adapter_name == "default"


def test_a_folder_that_already_holds_an_adapter_is_kept_unless_overwrite(tmp_path):
    model = mlp_model(tasks=1)
    out = tmp_path / "out"
    model.to_lora(out)
    learn_more = mlp_model(tasks=2)
    assert_refused(learn_more, out, FileExistsError, r"already holds an adapter.*overwrite=True")
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # either file alone marks an adapter
        single = tmp_path / f"only-{name}"
        single.mkdir()
        (single / name).write_text("{}")
        assert_refused(learn_more, single, FileExistsError, rf"already holds an adapter \({name}\)")
    learn_more.to_lora(out, overwrite=True)
    assert load_file(out / "adapter_model.safetensors")["base_model.model.lin0.lora_A.weight"].shape == (6, 16)


def test_a_save_directory_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    model = mlp_model(tasks=1)
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        model.to_lora(target)
    assert target.read_text() == "keep me"


def test_non_finite_finished_tasks_are_refused(tmp_path):
    model = mlp_model(tasks=1)
    model.base_model.model.lin1.inflora_past_A["default"][0, 0] = float("nan")
    assert_refused(model, tmp_path / "out", ValueError, r"'lin1', hold NaN or inf.*Load it again")


def test_bad_input_is_refused_before_a_folder_is_created_even_when_everything_else_is_fine(tmp_path):
    model = mlp_model(tasks=1)
    out = tmp_path / "new" / "folder"
    with pytest.raises(ValueError, match="rank must be"):
        model.to_lora(out, rank=0)
    assert not (tmp_path / "new").exists()


# ============================================================================================ 4. PEFT's own conversion
# peft.save_as_lora(folder, model, rank) / peft.convert_to_lora(model, rank) on an InfLoRA model: the layers declare
# supports_lora_conversion and PEFT's per-layer conversion reaches the factors to_lora writes. PEFT builds the
# LoraConfig itself; it does not carry task_type, revision or fan_in_fan_out (for any method), so those fields differ
# from to_lora's, while what the config adapts (modules, r, lora_alpha, modules_to_save, base model) is the same.
PEFT_CONFIG_OMITS = {"task_type", "revision", "inference_mode", "fan_in_fan_out"}
# spelled differently by PEFT (its r=1 and full rank_pattern for rank=None, the InfLoRA target_modules plus
# exclude_modules, a repeated modules_to_save entry), compared through what PeftModel.from_pretrained builds from them
PEFT_CONFIG_SPELLS_DIFFERENTLY = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                                  "exclude_modules", "modules_to_save"}


def lora_layout(model: nn.Module) -> dict[str, tuple[int, float, bool]]:
    """Per LoRA layer of a loaded ``PeftModel``: ``(r, scaling, fan_in_fan_out)``."""
    return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"], m.fan_in_fan_out)
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def trained_copies(model: PeftModel) -> set[str]:
    """Names of the modules a loaded adapter holds trained copies of (``modules_to_save``)."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if type(m).__name__ == "ModulesToSaveWrapper"}


@pytest.mark.parametrize("name", ["bert_fold_adapter", "bert_fold_base", "gpt2_conv1d"])
def test_save_as_lora_gives_the_inflora_models_logits_in_a_process_without_peft_inflora(plain_peft_cases, name):
    case = plain_peft_cases.cases[name]
    assert (case.reference - case.peft_without_update).abs().max() > 1e-2  # the comparison can fail
    torch.testing.assert_close(case.peft_exported, case.reference, atol=ATOL, rtol=0)
    # the same tensors in the same LoRA layers: the two exports compute the very same logits
    assert torch.equal(case.peft_exported, case.exported)
    line = next(line for line in plain_peft_cases.stdout.splitlines() if line.startswith(f"{name}@peft "))
    assert line.endswith(f"lora layers: {len(case.export.layers)}")


@pytest.mark.parametrize("name", ["bert_fold_adapter", "bert_fold_base", "gpt2_conv1d"])
def test_save_as_lora_writes_the_tensors_of_to_lora(plain_peft_cases, name):
    case = plain_peft_cases.cases[name]
    ours = load_file(os.path.join(case.folder, "adapter_model.safetensors"))
    peft_s = load_file(os.path.join(case.peft_folder, "adapter_model.safetensors"))
    assert peft_s.keys() == ours.keys()
    for key in ours:
        assert peft_s[key].dtype == ours[key].dtype and torch.equal(peft_s[key], ours[key]), key
    if name.startswith("bert"):  # the trained head (modules_to_save) goes along, as with to_lora
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= peft_s.keys()


@pytest.mark.parametrize("name", ["bert_fold_adapter", "bert_fold_base", "gpt2_conv1d"])
def test_save_as_lora_config_adapts_what_to_lora_adapts(plain_peft_cases, name):
    case = plain_peft_cases.cases[name]
    with open(os.path.join(case.folder, "adapter_config.json")) as f:
        ours = json.load(f)
    with open(os.path.join(case.peft_folder, "adapter_config.json")) as f:
        peft_c = json.load(f)
    differing = {key for key in ours.keys() | peft_c.keys() if ours.get(key) != peft_c.get(key)}
    assert differing <= PEFT_CONFIG_OMITS | PEFT_CONFIG_SPELLS_DIFFERENTLY, differing
    assert peft_c["peft_type"] == "LORA" and peft_c["base_model_name_or_path"] == ours["base_model_name_or_path"]
    import transformers

    loaded = {}
    for which, folder in (("to_lora", case.folder), ("peft", case.peft_folder)):
        base = getattr(transformers, case.auto_class).from_pretrained(ours["base_model_name_or_path"])
        loaded[which] = PeftModel.from_pretrained(base, folder)
    layout = lora_layout(loaded["to_lora"])
    assert layout.keys() == case.export.layers.keys()
    assert all(scaling == 1.0 for _, scaling, _ in layout.values())
    # PEFT's config leaves fan_in_fan_out False: LoRA switches it on for Conv1D when loading (with a warning)
    assert lora_layout(loaded["peft"]) == layout
    assert trained_copies(loaded["peft"]) == trained_copies(loaded["to_lora"])


def test_convert_to_lora_truncates_as_to_lora_does():
    model = mlp_model(tasks=3)  # lin0: R = 9, rank(dW) <= 9; lin1: R = 9, rank(dW) <= 4 (4 outputs)
    for k in (1, 2, 5):
        export = model.to_lora(rank=k)
        config, state = convert_to_lora(model, rank=k)
        assert state.keys() == export.state_dict.keys()
        assert all(torch.equal(state[key], export.state_dict[key]) for key in state)
        # k = 5: lin1 keeps min(5, 4) = 4 directions, listed in rank_pattern / alpha_pattern by PEFT
        ranks = {name: config.rank_pattern.get(name, config.r) for name in ("lin0", "lin1")}
        alphas = {name: config.alpha_pattern.get(name, config.lora_alpha) for name in ("lin0", "lin1")}
        assert ranks == alphas == {name: layer.rank for name, layer in export.layers.items()}
        assert ranks["lin1"] == min(k, 4)


def test_peft_asks_the_layers_and_they_support_the_conversion():
    model = mlp_model(tasks=1)
    assert model.supports_lora_conversion()
    assert all(layer.supports_lora_conversion("default") for layer in model.base_model.inflora_layers().values())


def test_without_the_routing_peft_refuses_instead_of_converting_wrongly(monkeypatch):
    import peft.tuners.lora.conversion as conversion

    # as on a PEFT release whose per-layer conversion the routing was not installed on
    monkeypatch.setattr(conversion, "_convert_module_to_lora", conversion._convert_module_to_lora.__wrapped__)
    model = mlp_model(tasks=1, fold="base")  # PEFT's dense path would export only the (empty) task in progress
    assert not model.supports_lora_conversion()
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, rank=None)
    assert model.to_lora().tasks == 1  # to_lora does not depend on it


def test_the_routing_is_installed_once_and_not_on_a_per_layer_function_it_was_not_written_for(monkeypatch):
    import peft.tuners.lora.conversion as conversion

    from peft_inflora.registry import install_lora_conversion

    installed = conversion._convert_module_to_lora
    assert install_lora_conversion() and conversion._convert_module_to_lora is installed  # importing did it already
    assert not getattr(installed.__wrapped__, "_inflora_conversion", False)  # one wrapper around PEFT's function

    def changed(module, rank, adapter_name="default", dtype=None):  # a PEFT release with another signature
        raise AssertionError("not to be called")

    monkeypatch.setattr(conversion, "_convert_module_to_lora", changed)
    assert not install_lora_conversion() and conversion._convert_module_to_lora is changed
    assert not mlp_model(tasks=1).supports_lora_conversion()


def _peft_refusal(model: PeftModel, folder, error: type) -> str:
    """``save_as_lora`` into ``folder`` and ``convert_to_lora`` both raise ``error``; no file is written (PEFT's
    ``save_as_lora`` makes the folder before it asks the model anything) and the model is unchanged. Returns the
    message."""
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as raised:
        save_as_lora(folder, model, rank=None)
    assert not folder.exists() or not any(folder.iterdir())
    with pytest.raises(error) as raised_again:
        convert_to_lora(model, rank=4)
    assert str(raised_again.value) == str(raised.value)
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    for key, tensor in state_before.items():
        torch.testing.assert_close(state_after[key], tensor, rtol=0, atol=0, equal_nan=True)
    return str(raised.value)


def test_peft_refuses_a_task_in_progress_with_to_lora_s_error(tmp_path):
    model = mlp_model(tasks=1)
    model.begin_task(mlp_batches(20), progress=False)
    with pytest.raises(TaskLifecycleError) as by_to_lora:
        model.to_lora()
    existing = tmp_path / "existing"
    existing.mkdir()
    for folder in (existing, tmp_path / "new"):
        message = _peft_refusal(model, folder, TaskLifecycleError)
        assert message == str(by_to_lora.value)
        assert re.search(r"Task 2 .* in progress.*`end_task\(batches\)`.*`abort_task\(\)`", message)
    model.abort_task()
    save_as_lora(existing, model, rank=None)
    assert load_file(existing / "adapter_model.safetensors").keys() == model.to_lora().state_dict.keys()


def test_peft_refuses_an_adapter_with_no_finished_task_with_to_lora_s_error(tmp_path):
    model = mlp_model(tasks=0)
    with pytest.raises(TaskLifecycleError) as by_to_lora:
        model.to_lora()
    assert _peft_refusal(model, tmp_path / "out", TaskLifecycleError) == str(by_to_lora.value)


def test_peft_refuses_non_finite_finished_tasks(tmp_path):
    model = mlp_model(tasks=1)
    model.base_model.model.lin1.inflora_past_A["default"][0, 0] = float("inf")
    assert "hold NaN or inf" in _peft_refusal(model, tmp_path / "out", ValueError)


@pytest.mark.parametrize("rank", [-2, "4"])
def test_peft_ranks_that_to_lora_does_not_take_are_refused_before_a_file_is_written(tmp_path, rank):
    model = mlp_model(tasks=1)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        save_as_lora(tmp_path / "out", model, rank=rank)
    assert not any((tmp_path / "out").iterdir())
