"""Shared pytest setup: offline Hugging Face libraries, ``--runslow``, and a seeded torch for every test."""

import os


# Set before any test module imports huggingface_hub / transformers / datasets: they read these at import time.
# Tests must never reach a hub; models and data are built in the test or shipped by a package.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


SEED = 0


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow (skipped by default)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def torch_seed():
    """Seed torch (and ``random``, and numpy if installed) before each test; returns the seed."""
    random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        import numpy
    except ImportError:  # numpy is a dependency of the application, not of the method
        pass
    else:
        numpy.random.seed(SEED)
    return SEED


@pytest.fixture
def isolated_peft_registry(monkeypatch):
    """PEFT's method registry, swapped for copies without InfLoRA for the duration of one test.

    ``peft.mapping`` holds the dicts that ``register_peft_method`` fills; the copies receive whatever a test registers
    and are thrown away afterwards, so the real registration (done by ``import peft_inflora``) is left untouched.
    Returns a dict of the copies by short name: config, tuner, mixed, prefix.
    """
    import peft.mapping

    names = {
        "config": "PEFT_TYPE_TO_CONFIG_MAPPING",
        "tuner": "PEFT_TYPE_TO_TUNER_MAPPING",
        "mixed": "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
        "prefix": "PEFT_TYPE_TO_PREFIX_MAPPING",
    }
    copies = {}
    for short, attr in names.items():
        copy = {key: value for key, value in getattr(peft.mapping, attr).items() if key != "INFLORA"}
        monkeypatch.setattr(peft.mapping, attr, copy)
        copies[short] = copy
    return copies
