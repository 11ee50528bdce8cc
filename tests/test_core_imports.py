"""The method runs with torch, transformers, peft and safetensors alone; the application is loaded only when used.

In a fresh interpreter where matplotlib, datasets and evaluate cannot be imported (every meta-path finder is wrapped
so that it does not find them: ``import datasets`` raises ImportError and ``importlib.util.find_spec("datasets")`` is
None, as when the package is not installed), ``import peft_inflora``, ``get_peft_model``, two tasks, save / load and
``to_lora`` all work, and no application module gets imported. Statically, no method module imports the
application (imports go application -> method only), and the subspace math imports no PEFT.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peft_inflora


HERE = Path(__file__).parent
PACKAGE = HERE.parent / "src" / "peft_inflora"
BLOCKED = ("matplotlib", "datasets", "evaluate")
APPLICATION = ("continual", "trainer", "metrics", "hub", "data", "trl")  # modules (or packages) of the application

CORE_RUN = r'''
import importlib.util
import json
import sys
import tempfile

BLOCKED = set(sys.argv[1].split(","))


class Hidden:
    """A meta-path finder that finds what the one it wraps finds, except the blocked packages."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


assert not BLOCKED & set(sys.modules)
sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
for name in BLOCKED:
    assert importlib.util.find_spec(name) is None
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise AssertionError(f"{name} could still be imported")

import torch
from peft import PeftModel, get_peft_model
from tiny_models import model_outputs, text_classification_batches, tiny_bert, train_steps

import peft_inflora
from peft_inflora import InfLoRAConfig

result = {"after_import": sorted(m for m in sys.modules if m.startswith("peft_inflora"))}
model = get_peft_model(tiny_bert(seed=0), InfLoRAConfig(r=4, target_modules=["query", "value"]))
for task in range(2):
    batches = text_classification_batches(seed=task, n_batches=3)
    with model.task(batches, progress=False):
        train_steps(model, batches)
    result[f"tasks_done_{task}"] = model.tasks_done()
batches = text_classification_batches(seed=5, n_batches=2)
expected = model_outputs(model, batches)
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(tiny_bert(seed=0), folder)
    result["reloaded_bit_identical"] = bool(torch.equal(model_outputs(loaded, batches), expected))
    result["reloaded_tasks_done"] = loaded.tasks_done()
with tempfile.TemporaryDirectory() as folder:
    model.to_lora(folder)
    lora = PeftModel.from_pretrained(tiny_bert(seed=0), folder)
    result["lora_type"] = type(lora.peft_config["default"]).__name__
    result["lora_max_error"] = float((model_outputs(lora, batches) - expected).abs().max())
result["blocked_loaded"] = sorted(BLOCKED & {m.partition(".")[0] for m in sys.modules})
result["peft_inflora_modules"] = sorted(m for m in sys.modules if m.startswith("peft_inflora"))
print("RESULT " + json.dumps(result))
'''


@pytest.fixture(scope="module")
def core_run() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(PACKAGE.parent),
                                                       os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", CORE_RUN, ",".join(BLOCKED)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _application_modules(names) -> list[str]:
    return [m for m in names if m.split(".")[1:2] and m.split(".")[1] in APPLICATION]


def test_the_method_runs_without_matplotlib_datasets_and_evaluate(core_run):
    assert core_run["tasks_done_0"] == 1 and core_run["tasks_done_1"] == 2
    assert core_run["reloaded_bit_identical"] and core_run["reloaded_tasks_done"] == 2
    assert core_run["lora_type"] == "LoraConfig" and core_run["lora_max_error"] < 1e-4
    assert core_run["blocked_loaded"] == []


def test_the_method_imports_no_application_module(core_run):
    assert "peft_inflora.model" in core_run["after_import"]  # the method is there ...
    assert _application_modules(core_run["after_import"]) == []  # ... and none of the application
    assert _application_modules(core_run["peft_inflora_modules"]) == []  # not even after the whole lifecycle


def _modules(package: Path):
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        yield (parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(path: Path, parts: tuple) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (lazy imports in functions included)."""
    found = set()
    tree = ast.parse(path.read_text())
    if not parts:  # the package's __init__: its PEP 562 __getattr__ is the one lazy door to the application
        tree.body = [node for node in tree.body
                     if not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1
                package = ["peft_inflora", *(parts if path.name == "__init__.py" else parts[:-1])]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_method_module_imports_the_application():
    checked = 0
    for parts, path in _modules(PACKAGE):
        if parts and parts[0] in APPLICATION:
            continue
        checked += 1
        bad = {name for name in _imports(path, parts) if name.split(".")[:1] == ["peft_inflora"]
               and len(name.split(".")) > 1 and name.split(".")[1] in APPLICATION}
        bad |= {name for name in _imports(path, parts) if name.split(".")[0] in BLOCKED}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
    assert checked >= 15  # config, layer, model, statistics, subspace/*, ...


def test_the_subspace_math_imports_no_peft_and_no_transformers():
    for parts, path in _modules(PACKAGE / "subspace"):
        names = _imports(path, ("subspace", *parts))
        bad = {n for n in names if n.split(".")[0] in ("peft", "transformers")}
        inside = {n for n in names if n.startswith("peft_inflora.")}
        allowed = ("peft_inflora.subspace", "peft_inflora.errors", "peft_inflora.distributed")
        bad |= {n for n in inside if not n.startswith(allowed)}
        assert not bad, f"subspace/{path.name} imports {sorted(bad)}"


# ---------------------------------------------------------------------------------------------- lazy names
def test_application_names_are_loaded_on_first_use_and_listed():
    from peft_inflora.continual import arguments, hub, result, trainer

    assert peft_inflora.ContinualTrainer is trainer.ContinualTrainer
    assert peft_inflora.ContinualTask is arguments.ContinualTask
    assert peft_inflora.ContinualResult is result.ContinualResult
    assert peft_inflora.HubPushError is hub.HubPushError
    assert set(peft_inflora.__all__) <= set(dir(peft_inflora))
    for name in peft_inflora.__all__:
        assert getattr(peft_inflora, name) is not None


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        peft_inflora.NoSuchThing  # noqa: B018
    assert not hasattr(peft_inflora, "NoSuchThing")
