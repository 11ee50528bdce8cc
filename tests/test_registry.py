"""Tests of peft_inflora.registry: the PeftType member and the guarded registration with PEFT."""

import enum
import importlib.util
import pickle

import peft
import pytest
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType, register_peft_method

from peft_inflora import registry
from peft_inflora.config import InfLoRAConfig


class _Dummy(BaseTuner):
    """Stand-in model class: registration only needs a class with the right prefix (never instantiated)."""

    prefix = "inflora_"


class _OtherModel(BaseTuner):
    prefix = "inflora_"


class _OtherConfig(InfLoRAConfig):
    pass


# ---------------------------------------------------------------------------------------------- PEFT version
@pytest.mark.parametrize("version", ["0.21.0", "0.21.2", "0.21.0.dev0", "0.22.1", "1.0.0"])
def test_check_peft_version_accepts_supported(version):
    registry.check_peft_version(version)


@pytest.mark.parametrize("version", ["0.20.1", "0.17.0", "0.9.0"])
def test_check_peft_version_rejects_old(version):
    with pytest.raises(ImportError, match=rf"needs peft>=0\.21.*peft {version} is installed.*pip install -U"):
        registry.check_peft_version(version)


def test_check_peft_version_rejects_unreadable():
    with pytest.raises(ImportError, match="cannot read the installed PEFT version 'not-a-version'"):
        registry.check_peft_version("not-a-version")


def test_installed_peft_is_supported():
    registry.check_peft_version()
    registry.check_peft_version(peft.__version__)


# ---------------------------------------------------------------------------------------------- PeftType member
def test_peft_type_member_exists_and_behaves_like_a_member():
    member = registry.ensure_peft_type()
    assert member is PeftType.INFLORA
    assert PeftType("INFLORA") is PeftType.INFLORA
    assert PeftType["INFLORA"] is PeftType.INFLORA
    assert "INFLORA" in PeftType.__members__
    assert list(PeftType).count(PeftType.INFLORA) == 1
    assert "INFLORA" in list(PeftType)  # what register_peft_method checks
    assert PeftType.INFLORA in PeftType
    assert isinstance(PeftType.INFLORA, PeftType) and isinstance(PeftType.INFLORA, str)
    assert PeftType.INFLORA == "INFLORA" and PeftType.INFLORA.name == "INFLORA"
    assert {"INFLORA": 1}[PeftType.INFLORA] == 1  # dict keys saved as plain strings still resolve
    # transformers derives a method's prefix this way
    assert PeftType.INFLORA.value.lower() + "_" == registry.PREFIX
    assert pickle.loads(pickle.dumps(PeftType.INFLORA)) is PeftType.INFLORA


def test_ensure_peft_type_is_idempotent():
    first = registry.ensure_peft_type()
    size = len(PeftType)
    names = list(PeftType.__members__)
    second = registry.ensure_peft_type()
    assert second is first
    assert len(PeftType) == size
    assert list(PeftType.__members__) == names
    # the original members are untouched
    assert PeftType("LORA") is PeftType.LORA


def test_ensure_peft_type_extends_a_fresh_enum_once():
    class FakePeftType(str, enum.Enum):
        LORA = "LORA"
        VERA = "VERA"

    member = registry.ensure_peft_type(FakePeftType)
    assert member is FakePeftType.INFLORA
    assert FakePeftType("INFLORA") is member
    assert FakePeftType["INFLORA"] is member
    assert list(FakePeftType) == [FakePeftType.LORA, FakePeftType.VERA, member]
    assert registry.ensure_peft_type(FakePeftType) is member
    assert len(FakePeftType) == 3
    with pytest.raises(AttributeError):
        FakePeftType.INFLORA = "something else"


def test_ensure_peft_type_accepts_a_member_that_peft_itself_defines():
    class FuturePeftType(str, enum.Enum):
        LORA = "LORA"
        INFLORA = "INFLORA"

    assert registry.ensure_peft_type(FuturePeftType) is FuturePeftType.INFLORA
    assert len(FuturePeftType) == 2


def test_ensure_peft_type_rejects_a_member_with_another_value():
    class FuturePeftType(str, enum.Enum):
        LORA = "LORA"
        INFLORA = "INFLORA_V2"

    with pytest.raises(RuntimeError, match=r"INFLORA already exists with value 'INFLORA_V2'.*pip install 'peft"):
        registry.ensure_peft_type(FuturePeftType)


def test_ensure_peft_type_rejects_the_value_under_another_name():
    class FuturePeftType(str, enum.Enum):
        LORA = "LORA"
        IN_FLORA = "INFLORA"

    with pytest.raises(RuntimeError, match=r"already has the value 'INFLORA' under the name 'IN_FLORA'"):
        registry.ensure_peft_type(FuturePeftType)


