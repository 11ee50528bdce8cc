"""Tests of peft_inflora.config: defaults, validation, serialisation, loading, default target modules."""

import copy
import dataclasses
import json
import math
import os
import re
import warnings

import numpy as np
import pytest
from peft import LoraConfig, PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, PeftType

from peft_inflora import registry
from peft_inflora.config import INFLORA_TARGET_MODULES_MAPPING, InfLoRAConfig, UnknownConfigFieldError


_BASE_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)}
INFLORA_FIELDS = [f for f in dataclasses.fields(InfLoRAConfig) if f.name not in _BASE_FIELDS]

DEFAULTS = {
    "r": 10,
    "target_modules": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "design": "eigen",
    "design_scale": 1 / math.sqrt(3),
    "memory": "dualgpm",
    "energy_threshold": 0.95,
    "energy": "squared",
    "total_tasks": None,
    "adaptive_threshold": False,
    "fold": "adapter",
    "cache_past_weight": True,
    "statistics_max_batches": None,
    "statistics_max_tokens": "auto",
    "statistics_dtype": "float64",
    "statistics_sketch": None,
    "memory_storage_dtype": "float32",
    "share_input_statistics": True,
    "solver": "auto",
    "random_seed": 0,
    "init_weights": True,
}


def _model_class():
    """The real model class if it exists yet, otherwise a stand-in (registration only needs its prefix)."""
    try:
        from peft_inflora.model import InfLoRAModel
    except ModuleNotFoundError:

        class InfLoRAModel(BaseTuner):
            prefix = "inflora_"

    return InfLoRAModel


def _save(config, path, **extra):
    config.save_pretrained(path)
    if extra:
        file = os.path.join(path, "adapter_config.json")
        with open(file) as f:
            saved = json.load(f)
        saved.update(extra)
        with open(file, "w") as f:
            json.dump(saved, f)
    return path


# ---------------------------------------------------------------------------------------------- defaults, docs
def test_defaults():
    config = InfLoRAConfig()
    assert {name: getattr(config, name) for name in DEFAULTS} == DEFAULTS
    assert [f.name for f in INFLORA_FIELDS] == list(DEFAULTS)
    assert config.peft_type is PeftType.INFLORA
    assert config.is_prompt_learning is False
    assert InfLoRAConfig().rank_pattern is not config.rank_pattern  # no shared mutable default


def test_every_field_is_documented():
    for f in INFLORA_FIELDS:
        assert f.metadata.get("help"), f"{f.name} has no metadata help"
        assert f"    {f.name} (`" in InfLoRAConfig.__doc__, f"{f.name} is missing from the docstring's Args"


def test_target_modules_lists_become_sets_and_regexes_stay():
    config = InfLoRAConfig(target_modules=["k_proj", "v_proj", "k_proj"], exclude_modules=["lm_head"])
    assert config.target_modules == {"k_proj", "v_proj"}
    assert config.exclude_modules == {"lm_head"}
    config = InfLoRAConfig(target_modules=r".*\.(k|v)_proj$", exclude_modules="all-linear")
    assert config.target_modules == r".*\.(k|v)_proj$"


def test_values_are_normalised():
    config = InfLoRAConfig(
        r=np.int64(4),
        energy_threshold=1,
        design_scale=2,
        total_tasks=np.int32(5),
        layers_to_transform=(0, np.int64(2)),
        layers_pattern=("layers",),
        modules_to_save=("classifier",),
        rank_pattern=None,
        random_seed=np.uint8(7),
    )
    assert type(config.r) is int and config.r == 4
    assert type(config.energy_threshold) is float and config.energy_threshold == 1.0
    assert type(config.design_scale) is float
    assert type(config.total_tasks) is int
    assert config.layers_to_transform == [0, 2] and all(type(i) is int for i in config.layers_to_transform)
    assert config.layers_pattern == ["layers"]
    assert config.modules_to_save == ["classifier"]
    assert config.rank_pattern == {}
    assert type(config.random_seed) is int and config.random_seed == 7
    json.dumps(dataclasses.asdict(config) | {"target_modules": None, "peft_type": "INFLORA"})


