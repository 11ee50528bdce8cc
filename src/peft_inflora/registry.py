"""Register InfLoRA with PEFT as an out-of-tree method.

This is the one module that touches PEFT internals. PEFT 0.21 only accepts methods whose name is a member of
``peft.utils.PeftType``; a third-party package therefore has to

1. add ``PeftType.INFLORA = "INFLORA"`` to that ``(str, Enum)`` (:func:`ensure_peft_type`), and
2. call ``peft.utils.register_peft_method(name="inflora", ..., prefix="inflora_")`` (:func:`register`).

Both steps are idempotent, so importing the package twice (or reloading it) is harmless, and both detect a future
PEFT release that ships its own ``INFLORA`` method and fail with a message that says what to do.

The prefix must be exactly ``"inflora_"``: transformers derives a method's parameter prefix as
``peft_type.value.lower() + "_"``.

PEFT's LoRA conversion (``peft.convert_to_lora`` / ``peft.save_as_lora``) converts each tuner layer with the module
function ``peft.tuners.lora.conversion._convert_module_to_lora`` (a dense SVD of ``get_delta_weight``, which for
``fold="base"`` holds the task in progress only); PEFT special-cases its own MiSS layers inside it.
:func:`install_lora_conversion` wraps it so that InfLoRA layers get the factors of ``InfLoRAModel.to_lora``
(``peft_inflora.export.convert_layer_to_lora``) and every other layer PEFT's own conversion.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
from typing import Optional

import packaging.version


logger = logging.getLogger(__name__)

#: lower-case method name given to ``register_peft_method``
PEFT_METHOD_NAME = "inflora"
#: name and value of the ``PeftType`` member
PEFT_TYPE_NAME = "INFLORA"
#: prefix of every InfLoRA parameter / buffer name (must equal ``PEFT_TYPE_NAME.lower() + "_"``)
PREFIX = "inflora_"
#: oldest PEFT release whose internals this module was written against
MIN_PEFT_VERSION = "0.21"

# identity of the member that *this* module added (None while PEFT's enum has not been extended by us)
_added_member: Optional[enum.Enum] = None


def check_peft_version(version: Optional[str] = None) -> None:
    """Raise ``ImportError`` unless PEFT is at least :data:`MIN_PEFT_VERSION`.

    Dev and pre-releases of a supported version (``0.21.0.dev0``) are accepted: only the release number counts.
    """
    if version is None:
        import peft

        version = peft.__version__
    try:
        release = packaging.version.Version(version).release
    except packaging.version.InvalidVersion as exc:
        raise ImportError(
            f"peft-inflora cannot read the installed PEFT version {version!r}; it needs peft>={MIN_PEFT_VERSION}. "
            f"Reinstall PEFT: pip install 'peft>={MIN_PEFT_VERSION}'"
        ) from exc
    minimum = packaging.version.Version(MIN_PEFT_VERSION).release
    if release < minimum:
        raise ImportError(
            f"peft-inflora needs peft>={MIN_PEFT_VERSION} (it registers itself through "
            f"peft.utils.register_peft_method), but peft {version} is installed. "
            f"Upgrade it: pip install -U 'peft>={MIN_PEFT_VERSION}'"
        )


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add member ``name = value`` to an existing ``(str, Enum)`` class, in place.

    Does what ``EnumType`` does while building a class: makes the member object, sets it as a class attribute and
    records it in ``_member_map_``, ``_value2member_map_`` and ``_member_names_``, so that ``enum_cls[name]``,
    ``enum_cls(value)``, ``getattr(enum_cls, name)``, iteration, ``len`` and ``__members__`` all see it.
    """
    new_member = getattr(enum_cls, "_new_member_", None) or enum_cls._member_type_.__new__
    member = new_member(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # type.__setattr__: EnumType.__setattr__ refuses to (re)assign names that look like members
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def ensure_peft_type(enum_cls: Optional[type[enum.Enum]] = None) -> enum.Enum:
    """Make sure ``PeftType.INFLORA == "INFLORA"`` exists and return it.

    Idempotent. If PEFT already defines an ``INFLORA`` member that we did not add (a future PEFT), it is accepted as
    long as its value is ``"INFLORA"``; :func:`register` then checks whose classes are registered under it.

    Args:
        enum_cls: the enum to extend; defaults to ``peft.utils.peft_types.PeftType`` (a parameter only for tests).

    Raises:
        RuntimeError: an ``INFLORA`` member exists with another value, or the value ``"INFLORA"`` belongs to a member
            of another name.
    """
    global _added_member

    if enum_cls is None:
        from peft.utils.peft_types import PeftType

        enum_cls = PeftType

    existing = enum_cls._member_map_.get(PEFT_TYPE_NAME)
    if existing is not None:
        if existing.value != PEFT_TYPE_NAME:
            raise RuntimeError(
                f"{enum_cls.__module__}.{enum_cls.__qualname__}.{PEFT_TYPE_NAME} already exists with value "
                f"{existing.value!r}, but peft-inflora needs the value {PEFT_TYPE_NAME!r} (saved adapters store it as "
                f"'peft_type'). This PEFT version is not compatible with peft-inflora: install a PEFT version "
                f"without its own INFLORA method, e.g. pip install 'peft>={MIN_PEFT_VERSION},<0.22'."
            )
        if existing is not _added_member:
            logger.debug("%s.%s was already defined by PEFT itself", enum_cls.__qualname__, PEFT_TYPE_NAME)
        return existing

    other = enum_cls._value2member_map_.get(PEFT_TYPE_NAME)
    if other is not None:
        raise RuntimeError(
            f"{enum_cls.__module__}.{enum_cls.__qualname__} already has the value {PEFT_TYPE_NAME!r} under the name "
            f"{other.name!r}; peft-inflora needs it under the name {PEFT_TYPE_NAME!r}. Install a PEFT version that "
            f"does not define it, e.g. pip install 'peft>={MIN_PEFT_VERSION},<0.22'."
        )

    member = _add_enum_member(enum_cls, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
    if enum_cls.__module__ == "peft.utils.peft_types":
        _added_member = member
    return member


def _qualname(cls: Optional[type]) -> str:
    return "None" if cls is None else f"{cls.__module__}.{cls.__qualname__}"


def registered_classes() -> tuple[Optional[type], Optional[type]]:
    """Return ``(config_cls, model_cls)`` that PEFT has registered under ``PeftType.INFLORA`` (``None`` if not)."""
    import peft.mapping

    peft_type = ensure_peft_type()
    return (
        peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type),
        peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type),
    )