# ---------------------------------------------------------------------------------------------- register()
def test_register_fills_peft_mappings(isolated_peft_registry):
    registry.register(InfLoRAConfig, _Dummy)
    maps = isolated_peft_registry
    assert maps["config"][PeftType.INFLORA] is InfLoRAConfig
    assert maps["tuner"][PeftType.INFLORA] is _Dummy
    assert maps["prefix"][PeftType.INFLORA] == "inflora_"
    assert PeftType.INFLORA not in maps["mixed"]
    assert registry.registered_classes() == (InfLoRAConfig, _Dummy)
    # plain-string lookups, as PeftConfig.from_peft_type does with the saved "peft_type"
    assert maps["config"]["INFLORA"] is InfLoRAConfig


def test_register_twice_with_the_same_classes_is_a_no_op(isolated_peft_registry):
    registry.register(InfLoRAConfig, _Dummy)
    before = {name: dict(mapping) for name, mapping in isolated_peft_registry.items()}
    registry.register(InfLoRAConfig, _Dummy)
    registry.register(InfLoRAConfig, _Dummy)
    assert {name: dict(mapping) for name, mapping in isolated_peft_registry.items()} == before
    # PEFT itself would refuse the second call: the guard is what makes a second import harmless
    with pytest.raises(KeyError, match="already PEFT method called 'inflora'"):
        register_peft_method(name="inflora", config_cls=InfLoRAConfig, model_cls=_Dummy, prefix="inflora_")


@pytest.mark.parametrize(
    "config_cls, model_cls", [(_OtherConfig, _Dummy), (InfLoRAConfig, _OtherModel), (_OtherConfig, _OtherModel)]
)
def test_register_with_different_classes_raises(isolated_peft_registry, config_cls, model_cls):
    registry.register(InfLoRAConfig, _Dummy)
    with pytest.raises(RuntimeError, match=r"already has a method registered as 'INFLORA'.*_Dummy.*pip install 'peft"):
        registry.register(config_cls, model_cls)
    assert registry.registered_classes() == (InfLoRAConfig, _Dummy)


def test_register_detects_a_peft_that_ships_its_own_inflora(isolated_peft_registry):
    class PeftsInfLoRAConfig(InfLoRAConfig):
        pass

    class PeftsInfLoRAModel(BaseTuner):
        prefix = "inflora_"

    # what a future PEFT's own `register_peft_method(name="inflora", ...)` would leave behind
    isolated_peft_registry["config"][PeftType.INFLORA] = PeftsInfLoRAConfig
    isolated_peft_registry["tuner"][PeftType.INFLORA] = PeftsInfLoRAModel
    isolated_peft_registry["prefix"][PeftType.INFLORA] = "inflora_"
    with pytest.raises(RuntimeError, match=r"PeftsInfLoRAConfig.*PeftsInfLoRAModel.*pin PEFT"):
        registry.register(InfLoRAConfig, _Dummy)


def test_register_accepts_classes_recreated_by_a_reload(isolated_peft_registry):
    registry.register(InfLoRAConfig, _Dummy)
    # importlib.reload(peft_inflora.config) makes a new class object with the same module and qualified name
    reloaded = type(
        "InfLoRAConfig", (InfLoRAConfig,), {"__module__": InfLoRAConfig.__module__, "__qualname__": "InfLoRAConfig"}
    )
    registry.register(reloaded, _Dummy)
    assert registry.registered_classes() == (reloaded, _Dummy)


def test_register_refuses_a_prefix_used_by_another_method(isolated_peft_registry):
    isolated_peft_registry["prefix"][PeftType.LORA] = "inflora_"
    with pytest.raises(RuntimeError, match=r"prefix 'inflora_' is already used"):
        registry.register(InfLoRAConfig, _Dummy)
    assert PeftType.INFLORA not in isolated_peft_registry["config"]


def test_register_checks_the_model_prefix(isolated_peft_registry):
    class WrongPrefix(BaseTuner):
        prefix = "lora_"

    with pytest.raises(ValueError, match=r"WrongPrefix.prefix must be 'inflora_'.*got 'lora_'"):
        registry.register(InfLoRAConfig, WrongPrefix)
    assert PeftType.INFLORA not in isolated_peft_registry["config"]


def test_register_refuses_an_old_peft(isolated_peft_registry, monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.20.0")
    with pytest.raises(ImportError, match=r"needs peft>=0\.21"):
        registry.register(InfLoRAConfig, _Dummy)


def test_registration_by_the_package_is_stable():
    """With the real model class (once ``peft_inflora.model`` exists): registering again changes nothing."""
    if importlib.util.find_spec("peft_inflora.model") is None:
        pytest.skip("peft_inflora.model is not written yet")
    from peft_inflora.model import InfLoRAModel

    registry.register(InfLoRAConfig, InfLoRAModel)
    registry.register(InfLoRAConfig, InfLoRAModel)
    assert registry.registered_classes() == (InfLoRAConfig, InfLoRAModel)
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.INFLORA] == "inflora_"
