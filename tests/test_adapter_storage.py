"""The saved adapter keeps one copy of each input group's shared state, and the memory basis in the configured
precision (peft_inflora.storage).

A tiny BERT with query / key / value adapted: the three layers of a block read one input, so they share ``B_t``,
``past_B`` and the memory, which the file must hold once per block and loading must give back to every layer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert

from peft_inflora import InfLoRAConfig
from peft_inflora.model import InfLoRAModel
from peft_inflora.storage import SHARED_STATE_NAMES, subspace_error_bound


QKV = ["query", "key", "value"]
BLOCKS = ("bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self")
WEIGHTS = "adapter_model.safetensors"


def batches(seed: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 100, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(n)]


def trained(tasks: int = 2, in_progress: bool = True, **config) -> PeftModel:
    """Tasks with random (non-zero) A_t standing in for training; optionally one more task begun and 'trained'."""
    kwargs = {"r": 2, "target_modules": QKV, "statistics_max_tokens": None, "energy_threshold": 0.9}
    kwargs.update(config)
    model = get_peft_model(tiny_bert(), InfLoRAConfig(**kwargs))
    g = torch.Generator().manual_seed(123)
    for t in range(tasks + int(in_progress)):
        model.begin_task(batches(t), progress=False)
        for layer in model.base_model.inflora_layers().values():
            a = layer.inflora_A["default"]
            a.data = torch.randn(a.shape, generator=g)
        if t < tasks:
            model.end_task(batches(t), progress=False)
    return model.eval()


def logits(model, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in data])


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "inflora_" in k}


def keys_of(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


# ------------------------------------------------------------------------------------------ one copy per group
def test_file_holds_shared_state_once_per_input_group(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    saved = keys_of(tmp_path)
    for state in SHARED_STATE_NAMES:
        stored = [k for k in saved if k.endswith(f".{state}")]
        sources = {k: bytes(v.tolist()).decode() for k, v in saved.items() if k.endswith(f".{state}_source")}
        # one tensor per block, under its first layer (query); key and value name it
        assert sorted(stored) == [f"base_model.model.{b}.query.{state}" for b in BLOCKS]
        assert sources == {f"base_model.model.{b}.{n}.{state}_source": f"{b}.query" for b in BLOCKS
                           for n in ("key", "value")}
    # per-layer state stays per layer
    assert len([k for k in saved if k.endswith(".inflora_past_A")]) == 6
    assert len([k for k in saved if k.endswith(".inflora_task_ranks")]) == 6


def test_shared_file_loads_bit_identical_outputs_state_and_next_design(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True).eval()
    probe = batches(50)
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    expected, got = adapter_state(model), adapter_state(loaded)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # the layers of a group hold the same values again (and are separate tensors: one can change alone)
    layers = loaded.base_model.inflora_layers()
    for block in BLOCKS:
        for state in SHARED_STATE_NAMES:
            q = getattr(layers[f"{block}.query"], state)["default"]
            for n in ("key", "value"):
                other = getattr(layers[f"{block}.{n}"], state)["default"]
                assert torch.equal(other, q) and other.data_ptr() != q.data_ptr()
    # finishing the task and designing the next one gives the same as without the round trip
    for m in (model, loaded):
        m.end_task(batches(2), progress=False)
        m.begin_task(batches(3), progress=False)
    for name, layer in model.base_model.inflora_layers().items():
        assert torch.equal(layers[name].inflora_B["default"], layer.inflora_B["default"])
        assert torch.equal(layers[name].inflora_memory["default"], layer.inflora_memory["default"])


def test_low_cpu_mem_usage_load_gives_every_layer_its_own_tensor(tmp_path):
    model = trained(in_progress=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=True).eval()
    probe = batches(55)
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    layers = loaded.base_model.inflora_layers()
    for state in ("inflora_past_B", "inflora_memory"):
        pointers = [getattr(layers[f"{BLOCKS[0]}.{n}"], state)["default"].data_ptr() for n in QKV]
        assert len(set(pointers)) == 3, state  # not tied: loading another file into one layer cannot reach the others


def test_load_adapter_reads_the_shared_file(tmp_path):
    model = trained(in_progress=False)
    model.save_pretrained(tmp_path)
    probe = batches(51)
    expected = logits(model, probe)
    other = get_peft_model(tiny_bert(), InfLoRAConfig(r=2, target_modules=QKV))
    other.load_adapter(tmp_path, adapter_name="loaded")
    other.set_adapter("loaded")
    assert torch.equal(logits(other.eval(), probe), expected)


def test_layers_whose_state_differs_keep_their_own_copy(tmp_path):
    # value gets rank 1: its past_B holds the first row of each task's design, not query's two, so it stays stored;
    # the memory of the group is still the same tensor and is stored once
    model = trained(rank_pattern={"value": 1}, in_progress=False)
    model.save_pretrained(tmp_path)
    saved = keys_of(tmp_path)
    assert len([k for k in saved if k.endswith(".inflora_past_B")]) == 4  # query (key shares it) and value
    assert len([k for k in saved if k.endswith(".inflora_memory")]) == 2
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    expected = adapter_state(model)
    assert all(torch.equal(expected[k], v) for k, v in adapter_state(loaded).items())


def save_the_old_way(model, folder, monkeypatch):
    """Write the file as the release before shared storage did: PEFT's own selection, one copy per layer."""
    with monkeypatch.context() as patch:
        patch.setattr(InfLoRAModel, "_get_adapter_state_dict", classmethod(BaseTuner._get_adapter_state_dict.__func__))
        model.save_pretrained(folder)