def register(config_cls: type, model_cls: type) -> None:
    """Register ``config_cls`` / ``model_cls`` as PEFT method ``"inflora"`` (prefix ``"inflora_"``).

    * not registered yet: adds the enum member if needed and calls ``peft.utils.register_peft_method``;
    * already registered with these very classes: does nothing;
    * registered with classes of the same qualified names (the package was reloaded, e.g. ``importlib.reload`` or a
      notebook's autoreload): points PEFT's mappings at the new classes;
    * registered with other classes (a PEFT release that ships its own InfLoRA, or another package): raises
      ``RuntimeError`` that names both and says to pin PEFT.

    Raises:
        ImportError: PEFT is older than :data:`MIN_PEFT_VERSION`.
        RuntimeError: another method owns the name ``"inflora"`` or the prefix ``"inflora_"``.
    """
    check_peft_version()
    # looked up at call time (not imported by name) so tests can swap the dicts for copies
    import peft.mapping
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type()
    config_map = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuner_map = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING
    prefix_map = peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING
    mixed_map = peft.mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING

    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix != PREFIX:
        raise ValueError(
            f"{_qualname(model_cls)}.prefix must be {PREFIX!r} (transformers derives it from the PEFT type as "
            f"'{PEFT_TYPE_NAME.lower()}_'), got {model_prefix!r}."
        )

    owners = [other for other, prefix in prefix_map.items() if prefix == PREFIX and other != peft_type]
    if owners:
        raise RuntimeError(
            f"The parameter prefix {PREFIX!r} is already used by PEFT method(s) {sorted(str(o) for o in owners)}; "
            f"InfLoRA cannot share it. Install a PEFT version without that method, e.g. "
            f"pip install 'peft>={MIN_PEFT_VERSION},<0.22'."
        )

    in_maps = peft_type in config_map or peft_type in tuner_map or peft_type in mixed_map
    if not in_maps:
        register_peft_method(
            name=PEFT_METHOD_NAME,
            config_cls=config_cls,
            model_cls=model_cls,
            prefix=PREFIX,
            is_mixed_compatible=False,
        )
        return

    old_config, old_model = config_map.get(peft_type), tuner_map.get(peft_type)
    old_prefix = prefix_map.get(peft_type)
    if old_config is config_cls and old_model is model_cls and old_prefix == PREFIX:
        return  # registered by an earlier import: nothing to do
    if (
        _qualname(old_config) == _qualname(config_cls)
        and _qualname(old_model) == _qualname(model_cls)
        and old_prefix == PREFIX
        and config_cls.__module__.startswith("peft_inflora")
    ):
        # the same classes, re-created by a module reload: keep PEFT pointing at the live ones
        config_map[peft_type] = config_cls
        tuner_map[peft_type] = model_cls
        if peft_type in mixed_map:
            mixed_map[peft_type] = model_cls
        logger.debug("re-registered reloaded InfLoRA classes with PEFT")
        return

    import peft

    raise RuntimeError(
        f"PEFT {peft.__version__} already has a method registered as {PEFT_TYPE_NAME!r} "
        f"(config {_qualname(old_config)}, model {_qualname(old_model)}, prefix {old_prefix!r}), so peft-inflora "
        f"cannot register {_qualname(config_cls)} / {_qualname(model_cls)}. If this PEFT version ships its own "
        f"InfLoRA, either use PEFT's (and do not import peft_inflora) or pin PEFT to a version without it, e.g. "
        f"pip install 'peft>={MIN_PEFT_VERSION},<0.22'; otherwise another package registered this name first."
    )


