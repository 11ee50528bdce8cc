"""PEFT conformance: PEFT's own common tuner tests, run on InfLoRA.

Two parts.

1. **PEFT's suite itself.** ``PeftCommonTester`` (``tests/testing_common.py``) and the test classes
   ``TestPeftCustomModel`` and ``TestMultipleActiveAdapters`` (``tests/test_custom_models.py``) and
   ``TestDecoderModels`` (``tests/test_decoder_models.py``) are imported from the PEFT source distribution and run,
   unchanged, over InfLoRA cases: their case lists (``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES``,
   ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, ``ALL_CONFIGS``, ``PEFT_DECODER_MODELS_TO_TEST``) are replaced in place by
   the ``INFLORA_*`` lists below, and their tests that are not parametrised over those lists (they hard-code LoRA,
   DoRA, prompt tuning, ...) are not collected.
   PEFT's tests are not in its wheel; fetch them once (PyPI only, nothing else)::

       python tests/test_peft_conformance.py --fetch        # -> .peft-tests/peft-<version>/tests (gitignored)

   or point ``PEFT_TESTS_DIR`` at an unpacked ``tests/`` folder of the installed PEFT version. Without them this part
   is skipped with that instruction as the reason.

2. **Re-implemented cases** (always run): the same checks written against InfLoRA directly, each naming the PEFT test
   it follows, plus what the custom-model suite does not reach (``print_trainable_parameters``,
   ``layers_to_transform``, ``rank_pattern``, ``get_peft_model_state_dict`` keys, a transformers model,
   ``torch.compile``) and the InfLoRA-specific lifecycle around them.

How the InfLoRA lifecycle maps onto PEFT's cases
------------------------------------------------
PEFT's tests assume that ``get_peft_model`` returns an adapter that can be trained (and, with ``init_weights=False``,
changes the outputs) right away. A fresh InfLoRA adapter has no task: ``A_t`` / ``B_t`` are empty (``d x 0``), the
model is the base model, and training raises ``NoTaskInProgressError`` until ``begin_task(batches)`` designs ``B_t``
from the task's inputs. So, for the upstream tests only (fixture ``inflora_lifecycle``), ``get_peft_model`` in the
upstream modules and ``PeftModel.add_adapter`` are wrapped so that every InfLoRA adapter a PEFT test creates has
**begun a task** on a few random batches of the test model's inputs: PEFT's "fresh adapter" is InfLoRA's "adapter in
the middle of a task". With ``init_weights=False`` (which PEFT's ``set_init_weights_false`` passes) ``A_t`` starts
random, so the adapter is not the identity, as those tests need. The cases in ``ONE_TASK_DONE`` (names saying
``1 task done``, and the second decoder config) first run a whole task (``begin_task``, random ``A_t`` standing in for
training, ``end_task``) so that the finished task is *folded* (into frozen ``inflora_past_A/B`` factors, or with
``fold="base"`` into the base weights) before the next task begins: every PEFT check (save/load, merge, disable,
unload, delete, dtype, training) then also covers folded state. Adapters PEFT loads (``from_pretrained``,
``load_adapter``) are not touched: their continual state, including the task in progress, comes from the checkpoint.
``inject_adapter_in_model`` has no tuner object to call ``begin_task`` on, so its shim installs a random orthonormal
``B_t`` per layer directly (what ``begin_task`` would do without data).

Not applicable to InfLoRA (skipped with the reason, see ``NOT_APPLICABLE`` / ``NOT_APPLICABLE_TO_CASES``, or
skipped by PEFT's own test for a method other than LoRA & co.):

* LoRA/BOFT ``bias`` (test_disable_adapter_with_bias_warns, test_adding_multiple_adapters_with_bias_raises): InfLoRA
  adapters have no bias;
* pickle checkpoints (test_save_pretrained_pickle, test_save_pretrained_selected_adapters_pickle): peft-inflora loads
  adapter weights from safetensors only;
* test_get_base_model_state_dict with ``fold="base"`` after a finished task: folding into the base weights is what
  ``fold="base"`` does (like a merged LoRA);
* test_disable_adapters / test_disable_adapters_with_merging after a finished task: their precondition "a new adapter
  is the identity" does not hold once a task is folded (disable == base model is still checked, see the reason);
* test_lora_conversion: it converts the adapter ``get_peft_model`` returned, which for InfLoRA is an adapter in the
  middle of a task (above), and PEFT's conversion refuses a task in progress for InfLoRA (``TaskLifecycleError``, as
  ``to_lora`` does); PEFT's ``convert_to_lora`` / ``save_as_lora`` on finished tasks are tested in
  ``tests/test_export_lora.py``;
* skipped by PEFT itself: test_mixed_adapter_batches / test_generate_with_mixed_adapter_batches (``adapter_names``
  mixed batches: LoRA/RoAd only), test_weighted_combination_of_adapters (LoRA/IA3), prompt-learning tests.

Not collected at all (they hard-code other methods or layers): embeddings, Conv2d/Conv3d, MultiheadAttention
(InfLoRA adapts ``nn.Linear`` and transformers' ``Conv1D`` only), DoRA, trainable tokens, ``add_weighted_adapter``,
MonteCLoRA / PVeRA / GraLoRA / GLoRA / IA3 specifics, LoRA layer replication and embed scale, prefix / prompt tuning.
Quantised layers and GPU-only tests are not part of these files. ``torch.compile`` (PEFT's test_torch_compile.py
needs a GPU and bitsandbytes) is re-implemented below, marked slow (about a minute on one CPU core).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

import peft_inflora
from peft_inflora import InfLoRAConfig, InfLoRALayer, NoTaskInProgressError


REPO = Path(__file__).resolve().parents[1]
UPSTREAM_PACKAGE = "peft_upstream_tests"


# =============================================================================================== PEFT's own suite
def upstream_tests_dir() -> Path:
    """Where PEFT's ``tests/`` folder of the installed version is expected."""
    import peft

    env = os.environ.get("PEFT_TESTS_DIR")
    if env:
        return Path(env)
    return REPO / ".peft-tests" / f"peft-{peft.__version__}" / "tests"