def test_accepted_alternatives():
    config = InfLoRAConfig(
        r=1,
        design="random",
        memory="gpm",
        energy="linear",
        fold="base",
        statistics_dtype="float32",
        energy_threshold=1.0,
        total_tasks=1,
        statistics_max_batches=1,
        layers_to_transform=3,
        layers_pattern="h",
        rank_pattern={"k_proj": 4, r"layers\.0\..*": 2},
        share_input_statistics=False,
        init_weights=False,
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    assert config.rank_pattern == {"k_proj": 4, r"layers\.0\..*": 2}


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, r"r must be an int >= 1, got 0: use e\.g\. 10"),
        ({"r": -3}, r"r must be an int >= 1, got -3"),
        ({"r": 2.5}, r"r must be an int >= 1, got 2\.5"),
        ({"r": True}, r"r must be an int >= 1, got True"),
        ({"r": "8"}, r"r must be an int >= 1, got '8'"),
        ({"target_modules": 3}, r"target_modules must be a list of module names or a regex string, got 3"),
        ({"target_modules": ["k", 1]}, r"target_modules must contain only non-empty module names, got \[1\]"),
        ({"target_modules": ""}, r"target_modules must not be an empty string"),
        ({"target_modules": "(unclosed"}, r"target_modules: '\(unclosed' is not a valid regular expression"),
        ({"exclude_modules": {"a": 1}}, r"exclude_modules must be a list of module names or a regex string"),
        ({"fan_in_fan_out": 1}, r"fan_in_fan_out must be True or False, got 1"),
        ({"modules_to_save": "classifier"}, r"modules_to_save must be a list of module names or None, got 'clas"),
        ({"modules_to_save": [""]}, r"modules_to_save must contain only non-empty module names"),
        ({"layers_to_transform": -1}, r"layers_to_transform must be an int >= 0, got -1"),
        ({"layers_to_transform": [0, "1"]}, r"layers_to_transform must be an int >= 0, got '1'"),
        ({"layers_to_transform": 1.0}, r"layers_to_transform must be an int >= 0, got 1\.0"),
        (
            {"layers_to_transform": [0], "target_modules": ".*k_proj"},
            r"layers_to_transform=\[0\] cannot be used with target_modules given as a regex",
        ),
        ({"layers_pattern": "layers"}, r"layers_pattern='layers' is set but layers_to_transform is not"),
        ({"layers_pattern": 3, "layers_to_transform": 0}, r"layers_pattern must be a module-list name"),
        ({"layers_pattern": ["layers", 2], "layers_to_transform": 0}, r"layers_pattern must contain only"),
        ({"rank_pattern": [("k", 2)]}, r"rank_pattern must be a dict of module name or regex -> rank"),
        ({"rank_pattern": {"k_proj": 0}}, r"rank_pattern\['k_proj'\] must be an int >= 1, got 0"),
        ({"rank_pattern": {"k_proj": -2}}, r"rank_pattern\['k_proj'\] must be an int >= 1, got -2"),
        ({"rank_pattern": {"k_proj": 1.5}}, r"rank_pattern\['k_proj'\] must be an int >= 1, got 1\.5"),
        ({"rank_pattern": {"": 2}}, r"rank_pattern keys must be non-empty module names or regexes"),
        ({"rank_pattern": {"[": 2}}, r"rank_pattern: '\[' is not a valid regular expression"),
        ({"design": "svd"}, r"design must be one of \['eigen', 'random'\], got 'svd'"),
        ({"design_scale": 0.0}, r"design_scale must be a finite number > 0, got 0\.0: use the default 1/sqrt\(3\)"),
        ({"design_scale": -1}, r"design_scale must be a finite number > 0, got -1\.0"),
        ({"design_scale": float("inf")}, r"design_scale must be a finite number > 0, got inf"),
        ({"design_scale": "big"}, r"design_scale must be a number, got 'big'"),
        ({"memory": "GPM"}, r"memory must be one of \['dualgpm', 'gpm'\], got 'GPM'"),
        ({"energy_threshold": 1.5}, r"energy_threshold must be in \(0, 1\], got 1\.5: use e\.g\. 0\.95"),
        ({"energy_threshold": 95}, r"energy_threshold must be in \(0, 1\], got 95\.0.*not a percentage"),
        ({"energy_threshold": 0}, r"energy_threshold must be in \(0, 1\], got 0\.0"),
        ({"energy_threshold": float("nan")}, r"energy_threshold must be in \(0, 1\], got nan"),
        ({"energy_threshold": None}, r"energy_threshold must be a number, got None"),
        ({"energy": "cubic"}, r"energy must be one of \['squared', 'linear'\], got 'cubic'"),
        ({"total_tasks": 0}, r"total_tasks must be an int >= 1, got 0: set it to the number of tasks"),
        ({"total_tasks": 2.0}, r"total_tasks must be an int >= 1, got 2\.0"),
        ({"fold": "merge"}, r"fold must be one of \['adapter', 'base'\], got 'merge'"),
        ({"statistics_max_batches": 0}, r"statistics_max_batches must be an int >= 1, got 0: use None"),
        ({"statistics_dtype": "bfloat16"}, r"statistics_dtype must be one of \['float32', 'float64'\], got 'bfl"),
        ({"share_input_statistics": "yes"}, r"share_input_statistics must be True or False, got 'yes'"),
        ({"random_seed": -1}, r"random_seed must be an int >= 0, got -1"),
        ({"random_seed": 2**64}, r"random_seed must be < 2\*\*63"),
        ({"init_weights": None}, r"init_weights must be True or False, got None"),
        ({"peft_type": "LORA"}, r"peft_type must be 'INFLORA' for InfLoRAConfig, got 'LORA'"),
        ({"task_type": "NOT_A_TASK"}, r"Invalid task type: 'NOT_A_TASK'"),
    ],
)
def test_invalid_values_raise_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfLoRAConfig(**kwargs)