# ---------------------------------------------------------------------------------------------- LoRA conversion
#: the parameters of PEFT 0.21's per-layer conversion function, which the wrapper is written for
_CONVERSION_PARAMETERS = ("module", "rank", "adapter_name")


def _conversion_module():
    try:
        from peft.tuners.lora import conversion
    except ImportError:  # pragma: no cover - PEFT >= 0.21 has it
        return None
    return conversion


def lora_conversion_installed() -> bool:
    """Whether PEFT's per-layer LoRA conversion hands InfLoRA layers to ``peft_inflora.export``."""
    conversion = _conversion_module()
    return getattr(getattr(conversion, "_convert_module_to_lora", None), "_inflora_conversion", False)


def install_lora_conversion() -> bool:
    """Wrap ``peft.tuners.lora.conversion._convert_module_to_lora`` so InfLoRA layers convert with
    :func:`peft_inflora.export.convert_layer_to_lora`; other layers go to PEFT's function. Idempotent.

    Returns False, changing nothing, when PEFT has no such function or one with other parameters (a PEFT release this
    was not written for): ``InfLoRALayer.supports_lora_conversion`` then answers False and PEFT's conversion refuses
    InfLoRA models with its own ``TypeError`` instead of converting them wrongly; ``to_lora`` keeps working.
    """
    conversion = _conversion_module()
    original = getattr(conversion, "_convert_module_to_lora", None)
    if original is None:
        return False
    if getattr(original, "_inflora_conversion", False):
        return True
    try:
        parameters = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError):  # pragma: no cover - defensive
        return False
    if parameters != _CONVERSION_PARAMETERS:
        logger.warning("peft.tuners.lora.conversion._convert_module_to_lora has parameters %s, not %s: "
                       "peft.save_as_lora / convert_to_lora will refuse InfLoRA models (use model.to_lora).",
                       parameters, _CONVERSION_PARAMETERS)
        return False

    @functools.wraps(original)
    def _convert_module_to_lora(module, rank, adapter_name="default"):
        from .export import convert_layer_to_lora

        # by the state InfLoRA layers hold rather than isinstance, so layers made before a reload of the package
        # (notebook autoreload) are still InfLoRA layers here
        if hasattr(module, "inflora_past_A") and hasattr(module, "inflora_past_B"):
            return convert_layer_to_lora(module, rank, adapter_name)
        return original(module, rank, adapter_name)

    _convert_module_to_lora._inflora_conversion = True
    conversion._convert_module_to_lora = _convert_module_to_lora
    return True


check_peft_version()