def fetch_upstream_tests() -> Path:
    """Download the sdist of the installed PEFT version from PyPI and unpack its ``tests/`` under ``.peft-tests/``."""
    import subprocess
    import tarfile
    import tempfile

    import peft

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"peft=={peft.__version__}", "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("peft-*.tar.gz")
        target = REPO / ".peft-tests"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
            tar.extractall(target, members=members, filter="data")
    return upstream_tests_dir()


def _load_upstream():
    """Import PEFT's ``test_custom_models`` (and ``testing_common``) as package ``peft_upstream_tests``, or return
    the reason why not."""
    folder = upstream_tests_dir()
    if not (folder / "test_custom_models.py").exists():
        return None, (f"PEFT's own test suite is not at {folder}: run `python tests/test_peft_conformance.py --fetch` "
                      "(downloads the PEFT sdist from PyPI) or set PEFT_TESTS_DIR")
    if UPSTREAM_PACKAGE in sys.modules:
        return sys.modules[f"{UPSTREAM_PACKAGE}.test_custom_models"], None
    package = types.ModuleType(UPSTREAM_PACKAGE)
    package.__path__ = [str(folder)]
    package.__spec__ = importlib.machinery.ModuleSpec(UPSTREAM_PACKAGE, None, is_package=True)
    sys.modules[UPSTREAM_PACKAGE] = package
    # testing_common imports diffusers' StableDiffusionPipeline at module level, only for isinstance checks. A stub is
    # put in sys.modules for that import only, and removed again so nothing else believes diffusers is installed.
    stub = None
    if importlib.util.find_spec("diffusers") is None:
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stub
    try:
        module = importlib.import_module(f"{UPSTREAM_PACKAGE}.test_custom_models")
        importlib.import_module(f"{UPSTREAM_PACKAGE}.test_decoder_models")
    except Exception as exc:  # an incompatible PEFT test suite must not break the rest of this file
        for name in [n for n in sys.modules if n == UPSTREAM_PACKAGE or n.startswith(UPSTREAM_PACKAGE + ".")]:
            del sys.modules[name]
        return None, f"PEFT's test suite at {folder} cannot be imported: {type(exc).__name__}: {exc}"
    finally:
        if stub is not None and sys.modules.get("diffusers") is stub:
            del sys.modules["diffusers"]
    return module, None


tcm, UPSTREAM_SKIP_REASON = _load_upstream()

