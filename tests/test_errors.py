"""Every exception and warning class of the method is defined once, in ``peft_inflora.errors``.

A class defined twice (say a second ``TaskLifecycleError`` in another module) would make ``except`` clauses written
against the exported name miss the errors the other module raises: these tests catch that.
"""

import importlib
import inspect

import pytest

import peft_inflora
from peft_inflora import errors


APPLICATION = ("continual", "trainer", "metrics", "hub", "data", "trl")  # the application's modules and packages

# where each class was defined before errors.py existed: the old import paths keep working
OLD_HOMES = {
    "NoTaskInProgressError": "layer",
    "TaskLifecycleError": "model",
    "SubspaceExhaustedError": "model",
    "SubspaceWarning": "model",
    "StatisticsError": "statistics",
    "SketchWarning": "sketch",
    "UnknownConfigFieldError": "config",
    "AdapterFileError": "config",
    "ShardedAdapterError": "distributed",
    "DistributedStepError": "distributed",
    "QuantizedMergeWarning": "bnb",
}


def _method_modules():
    """Every module of the method (the package without the application), found on disk so new ones are covered."""
    import pkgutil

    for info in pkgutil.walk_packages(peft_inflora.__path__, "peft_inflora."):
        if info.name.split(".")[1] not in APPLICATION:
            yield importlib.import_module(info.name)


def test_errors_lists_every_class_it_defines():
    defined = {n for n, obj in vars(errors).items() if inspect.isclass(obj) and obj.__module__ == errors.__name__}
    assert defined == set(errors.__all__) == set(OLD_HOMES)


def test_no_method_module_defines_its_own_exception_or_warning():
    modules = list(_method_modules())
    names = {m.__name__ for m in modules}
    assert {"peft_inflora.model", "peft_inflora.subspace.update", "peft_inflora.errors"} <= names
    for module in modules:
        if module is errors:
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                pytest.fail(f"{module.__name__}.{name} is an exception class outside peft_inflora.errors")


@pytest.mark.parametrize("name", sorted(OLD_HOMES))
def test_each_class_is_the_same_object_from_every_import_path(name):
    cls = getattr(errors, name)
    assert getattr(peft_inflora, name) is cls
    assert name in peft_inflora.__all__
    assert getattr(importlib.import_module(f"peft_inflora.{OLD_HOMES[name]}"), name) is cls