@pytest.mark.parametrize("fold", ["adapter", "base"])
def test_a_file_with_one_copy_per_layer_still_loads(tmp_path, monkeypatch, fold):
    model = trained(fold=fold, in_progress=False)
    save_the_old_way(model, tmp_path, monkeypatch)
    saved = keys_of(tmp_path)
    assert len([k for k in saved if k.endswith(".inflora_memory")]) == 6
    assert not any(k.endswith("_source") for k in saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.pop("memory_storage_dtype")  # the old release's config has no such field
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    probe = batches(52)
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    expected = adapter_state(model)
    assert all(torch.equal(expected[k], v) for k, v in adapter_state(loaded).items())
    # and the next save writes the shared layout
    loaded.save_pretrained(tmp_path / "again")
    assert len([k for k in keys_of(tmp_path / "again") if k.endswith(".inflora_memory")]) == 2


def test_fold_base_to_lora_delete_and_add_adapter_work_on_a_loaded_shared_file(tmp_path):
    model = trained(fold="base", in_progress=False)
    model.save_pretrained(tmp_path / "inflora")
    pristine = tiny_bert()
    probe = batches(53)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "inflora").eval()
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    exported = loaded.to_lora(tmp_path / "lora")
    reference = model.to_lora()
    assert all(torch.equal(reference.state_dict[k], v) for k, v in exported.state_dict.items())
    loaded.add_adapter("second", InfLoRAConfig(r=2, target_modules=QKV))
    loaded.delete_adapter("default")
    with torch.no_grad():  # the folded tasks left the base weights with the adapter
        for name, param in loaded.base_model.model.named_parameters():
            if "base_layer.weight" in name:
                original = pristine.get_parameter(name.replace("base_layer.", ""))
                assert torch.allclose(param, original, atol=1e-6)


def test_a_source_naming_a_missing_layer_is_refused_and_leaves_the_base_model(tmp_path):
    model = trained(in_progress=False)
    model.save_pretrained(tmp_path)
    saved = keys_of(tmp_path)
    del saved[f"base_model.model.{BLOCKS[0]}.query.inflora_memory"]
    save_file(saved, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="stored as a copy of layer .*truncated or was edited"):
        PeftModel.from_pretrained(base, tmp_path)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


# ------------------------------------------------------------------------------------------ memory precision
def projector(basis: np.ndarray, form: int) -> np.ndarray:
    p = basis @ basis.T
    return np.eye(basis.shape[0]) - p if form == 0 else p


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("memory", ["gpm", "dualgpm"])
def test_a_16_bit_memory_is_saved_small_and_reorthonormalised_on_load(tmp_path, dtype, memory):
    # energy 0.999 over two tasks: a memory of about two thirds of d_in = 32, stored as its complement by DualGPM
    model = trained(in_progress=False, memory_storage_dtype=dtype, memory=memory, energy_threshold=0.999)
    model.save_pretrained(tmp_path)
    saved = keys_of(tmp_path)
    stored = [v for k, v in saved.items() if k.endswith(".inflora_memory")]
    assert len(stored) == 2 and all(v.dtype == getattr(torch, dtype) for v in stored)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    probe = batches(54)
    assert torch.equal(logits(loaded, probe), logits(model, probe))  # the outputs do not read the memory
    exact_layers = model.base_model.inflora_layers()
    for name, layer in loaded.base_model.inflora_layers().items():
        basis = layer.inflora_memory["default"]
        assert basis.dtype == torch.float32
        b = basis.double().numpy()
        assert np.abs(b.T @ b - np.eye(b.shape[1])).max() < 1e-6
        form = int(layer.inflora_memory_form["default"])
        exact = exact_layers[name].inflora_memory["default"].double().numpy()
        gap = np.linalg.norm(projector(b, form) - projector(exact, form), 2)
        assert 0 < gap <= subspace_error_bound(b.shape[0], b.shape[1], getattr(torch, dtype))
    # the next design, built in the loaded free space, leaks into inputs inside the exact memory by at most the bound
    loaded.begin_task(batches(5), progress=False)
    g = torch.Generator().manual_seed(9)
    for name, layer in loaded.base_model.inflora_layers().items():
        exact = exact_layers[name].get_memory("default")
        occupied = (torch.eye(exact.d_in, dtype=torch.float64) - exact.projector()).numpy()
        x = occupied @ torch.randn(exact.d_in, 200, generator=g, dtype=torch.float64).numpy()  # old inputs
        design = layer.inflora_B["default"].double().numpy()
        leakage = np.linalg.norm(design @ x) / (np.linalg.norm(design, 2) * np.linalg.norm(x))
        stored_columns = layer.inflora_memory["default"].shape[1]
        assert leakage <= subspace_error_bound(exact.d_in, stored_columns, getattr(torch, dtype))


def test_float32_memory_is_stored_exactly(tmp_path):
    model = trained(in_progress=False)
    model.save_pretrained(tmp_path)
    assert all(v.dtype == torch.float32 for k, v in keys_of(tmp_path).items() if k.endswith(".inflora_memory"))


@pytest.mark.parametrize("bad", ["int8", "fp8", "float64", None, 16])
def test_bad_memory_storage_dtype_is_refused_with_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"memory_storage_dtype must be one of .*bfloat16"):
        InfLoRAConfig(r=2, target_modules=QKV, memory_storage_dtype=bad)


def test_a_bad_value_set_after_building_is_refused_before_anything_is_written(tmp_path):
    model = trained(in_progress=False)
    model.peft_config["default"].memory_storage_dtype = "int8"
    with pytest.raises(ValueError, match="memory_storage_dtype must be one of"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / WEIGHTS).exists() and not (tmp_path / "out" / "adapter_config.json").exists()