def test_unknown_keyword_is_a_type_error_when_constructing():
    # only loading forgives unknown fields; a typo in code must fail loudly
    with pytest.raises(TypeError, match="energy_treshold"):
        InfLoRAConfig(energy_treshold=0.9)


# ---------------------------------------------------------------------------------------------- copies, dicts
def test_to_dict_copy_and_replace():
    config = InfLoRAConfig(r=4, target_modules=["k_proj"], rank_pattern={"k_proj": 2}, total_tasks=10)
    as_dict = config.to_dict()
    assert as_dict["peft_type"] == "INFLORA"
    assert as_dict["r"] == 4 and as_dict["rank_pattern"] == {"k_proj": 2} and as_dict["total_tasks"] == 10
    assert set(as_dict) == {f.name for f in dataclasses.fields(InfLoRAConfig)}
    assert copy.deepcopy(config) == config
    assert dataclasses.replace(config, r=6).r == 6
    with pytest.raises(ValueError, match="energy_threshold"):
        dataclasses.replace(config, energy_threshold=2.0)


# ---------------------------------------------------------------------------------------------- save / load
def _non_default_config():
    return InfLoRAConfig(
        r=6,
        target_modules=["k_proj", "v_proj"],
        rank_pattern={"v_proj": 3},
        design="random",
        design_scale=0.25,
        memory="gpm",
        energy_threshold=0.9,
        energy="linear",
        total_tasks=5,
        fold="base",
        statistics_max_batches=100,
        statistics_dtype="float32",
        share_input_statistics=False,
        random_seed=42,
        init_weights=False,
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )


def test_save_pretrained_writes_plain_json(tmp_path):
    config = _non_default_config()
    _save(config, tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["peft_type"] == "INFLORA"
    assert sorted(saved["target_modules"]) == ["k_proj", "v_proj"]
    assert {name: saved[name] for name in ("r", "design", "fold", "total_tasks", "random_seed")} == {
        "r": 6,
        "design": "random",
        "fold": "base",
        "total_tasks": 5,
        "random_seed": 42,
    }


def test_round_trip_with_inflora_config_without_registration(tmp_path, isolated_peft_registry):
    """InfLoRAConfig.from_pretrained does not need the method registered with PEFT."""
    assert PeftType.INFLORA not in isolated_peft_registry["config"]
    config = _non_default_config()
    loaded = InfLoRAConfig.from_pretrained(_save(config, tmp_path))
    assert type(loaded) is InfLoRAConfig
    assert loaded == config
    assert loaded.peft_type is PeftType.INFLORA
    assert loaded.target_modules == {"k_proj", "v_proj"}


def test_round_trip_with_peft_config_when_registered(tmp_path, isolated_peft_registry):
    registry.register(InfLoRAConfig, _model_class())
    config = _non_default_config()
    _save(config, tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is InfLoRAConfig
    assert loaded == config
    assert PeftConfig._get_peft_type(str(tmp_path)) == "INFLORA"


def test_peft_config_from_pretrained_needs_registration(tmp_path, isolated_peft_registry):
    """What a process that has not imported peft_inflora sees (documented in the README)."""
    _save(InfLoRAConfig(), tmp_path)
    with pytest.raises(KeyError, match="INFLORA"):
        PeftConfig.from_pretrained(tmp_path)


def test_unknown_saved_fields_are_refused_naming_them_and_saying_to_upgrade(tmp_path):
    """Fields from a newer peft-inflora may change how later tasks are designed: refused, not silently dropped."""
    config = InfLoRAConfig(r=4)
    _save(config, tmp_path, future_field=1, another_new_field="x")
    with pytest.raises(
        UnknownConfigFieldError,
        match=r"no field\(s\) \['another_new_field', 'future_field'\].*pip install -U peft-inflora",
    ):
        InfLoRAConfig.from_pretrained(tmp_path)


def test_unknown_saved_fields_through_peft_config_are_refused_too(tmp_path, isolated_peft_registry):
    registry.register(InfLoRAConfig, _model_class())
    config = InfLoRAConfig(r=4)
    _save(config, tmp_path, future_field=1)
    # PEFT's own forward-compatibility path would drop the field with a warning to upgrade PEFT (the wrong package)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnknownConfigFieldError, match=r"\['future_field'\].*pip install -U peft-inflora"):
            PeftConfig.from_pretrained(tmp_path)


def test_known_fields_load_without_warnings(tmp_path):
    _save(InfLoRAConfig(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InfLoRAConfig.from_pretrained(tmp_path)


def test_loading_another_methods_config_is_refused(tmp_path):
    LoraConfig(r=4, target_modules=["q"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"peft_type='LORA', not 'INFLORA': it is not an InfLoRA adapter"):
        InfLoRAConfig.from_pretrained(tmp_path)


def test_invalid_saved_values_fail_validation(tmp_path):
    _save(InfLoRAConfig(), tmp_path, energy_threshold=3.0)
    with pytest.raises(ValueError, match=r"energy_threshold must be in \(0, 1\], got 3\.0"):
        InfLoRAConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- target modules
def test_target_modules_mapping():
    for model_type in ("vit", "deit", "dinov2"):
        assert {"k_proj", "v_proj"} <= set(INFLORA_TARGET_MODULES_MAPPING[model_type])
    assert INFLORA_TARGET_MODULES_MAPPING["bert"] == ["query", "value"]
    assert INFLORA_TARGET_MODULES_MAPPING["roberta"] == ["query", "value"]
    assert INFLORA_TARGET_MODULES_MAPPING["gpt2"] == ["c_attn"]
    assert INFLORA_TARGET_MODULES_MAPPING["t5"] == INFLORA_TARGET_MODULES_MAPPING["mt5"] == ["q", "v"]
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        assert INFLORA_TARGET_MODULES_MAPPING[model_type] == ["q_proj", "v_proj"]
    # LoRA's other entries are kept, as copies
    assert set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) <= set(INFLORA_TARGET_MODULES_MAPPING)
    assert INFLORA_TARGET_MODULES_MAPPING["llama"] is not TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]
    assert "vit" not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # PEFT's table is not modified


TINY = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 8, "intermediate_size": 16}


@pytest.mark.parametrize(
    "model_type, kwargs",
    [
        ("vit", {**TINY, "image_size": 8, "patch_size": 4}),
        ("deit", {**TINY, "image_size": 8, "patch_size": 4}),
        ("dinov2", {**TINY, "image_size": 8, "patch_size": 4}),
        ("bert", {**TINY, "vocab_size": 32}),
        ("roberta", {**TINY, "vocab_size": 32}),
        ("gpt2", {"n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 32}),
        ("t5", {"num_layers": 1, "num_heads": 2, "d_model": 8, "d_kv": 4, "d_ff": 16, "vocab_size": 32}),
        ("llama", {**TINY, "vocab_size": 32}),
        ("qwen2", {**TINY, "vocab_size": 32, "num_key_value_heads": 2}),
    ],
)
def test_target_modules_mapping_matches_the_installed_transformers(model_type, kwargs):
    """Every default list names at least one module that exists in that architecture (2 for key and value)."""
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs))
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = leaf_names & set(INFLORA_TARGET_MODULES_MAPPING[model_type])
    expected = 1 if model_type == "gpt2" else 2
    assert len(found) == expected, (model_type, found, sorted(leaf_names))


CHOICE_LISTS = {"design": "DESIGNS", "memory": "MEMORIES", "energy": "ENERGIES", "fold": "FOLDS",
                "statistics_dtype": "STATISTICS_DTYPES", "solver": "SOLVERS"}


def test_each_choice_list_is_defined_once():
    """The config checks memory, energy and solver against the very lists the subspace math checks."""
    from peft_inflora import config, subspace, validation

    assert config.MEMORIES is validation.MEMORIES is subspace.MEMORY_KINDS
    assert config.ENERGIES is validation.ENERGIES is subspace.ENERGIES
    assert config.SOLVERS is validation.SOLVERS is subspace.SOLVERS


@pytest.mark.parametrize("name", sorted(CHOICE_LISTS))
def test_every_listed_choice_is_accepted_and_others_are_refused_naming_the_list(name):
    from peft_inflora import validation

    choices = getattr(validation, CHOICE_LISTS[name])
    for value in choices:
        assert getattr(InfLoRAConfig(**{name: value}), name) == value
    with pytest.raises(ValueError, match=re.escape(f"{name} must be one of {list(choices)}, got 'nope'")):
        InfLoRAConfig(**{name: "nope"})