# ---------------------------------------------------------------------------------------------------------- cases
# (name, model id of PEFT's MockTransformerWrapper, config class, config kwargs), like PEFT's TEST_CASES. MLP is
# lin0 (10 -> 20) and lin1 (20 -> 2), so r <= 2 on lin1; EmbConv1D's Conv1D maps 5 -> 1, so r = 1 there.
INFLORA_TEST_CASES = [
    ("Vanilla MLP 1 InfLoRA", "MLP", InfLoRAConfig, {"target_modules": "lin0", "r": 2}),
    ("Vanilla MLP 2 InfLoRA", "MLP", InfLoRAConfig, {"target_modules": ["lin0"], "r": 2}),
    ("Vanilla MLP 3 InfLoRA", "MLP", InfLoRAConfig, {"target_modules": ["lin1"], "r": 2}),
    ("Vanilla MLP 4 InfLoRA", "MLP", InfLoRAConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("Vanilla MLP 5 InfLoRA", "MLP", InfLoRAConfig,
     {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2}),
    ("Vanilla MLP 6 InfLoRA rank_pattern", "MLP", InfLoRAConfig,
     {"target_modules": ["lin0", "lin1"], "r": 2, "rank_pattern": {"lin0": 4}}),
    ("Vanilla MLP 7 InfLoRA random design", "MLP", InfLoRAConfig,
     {"target_modules": ["lin0", "lin1"], "r": 2, "design": "random"}),
    ("Vanilla MLP 8 InfLoRA 1 task done", "MLP", InfLoRAConfig,
     {"target_modules": ["lin0", "lin1"], "r": 2, "energy_threshold": 0.9}),
    ("Vanilla MLP 9 InfLoRA 1 task done fold=base", "MLP", InfLoRAConfig,
     {"target_modules": ["lin0", "lin1"], "r": 2, "energy_threshold": 0.9, "fold": "base"}),
    ("MLP_LayerNorm InfLoRA", "MLP_LayerNorm", InfLoRAConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("Embedding + transformers Conv1D InfLoRA", "EmbConv1D", InfLoRAConfig, {"target_modules": ["conv1d"], "r": 1}),
]

INFLORA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("InfLoRA Same", "inflora", InfLoRAConfig, {"target_modules": ["lin0"], "r": 2, "init_weights": False},
     {"target_modules": ["lin0"], "r": 2, "init_weights": False}),
    ("InfLoRA Different", "inflora", InfLoRAConfig, {"target_modules": ["lin0"], "r": 2, "init_weights": False},
     {"target_modules": ["lin1"], "r": 2, "init_weights": False}),
]

# (config class, config kwargs) like PEFT's test_decoder_models.ALL_CONFIGS, over the tiny decoders below.
# target_modules unset: the model-type default (Llama: q_proj, v_proj; GPT-2: the Conv1D c_attn).
INFLORA_DECODER_CONFIGS = [
    (InfLoRAConfig, {"task_type": "CAUSAL_LM", "r": 4}),
    (InfLoRAConfig, {"task_type": "CAUSAL_LM", "r": 4, "fold": "base", "energy_threshold": 0.9}),
]
# the model ids PEFT's decoder tests take from PEFT_DECODER_MODELS_TO_TEST, built offline by TinyDecoders: a tiny Llama
# and a tiny GPT-2. The ids avoid "llama" and "gpt2": PEFT skips its merge tests for ids containing "llama" (its
# check_beft_config tests isinstance() on a class, so it skips them for every method, not only BEFT) and its Conv1D
# tests for ids containing "gpt2" unless the method is LoRA & co.
INFLORA_DECODER_MODELS = ["tiny-decoder", "tiny-conv1d-decoder"]

# config kwargs (by identity) of the cases that finish one task before the one left in progress
ONE_TASK_DONE = [INFLORA_TEST_CASES[7][3], INFLORA_TEST_CASES[8][3], INFLORA_DECODER_CONFIGS[1][1]]

# PEFT test name -> why it does not apply to InfLoRA (these run and are skipped with the reason)
PICKLE = ("peft-inflora loads adapter weights only from safetensors (a pickle adapter_model.bin is refused, "
          "unpickling can run code); saving with safe_serialization=False is PEFT's")
NOT_APPLICABLE = {
    "test_lora_conversion": "PEFT's test converts the adapter in the middle of a task (the shims' 'fresh adapter'); "
                            "InfLoRA refuses to convert a task in progress (TaskLifecycleError, as to_lora does). "
                            "PEFT's conversion of finished tasks: tests/test_export_lora.py",
    "test_disable_adapter_with_bias_warns": "LoRA/BOFT `bias` option: InfLoRA adapters have no bias",
    "test_adding_multiple_adapters_with_bias_raises": "LoRA/BOFT `bias` option: InfLoRA adapters have no bias",
    "test_save_pretrained_pickle": PICKLE,
    "test_save_pretrained_selected_adapters_pickle": PICKLE,
}
# (PEFT test name, predicate on the case's config kwargs) -> why it does not apply to those cases
_AFTER_A_TASK = ("PEFT's precondition 'a new adapter gives the base model's outputs' does not hold once a task is "
                 "finished: the next task begins with A_t = 0 but the finished tasks stay in the model, while "
                 "disabling gives the base model (checked by test_disable_adapter on the decoders and by this file's "
                 "own cases)")
NOT_APPLICABLE_TO_CASES = {
    ("test_disable_adapters", "a finished task"): (lambda kwargs: _prior_tasks(kwargs) > 0, _AFTER_A_TASK),
    ("test_disable_adapters_with_merging", "a finished task"): (lambda kwargs: _prior_tasks(kwargs) > 0,
                                                                _AFTER_A_TASK),
    ("test_get_base_model_state_dict", "fold=base with a finished task"): (
        lambda kwargs: kwargs.get("fold") == "base" and _prior_tasks(kwargs) > 0,
        "fold='base' merges finished tasks into the base weights by design (like a merged LoRA), so the base "
        "model's state dict holds them",
    ),
}


def _prior_tasks(config_kwargs) -> int:
    return 1 if any(config_kwargs is kwargs for kwargs in ONE_TASK_DONE) else 0


class TinyDecoders:
    """Stands in for ``AutoModelForCausalLM`` in PEFT's decoder tests: tiny offline models by id (a saved folder, as
    the merge test reloads, goes to transformers)."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None, **kwargs):
        from tiny_models import tiny_gpt2, tiny_llama

        builders = {"tiny-decoder": tiny_llama, "tiny-conv1d-decoder": tiny_gpt2}
        if model_id in builders:
            model = builders[model_id](seed=0)
            model.config.name_or_path = model.name_or_path = model_id
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
        return model if dtype is None else model.to(dtype)


# --------------------------------------------------------------------------------------------------- the shims
class _Lifecycle:
    """State of the shims for the running test: how many tasks to finish before the one left in progress."""

    prior_tasks = 0
    loading = 0  # > 0 inside PeftModel.load_adapter: loaded adapters keep their checkpoint state


def _task_batches(base: nn.Module, n_batches: int = 3, batch_size: int = 16) -> list[dict] | None:
    """A few random input batches for one of PEFT's custom test models (None for models we have no inputs for)."""
    if tcm is not None and isinstance(base, tcm.ModelEmbConv1D):
        return [{"X": torch.randint(0, 100, (batch_size, 10))} for _ in range(n_batches)]
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    if vocab is not None:
        return [{"input_ids": torch.randint(3, vocab, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
                for _ in range(n_batches)]
    lin0 = getattr(base, "lin0", None)
    if lin0 is not None and hasattr(lin0, "in_features") and type(base).__name__ in ("MLP", "MLP2", "MLP_LayerNorm"):
        return [{"X": torch.randn(batch_size, lin0.in_features)} for _ in range(n_batches)]
    return None


@contextlib.contextmanager
def _forward_dtype(base: nn.Module):
    """PEFT's custom MLPs cast their input to a plain ``dtype`` attribute that the tests only update when they run a
    forward themselves; align it with the weights for the statistics pass."""
    old = base.__dict__.get("dtype")
    weights = [p for n, p in base.named_parameters() if "inflora_" not in n and p.is_floating_point()]
    if isinstance(old, torch.dtype) and weights:
        base.dtype = weights[0].dtype
    try:
        yield
    finally:
        if isinstance(old, torch.dtype):
            base.dtype = old


def _start_task(peft_model, adapter_name: str) -> None:
    """Give ``adapter_name`` a task in progress (after ``_Lifecycle.prior_tasks`` finished ones), as a user would
    before training."""
    base = peft_model.get_base_model()
    if _task_batches(base) is None or any(p.device.type == "meta" for p in base.parameters()):
        return
    with _forward_dtype(base):
        for _ in range(_Lifecycle.prior_tasks):
            batches = _task_batches(base)
            peft_model.begin_task(batches, adapter_name=adapter_name, progress=False)
            with torch.no_grad():  # stands in for training: the finished task must change the model
                for layer in peft_model.base_model.inflora_layers(adapter_name).values():
                    layer.inflora_A[adapter_name].normal_(0, 0.1)
            peft_model.end_task(batches, adapter_name=adapter_name, progress=False)
        peft_model.begin_task(_task_batches(base), adapter_name=adapter_name, progress=False)


def _shim_get_peft_model(real):
    def get_peft_model_with_task(model, peft_config, adapter_name="default", *args, **kwargs):
        peft_model = real(model, peft_config, adapter_name, *args, **kwargs)
        if isinstance(peft_config, InfLoRAConfig):
            _start_task(peft_model, adapter_name)
        return peft_model

    return get_peft_model_with_task


def _shim_add_adapter(real):
    def add_adapter_with_task(self, adapter_name, peft_config, *args, **kwargs):
        result = real(self, adapter_name, peft_config, *args, **kwargs)
        if isinstance(peft_config, InfLoRAConfig) and not _Lifecycle.loading and not peft_config.inference_mode:
            _start_task(self, adapter_name)
        return result

    return add_adapter_with_task


def _shim_load_adapter(real):
    def load_adapter(self, *args, **kwargs):
        _Lifecycle.loading += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            _Lifecycle.loading -= 1

    return load_adapter


def _shim_inject_adapter_in_model(real):
    def inject_adapter_in_model_with_design(peft_config, model, adapter_name="default", *args, **kwargs):
        model = real(peft_config, model, adapter_name, *args, **kwargs)
        if isinstance(peft_config, InfLoRAConfig):
            generator = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, (1,)).item())
            for module in model.modules():
                if isinstance(module, InfLoRALayer) and adapter_name in module.inflora_A:
                    if module.inflora_A[adapter_name].device.type == "meta":
                        continue
                    r = module.r[adapter_name]
                    rows = torch.linalg.qr(torch.randn(module.in_features, r, generator=generator))[0].T
                    module.set_design(adapter_name, rows * peft_config.design_scale,
                                      init_weights=peft_config.init_weights, generator=generator)
        return model

    return inject_adapter_in_model_with_design


def _upstream_mark_lists():
    """The upstream lists of (cases with) PEFT config classes that we replace by InfLoRA ones."""
    decoder = sys.modules[f"{UPSTREAM_PACKAGE}.test_decoder_models"]
    return [tcm.TEST_CASES, tcm.ALL_PEFT_CONFIG_CLASSES, tcm.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, decoder.ALL_CONFIGS]


def _runs_on_our_cases(function) -> bool:
    """True for PEFT tests parametrised over the case lists we replace; the others hard-code LoRA & co."""
    lists = _upstream_mark_lists()
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize" and len(mark.args) > 1 and any(mark.args[1] is lst for lst in lists):
            return True
    return False


def _hide_foreign_tests(namespace: dict, base: type) -> None:
    """Tests of ``base`` that are not parametrised over our cases test other PEFT methods: hide them."""
    for name in dir(base):
        if name.startswith("test") and not _runs_on_our_cases(getattr(base, name)):
            namespace[name] = None


@pytest.fixture
def inflora_lifecycle(request, monkeypatch):
    """Install the shims (see the module docstring) for one upstream test and apply ``NOT_APPLICABLE``."""
    name = request.node.originalname
    if name in NOT_APPLICABLE:
        pytest.skip(f"not applicable to InfLoRA: {NOT_APPLICABLE[name]}")
    params = getattr(request.node, "callspec", None)
    config_kwargs = params.params.get("config_kwargs") if params is not None else None
    for (test, cases), (applies, reason) in NOT_APPLICABLE_TO_CASES.items():
        if name == test and config_kwargs is not None and applies(config_kwargs):
            pytest.skip(f"not applicable to InfLoRA ({cases}): {reason}")
    monkeypatch.setattr(_Lifecycle, "prior_tasks", _prior_tasks(config_kwargs))
    upstream = [sys.modules[f"{UPSTREAM_PACKAGE}.{name}"]
                for name in ("test_custom_models", "testing_common", "test_decoder_models")]
    for module in upstream:
        monkeypatch.setattr(module, "get_peft_model", _shim_get_peft_model(get_peft_model))
        if hasattr(module, "inject_adapter_in_model"):
            monkeypatch.setattr(module, "inject_adapter_in_model",
                                _shim_inject_adapter_in_model(module.inject_adapter_in_model))
    monkeypatch.setattr(PeftModel, "add_adapter", _shim_add_adapter(PeftModel.add_adapter))
    monkeypatch.setattr(PeftModel, "load_adapter", _shim_load_adapter(PeftModel.load_adapter))
    yield


if tcm is None:

    def test_peft_upstream_suite():
        pytest.skip(UPSTREAM_SKIP_REASON)

else:
    tcm.TEST_CASES[:] = INFLORA_TEST_CASES
    tcm.ALL_PEFT_CONFIG_CLASSES[:] = [InfLoRAConfig]
    tcm.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = INFLORA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES
    _decoder = sys.modules[f"{UPSTREAM_PACKAGE}.test_decoder_models"]
    _decoder.ALL_CONFIGS[:] = INFLORA_DECODER_CONFIGS
    _decoder.PEFT_DECODER_MODELS_TO_TEST[:] = INFLORA_DECODER_MODELS

    def _upstream_class(base: type, name: str, **attributes) -> type:
        namespace = {"__doc__": f"PEFT's {base.__name__}, run on InfLoRA cases (see the module docstring).",
                     **attributes}
        _hide_foreign_tests(namespace, base)
        cls = types.new_class(name, (base,), {}, lambda ns: ns.update(namespace))
        cls.__module__ = __name__
        return pytest.mark.usefixtures("inflora_lifecycle")(cls)

    TestUpstreamPeftCustomModel = _upstream_class(tcm.TestPeftCustomModel, "TestUpstreamPeftCustomModel")
    TestUpstreamMultipleActiveAdapters = _upstream_class(tcm.TestMultipleActiveAdapters,
                                                         "TestUpstreamMultipleActiveAdapters")
    TestUpstreamDecoderModels = _upstream_class(_decoder.TestDecoderModels, "TestUpstreamDecoderModels",
                                                transformers_class=TinyDecoders)



# =============================================================================================== re-implemented cases
# The PEFT checks written against InfLoRA directly (each names the PEFT test it follows), on a small MLP with a
# ModuleList (for layers_to_transform) and a head (for modules_to_save), plus a tiny Llama for the transformers paths.
# They run whether or not PEFT's own suite is available.
D = 16
N_CLASSES = 3
TARGETS = ["lin0", "lin1"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(D, D)
        self.lin1 = nn.Linear(D, D)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X + self.lin1(torch.tanh(self.lin0(X)))


class Net(nn.Module):
    """``layers`` (3 blocks of lin0 / lin1, 16 -> 16) then ``head`` (16 -> 3); a loss when labels are given."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(D, N_CLASSES)

    def forward(self, X: torch.Tensor, labels: torch.Tensor | None = None):
        for block in self.layers:
            X = block(X)
        logits = self.head(X)
        return logits if labels is None else nn.functional.cross_entropy(logits, labels)


def base_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def make_model(seed: int = 0, adapter_name: str = "default", autocast_adapter_dtype: bool = True,
               dtype: torch.dtype | None = None, **config_kwargs):
    kwargs = {"r": 2, "target_modules": list(TARGETS)}
    kwargs.update(config_kwargs)
    net = base_net(seed)
    if dtype is not None:
        net = net.to(dtype)
    return get_peft_model(net, InfLoRAConfig(**kwargs), adapter_name=adapter_name,
                          autocast_adapter_dtype=autocast_adapter_dtype)


def task_batches(seed: int, n_batches: int = 3, batch_size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"X": torch.randn(batch_size, D, generator=g),
             "labels": torch.randint(0, N_CLASSES, (batch_size,), generator=g)} for _ in range(n_batches)]


PROBE = task_batches(999, n_batches=1)[0]["X"]


def logits(model, X: torch.Tensor = PROBE) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(X.to(next(p for p in model.parameters() if p.is_floating_point()).dtype))
    model.train(was_training)
    return out.float()


def train(model, batches: list[dict], steps: int = 4, lr: float = 5e-2) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def run_task(model, seed: int, adapter_name: str | None = None, finish: bool = True) -> None:
    """One InfLoRA task: begin_task, a few training steps, end_task (unless ``finish`` is False)."""
    batches = task_batches(seed)
    model.begin_task(batches, adapter_name=adapter_name, progress=False)
    train(model, batches)
    if finish:
        model.end_task(batches, adapter_name=adapter_name, progress=False)


def trained_model(fold: str = "adapter", finished: int = 1, in_progress: bool = True, **config_kwargs):
    """``finished`` folded tasks, then (``in_progress``) a task begun and trained but not ended."""
    model = make_model(fold=fold, energy_threshold=0.9, **config_kwargs)
    for task in range(finished):
        run_task(model, seed=task)
    if in_progress:
        run_task(model, seed=finished, finish=False)
    return model


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def a_names(model, adapter_name: str = "default") -> set[str]:
    return {f"base_model.model.{n}.inflora_A.{adapter_name}"
            for n in model.base_model.inflora_layers(adapter_name)}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


STATES = {  # (fold, finished tasks, task in progress)
    "task in progress": ("adapter", 0, True),
    "1 task done + 1 in progress": ("adapter", 1, True),
    "1 task done fold=base + 1 in progress": ("base", 1, True),
    "2 tasks done fold=base": ("base", 2, False),
}


# ----------------------------------------------------------------------------------------------- lifecycle
def test_fresh_adapter_is_the_base_model_and_training_needs_begin_task():
    """PEFT's test_training_custom_models / test_disable_adapters assume a trainable adapter right after
    get_peft_model; for InfLoRA that is an adapter with a task begun."""
    model = make_model()
    assert torch.equal(logits(model), logits(base_net()))
    assert trainable_names(model) == a_names(model)  # the empty A (d x 0): nothing to train yet
    assert model.get_nb_trainable_parameters()[0] == 0
    model.train()
    with pytest.raises(NoTaskInProgressError, match="begin_task"):
        model(**task_batches(0)[0])
    model.eval()
    model(PROBE)  # inference works without a task
    model.begin_task(task_batches(0), progress=False)
    model.train()
    model(**task_batches(0)[0]).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == a_names(model)


@pytest.mark.parametrize("modules_to_save", [None, ["head"]])
def test_training_changes_only_the_current_A_and_modules_to_save(modules_to_save):
    """PEFT: test_only_params_are_updated, _test_training (grads exactly on the trainable adapter tensors)."""
    model = make_model(modules_to_save=modules_to_save, energy_threshold=0.9)
    run_task(model, seed=0)  # a finished task: its factors are frozen buffers from now on
    model.begin_task(task_batches(1), progress=False)
    expected = a_names(model)
    if modules_to_save:
        expected |= {"base_model.model.head.modules_to_save.default.weight",
                     "base_model.model.head.modules_to_save.default.bias"}
    assert trainable_names(model) == expected
    before, out_before = state(model), logits(model)
    train(model, task_batches(1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected
    assert not torch.allclose(logits(model), out_before, atol=1e-4)
    # after end_task the branch is folded: nothing of the finished task trains any more
    model.end_task(task_batches(1), progress=False)
    head = model.base_model.model.head
    expected_count = sum(p.numel() for p in head.modules_to_save["default"].parameters()) if modules_to_save else 0
    assert model.get_nb_trainable_parameters()[0] == expected_count


# ----------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("case", list(STATES))
def test_save_load_roundtrip_with_and_without_is_trainable(case, tmp_path):
    """PEFT: test_save_pretrained, test_save_load_roundtrip, test_parameters_after_loading_model,
    test_from_pretrained_config_construction (is_trainable=False -> inference_mode)."""
    fold, finished, in_progress = STATES[case]
    model = trained_model(fold, finished, in_progress, modules_to_save=["head"])
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter_model.bin").exists()

    frozen = PeftModel.from_pretrained(base_net(), tmp_path)
    assert frozen.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(logits(frozen), expected)
    saved, loaded = model.state_dict(), frozen.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert frozen.tasks_done() == finished and frozen.task_in_progress() == in_progress

    trainable = PeftModel.from_pretrained(base_net(), tmp_path, is_trainable=True)
    assert not trainable.peft_config["default"].inference_mode
    heads = {f"base_model.model.head.modules_to_save.default.{p}" for p in ("weight", "bias")}
    assert trainable_names(trainable) == a_names(trainable) | heads
    assert torch.equal(logits(trainable), expected)
    if in_progress:  # the task goes on where it stopped
        train(trainable, task_batches(finished))
        trainable.end_task(task_batches(finished), progress=False)
    else:
        run_task(trainable, seed=finished)
    assert trainable.tasks_done() == finished + 1


def test_save_with_safe_serialization_false_writes_a_pickle_that_loading_refuses(tmp_path):
    """PEFT: test_save_pretrained_pickle. Saving is PEFT's; peft-inflora loads safetensors only."""
    model = trained_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="safetensors"):
        PeftModel.from_pretrained(base_net(), tmp_path)


def test_save_selected_adapters_and_load_adapter(tmp_path):
    """PEFT: _test_save_pretrained_selected_adapters, _test_load_multiple_adapters,
    test_save_pretrained_adapter_name_substring."""
    model = trained_model()
    n_keys = len(get_peft_model_state_dict(model))
    model.add_adapter("default2", InfLoRAConfig(r=2, target_modules=["lin0"]))
    model.set_adapter("default2")
    run_task(model, seed=5, finish=False)
    model.set_adapter("default")
    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "default2" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(base_net(), tmp_path / "all")
    result = loaded.load_adapter(tmp_path / "all" / "default2", adapter_name="default2")
    assert result.missing_keys == []
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    loaded.set_adapter("default2")
    model.set_adapter("default2")
    assert torch.equal(logits(loaded), logits(model))

    model.save_pretrained(tmp_path / "one", selected_adapters=["default"])
    from safetensors.torch import load_file

    assert len(load_file(tmp_path / "one" / "adapter_model.safetensors")) == n_keys
    only = PeftModel.from_pretrained(base_net(), tmp_path / "one")
    assert set(only.peft_config) == {"default"}


def test_get_peft_model_state_dict_keys():
    """PEFT: the saved keys are the adapter's tensors (all continual state, prefixed ``inflora_``) and
    modules_to_save, under ``base_model.model.``, without the adapter name and without base weights."""
    model = trained_model(modules_to_save=["head"])
    model.add_adapter("other", InfLoRAConfig(r=2, target_modules=["lin0"]))
    keys = set(get_peft_model_state_dict(model))
    layers = [f"layers.{i}.{n}" for i in range(3) for n in TARGETS]
    attrs = ["inflora_A", "inflora_B", "inflora_past_A", "inflora_past_B", "inflora_memory", "inflora_memory_form",
             "inflora_task_ranks", "inflora_energy_thresholds"]
    assert keys == {f"base_model.model.{layer}.{attr}" for layer in layers for attr in attrs} | {
        "base_model.model.head.weight", "base_model.model.head.bias"}
    other = set(get_peft_model_state_dict(model, adapter_name="other"))
    assert other == {f"base_model.model.layers.{i}.lin0.{attr}" for i in range(3) for attr in attrs}


# ----------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("case", list(STATES))
def test_merge_unmerge_merge_and_unload(case):
    """PEFT: test_merge_layers, test_merge_layers_is_idempotent, test_safe_merge,
    test_disable_adapters_with_merging, _test_unload_adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    fold, finished, in_progress = STATES[case]
    model = trained_model(fold, finished, in_progress)
    adapted, base = logits(model), logits(base_net())
    assert not torch.allclose(adapted, base, atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
    model.merge_adapter()  # disable_adapter unmerged it
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    for safe_merge in (False, True):
        merged = copy.deepcopy(model).merge_and_unload(safe_merge=safe_merge)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)
    unloaded = copy.deepcopy(model).unload()  # PEFT: _test_unload_adapter
    torch.testing.assert_close(logits(unloaded), base, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing():
    """PEFT: _test_merge_layers_nan."""
    model = trained_model()
    with torch.no_grad():
        model.base_model.model.layers[0].lin0.inflora_A["default"][0] = float("nan")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be"):
        model.merge_and_unload(safe_merge=True)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------- disable
@pytest.mark.parametrize("case", list(STATES))
def test_disable_adapter_gives_the_base_model(case):
    """PEFT: test_disable_adapters, test_disable_adapter_is_reentrant,
    test_disable_adapters_exiting_context_restores_previous_state."""
    fold, finished, in_progress = STATES[case]
    model = trained_model(fold, finished, in_progress)
    adapted, base = logits(model), logits(base_net())
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=1e-6)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=1e-6)
    assert torch.equal(logits(model), adapted)


# ----------------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("fold", ["adapter", "base"])
def test_add_set_delete_adapter(fold):
    """PEFT: test_active_adapter, test_delete_adapter, test_delete_inactive_adapter,
    test_delete_adapter_with_multiple_adapters_works, test_set_requires_grad, test_merge_layers_multi."""
    model = trained_model(fold)
    out_default, base = logits(model), logits(base_net())
    model.add_adapter("other", InfLoRAConfig(r=2, target_modules=TARGETS, fold=fold, energy_threshold=0.9))
    assert model.active_adapters == ["default"]
    assert trainable_names(model) == a_names(model)  # the added adapter is frozen until it is set active
    assert torch.equal(logits(model), out_default)
    model.set_adapter("other")
    for seed in (10, 11):  # a finished task (folded, with fold="base" into the shared weights) and one in progress
        run_task(model, seed=seed, finish=seed == 10)
    assert trainable_names(model) == a_names(model, "other")
    out_other = logits(model)
    assert not torch.allclose(out_other, out_default, atol=1e-4)
    # each adapter sees only its own tasks, also where fold="base" put both adapters' finished tasks into one W
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), out_default, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), out_default, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for names, expected in ((["default"], out_default), (["other"], out_other)):
        merged = copy.deepcopy(model).merge_and_unload(adapter_names=names)
        torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    # delete the active adapter: no per-adapter state is left behind
    model.set_adapter("other")
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and set(model.peft_config) == {"default"}
    for layer in model.base_model.inflora_layers().values():
        for attr in layer.adapter_layer_names + layer.other_param_names:
            assert "other" not in getattr(layer, attr), attr
    torch.testing.assert_close(logits(model), out_default, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Adapter unknown does not exist"):
        model.delete_adapter("unknown")
    model.delete_adapter("default")
    assert model.active_adapters == []
    with torch.no_grad():
        torch.testing.assert_close(model.base_model(PROBE), base, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_adapter_dtype_autocast_and_half_precision_forward(dtype, autocast_adapter_dtype, tmp_path):
    """PEFT: test_adapter_dtype_autocast, test_forward_float16 / _bfloat16 (+ _no_autocast), test_merge_layers_fp16.
    The design ``B_t`` and the memory stay float32 (they define the protected subspace); ``A_t`` follows PEFT."""
    model = make_model(dtype=dtype, autocast_adapter_dtype=autocast_adapter_dtype, energy_threshold=0.9)
    batches = [{"X": b["X"].to(dtype)} for b in task_batches(0)]
    model.begin_task(batches, progress=False)
    expected = torch.float32 if autocast_adapter_dtype else dtype
    adapter_params = [p for n, p in model.named_parameters() if "inflora_" in n]
    assert adapter_params and all(p.dtype == expected for p in adapter_params)
    layer0 = model.base_model.model.layers[0].lin0
    assert layer0.inflora_B["default"].dtype == torch.float32
    assert layer0.inflora_memory["default"].dtype == torch.float32
    out = model(PROBE.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    model.end_task(batches, progress=False)
    model.begin_task(batches, progress=False)
    for safe_merge in (False, True):
        model.merge_adapter(safe_merge=safe_merge)
        assert torch.isfinite(model(PROBE.to(dtype))).all()
        model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_net().to(dtype), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype)
    assert all(p.dtype == expected for n, p in loaded.named_parameters() if "inflora_" in n)
    assert torch.equal(logits(loaded), logits(model))
    assert torch.isfinite(model.merge_and_unload()(PROBE.to(dtype))).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_to_half_precision_after_training(dtype):
    """PEFT: test_forward_bfloat16 (the user casts the whole PeftModel)."""
    model = trained_model()
    reference = logits(model)
    model = model.to(dtype)
    out = logits(model)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------------------------- model surface
def test_print_trainable_parameters_and_get_nb_trainable_parameters(capsys):
    """PEFT: print_trainable_parameters / get_nb_trainable_parameters count A_t of the task in progress and the
    modules_to_save copy; the design, memory and finished tasks are buffers, not parameters."""
    model = make_model(modules_to_save=["head"], rank_pattern={"layers.0.lin0": 4})
    head = D * N_CLASSES + N_CLASSES
    base_params = sum(p.numel() for p in base_net().parameters())
    assert model.get_nb_trainable_parameters() == (head, base_params + head)
    model.begin_task(task_batches(0), progress=False)
    a_params = D * (2 * 5 + 4)  # 6 layers, d_out = 16, r = 2 (rank 4 on layers.0.lin0)
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total) == (a_params + head, base_params + head + a_params)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
    model.end_task(task_batches(0), progress=False)
    assert model.get_nb_trainable_parameters()[0] == head


def test_named_modules_contain_the_tuner_layers():
    """PEFT: test_in_features_out_features_exposed, test_attributes_parametrized, test_adapter_name."""
    model = make_model(adapter_name="test-adapter")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, InfLoRALayer)}
    assert set(layers) == {f"base_model.model.layers.{i}.{t}" for i in range(3) for t in TARGETS}
    for layer in layers.values():
        assert isinstance(layer, peft_inflora.Linear) and repr(layer).startswith("inflora.")
        assert (layer.in_features, layer.out_features) == (D, D)
        assert "test-adapter" in layer.inflora_A and layer.active_adapters == ["test-adapter"]
    assert any("test-adapter" in n for n, _ in model.named_parameters())
    for attr in ("save_pretrained", "from_pretrained", "push_to_hub", "begin_task", "end_task"):
        assert hasattr(model, attr)


def test_modules_to_save():
    """PEFT: modules_to_save cases of test_custom_models ("Vanilla MLP 5"): the head is trained as a copy, saved,
    and left out when the adapter is disabled."""
    from peft.utils import ModulesToSaveWrapper

    model = make_model(modules_to_save=["head"], target_modules=["lin0"])
    assert isinstance(model.base_model.model.head, ModulesToSaveWrapper)
    run_task(model, seed=0, finish=False)
    original = model.base_model.model.head.original_module.weight.detach().clone()
    assert torch.equal(original, base_net().head.weight)
    assert not torch.equal(model.base_model.model.head.modules_to_save["default"].weight, original)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(base_net()), atol=1e-6, rtol=1e-6)


def test_layers_to_transform(tmp_path):
    """PEFT: _test_training_layer_indexing (only the chosen layers are adapted and get gradients; save / load).
    Without ``layers_pattern`` PEFT finds the layer list only below a parent module (``model.layers.1``): see the
    tiny-Llama test."""
    model = make_model(layers_to_transform=[1], layers_pattern="layers")
    assert set(model.base_model.inflora_layers()) == {"layers.1.lin0", "layers.1.lin1"}
    run_task(model, seed=0, finish=False)
    model.train()
    model(**task_batches(0)[0]).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == a_names(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_net(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_rank_pattern(tmp_path):
    """PEFT: rank_pattern (LoRA's test_custom_models cases with rank_pattern): per-module ranks, kept on save and
    load."""
    model = make_model(r=2, rank_pattern={"layers.0.lin0": 4, r"^layers\.2\..*": 3})
    ranks = model.begin_task(task_batches(0), progress=False)
    assert ranks == {"layers.0.lin0": 4, "layers.0.lin1": 2, "layers.1.lin0": 2, "layers.1.lin1": 2,
                     "layers.2.lin0": 3, "layers.2.lin1": 3}
    for name, layer in model.base_model.inflora_layers().items():
        assert layer.inflora_A["default"].shape == (D, ranks[name])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_net(), tmp_path)
    assert loaded.peft_config["default"].rank_pattern == {"layers.0.lin0": 4, r"^layers\.2\..*": 3}
    loaded.abort_task()
    assert loaded.begin_task(task_batches(0), progress=False) == ranks


def test_direct_injection_and_set_peft_model_state_dict():
    """PEFT: test_save_load_roundtrip_direct_injection (inject_adapter_in_model / set_peft_model_state_dict): the
    continual state (shapes grow with the tasks) loads into a freshly injected model."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    model = trained_model()
    state_dict = get_peft_model_state_dict(model)
    injected = inject_adapter_in_model(InfLoRAConfig(r=2, target_modules=TARGETS, energy_threshold=0.9), base_net())
    result = set_peft_model_state_dict(injected, state_dict)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(injected), logits(model), atol=1e-6, rtol=1e-6)


def test_transformers_model_default_targets_generate_and_gradient_checkpointing():
    """PEFT's decoder tests on a tiny Llama: default target modules, generate, gradient checkpointing
    (test_generate, test_training_decoders_gradient_checkpointing)."""
    from tiny_models import causal_lm_batches, tiny_llama

    model = get_peft_model(tiny_llama(), InfLoRAConfig(r=4, task_type="CAUSAL_LM"))
    assert {n.rsplit(".", 1)[-1] for n in model.base_model.inflora_layers()} == {"q_proj", "v_proj"}
    batches = causal_lm_batches(seed=0)
    model.begin_task(batches, progress=False)
    model.generate(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"], max_new_tokens=3)

    def grads():
        model.zero_grad()
        model.train()
        model(**batches[0]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert set(plain) == a_names(model)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)

    # layers_to_transform without layers_pattern (PEFT: _test_training_layer_indexing)
    second = get_peft_model(tiny_llama(), InfLoRAConfig(r=4, task_type="CAUSAL_LM", layers_to_transform=[1]))
    assert set(second.base_model.inflora_layers()) == {"model.layers.1.self_attn.q_proj",
                                                       "model.layers.1.self_attn.v_proj"}


@pytest.mark.slow
def test_torch_compile_forward_and_training():
    """PEFT: test_torch_compile.py (test_causal_lm_training_pytorch_compile, test_causal_lm_disable_lora_adapter_
    compile): a compiled model trains the task's A_t and gives the eager model's outputs; slow (compilation)."""
    model = trained_model(finished=1, in_progress=False)
    model.begin_task(task_batches(1), progress=False)
    compiled = torch.compile(model)
    batches = task_batches(1)
    eager = copy.deepcopy(model)
    torch.testing.assert_close(logits(compiled), logits(eager), atol=1e-5, rtol=1e-5)
    train(compiled, batches, steps=3)
    train(eager, batches, steps=3)
    torch.testing.assert_close(logits(compiled), logits(eager), atol=1e-4, rtol=1e-4)
    with compiled.disable_adapter():
        torch.testing.assert_close(logits(compiled), logits(base_net()), atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    if "--fetch" in sys.argv[1:]:
        print(f"PEFT's tests are in {fetch_upstream_tests()}")
    else:
        print(__doc__)
