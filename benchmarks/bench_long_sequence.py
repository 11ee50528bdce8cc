"""A long sequence (20 tasks): how InfLoRA behaves as the memory fills the input space (GitHub issues 6 and 8).

Permuted digits: task k shows scikit-learn's 8x8 digits with the pixels shuffled by a fixed permutation of its own
(seeded), 10 classes per task, task-incremental evaluation (each task's own 10 head rows; the classic "permuted
MNIST" protocol on the digits that ship offline). The backbone is the tiny ViT of examples/continual_vision_vit.py
(width 64, 4 layers), pretrained there on unpermuted digits 0-3; InfLoRA adapts ``k_proj``, ``v_proj`` and ``fc1``
(all with d_in = 64), so 20 tasks at rank r fill a large part of each layer's input space.

Methods, all with the ContinualTrainer, the same budget and seed:

* InfLoRA, fixed schedule (the paper's: ``eps_t = lambda + (1 - lambda) t / T``);
* InfLoRA, ``adaptive_threshold=True`` (the same schedule, each layer's memory capped at ``d_in - r (T - t - 1)``
  dimensions after task t, so every task finds r free directions);
* sequential LoRA (PEFT LoRA, same rank, trained task after task);
* PEFT's OSF run sequentially (as in bench_quality.py: merged and re-decomposed after each task, preserved rank
  rising from 0.5 to 0.9 of the layer);
* heads only (frozen backbone, each task's head rows trained): the lower reference. (Joint training is left out: the
  task-incremental protocol evaluates each task with its own 10 head rows, which one joint task does not have.)

Reports A_T, A_avg, BWT, forgetting, the accuracy of the last five tasks after the sequence (how well late tasks were
learned) and, per task, the smallest free dimension over the adapted layers and the rank the task got.

    python benchmarks/bench_long_sequence.py                    # 20 tasks, about 10 minutes on one core
    python benchmarks/bench_long_sequence.py --tasks 30 --r 2
    python benchmarks/bench_long_sequence.py --quick            # smoke run: 3 tasks, a few steps
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _plots  # noqa: E402


METHODS = ["InfLoRA fixed", "InfLoRA adaptive", "sequential LoRA", "OSF", "heads only"]
TARGETS = ["k_proj", "v_proj", "fc1"]


def vision_example():
    """examples/continual_vision_vit.py (digits split, collator, tiny ViT pretraining), imported as a module
    (_common puts examples/ on sys.path)."""
    import continual_vision_vit

    return continual_vision_vit


def permuted_tasks(n_tasks: int, seed: int, limit=None):
    """``n_tasks`` ContinualTasks of permuted digits (10 classes each); task k's permutation is seeded by k."""
    import datasets

    from peft_inflora import ContinualTask

    V = vision_example()
    train, test = V.digits_split(seed)
    tasks = []
    for k in range(n_tasks):
        perm = np.random.default_rng(1000 + k).permutation(64)

        def build(split: dict) -> datasets.Dataset:
            rows = range(len(split["digit"]))
            if limit is not None:
                rows = list(rows)[:: max(1, len(split["digit"]) // limit)][:limit]
            return datasets.Dataset.from_dict({"image": [list(np.asarray(split["image"][i])[perm]) for i in rows],
                                               "labels": [split["digit"][i] for i in rows]})

        tasks.append(ContinualTask(f"perm{k:02d}", build(train), build(test), label_names=[str(d) for d in range(10)]))
    return tasks


def run(method: str, args, source: str, tasks, workdir: str):
    from peft import LoraConfig, get_peft_model

    from peft_inflora import ContinualTrainer, ContinualTrainingArguments, InfLoRAConfig

    V = vision_example()
    torch.manual_seed(args.seed)
    model = V.load_backbone(source, num_labels=10)
    callbacks = []
    if method.startswith("InfLoRA"):
        config = InfLoRAConfig(r=args.r, target_modules=TARGETS, modules_to_save=["classifier"],
                               energy_threshold=args.energy_threshold, total_tasks=len(tasks),
                               adaptive_threshold="adaptive" in method)
    elif method == "OSF":  # PEFT's OSF, run sequentially as in bench_quality.py
        from bench_quality import OSFContinual
        from peft import OSFConfig

        config = OSFConfig(target_modules=TARGETS, modules_to_save=["classifier"], effective_rank=0.5)
        callbacks = [OSFContinual(config, len(tasks))]
    else:
        config = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=TARGETS, modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    if method == "heads only":  # the frozen backbone: only the classifier trains
        C.freeze_lora(model)
    training = ContinualTrainingArguments(
        setting="task_incremental", output_dir=workdir, num_train_epochs=args.epochs,
        max_steps=3 if args.quick else -1,
        per_device_train_batch_size=32, per_device_eval_batch_size=256, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, save_strategy="no", report_to="none",
        logging_strategy="no", remove_unused_columns=False, seed=args.seed, disable_tqdm=True)
    trainer = ContinualTrainer(model=model, args=training, data_collator=V.DigitsCollator(), callbacks=callbacks)
    t0 = time.perf_counter()
    ranks = []
    if method.startswith("InfLoRA"):  # record the rank each task got (the smallest over the adapted layers)
        original = model.base_model.begin_task

        def begin_task(*a, **k):
            got = original(*a, **k)
            ranks.append(min(got.values()))
            return got

        model.base_model.begin_task = begin_task
    stopped = None
    try:
        result = trainer.train_continual(tasks)
    except ValueError as error:  # SubspaceExhaustedError: a layer has no free direction left
        stopped = f"{type(error).__name__} at task {len(trainer.continual_result.accuracy_matrix) + 1}: {error}"
        result = trainer.continual_result
    seconds = time.perf_counter() - t0
    capacity = [min(free for _, free, _ in after.values()) for after in result.extra.get("capacity", [])]
    last = result.accuracy_matrix[-1] if result.accuracy_matrix else []
    return {"method": method, "result": result.to_dict(), "metrics": result.metrics() if last else {},
            "tasks_learned": len(result.accuracy_matrix), "seconds": seconds, "stopped": stopped,
            "min_free_dimension_after_task": capacity, "rank_given": ranks,
            "last5_final_accuracy": float(np.mean(last[-5:])) if len(last) >= 5 else None}


def markdown(runs: list[dict], args) -> str:
    env = C.environment(args)
    quick = " --quick" if args.quick else ""
    lines = [f"## Long sequence: {args.tasks} permuted-digit tasks (bench_long_sequence.py{quick})",
             "", f"torch {env['torch']}, peft {env['peft']}; tiny ViT (d_in = 64) pretrained on digits 0-3, InfLoRA / "
             f"LoRA on {', '.join(TARGETS)}, r = {args.r}, lambda = {args.energy_threshold} (schedule to 1 over T), "
             f"{args.epochs} epochs per task, lr {args.lr}, seed {args.seed}, task-incremental.", "",
             "| method | tasks learned | A_T | A_avg | BWT | forgetting | last 5 tasks (final) | time s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        pct = lambda key: f"{100 * m[key]:.2f}" if key in m else "-"  # noqa: E731
        last5 = f"{100 * r['last5_final_accuracy']:.2f}" if r["last5_final_accuracy"] is not None else "-"
        lines.append(f"| {r['method']} | {r['tasks_learned']} | {pct('final_accuracy')} | "
                     f"{pct('average_incremental_accuracy')} | {pct('backward_transfer')} | {pct('forgetting')} | "
                     f"{last5} | {r['seconds']:.0f} |")
    lines += ["", "Per task (InfLoRA): smallest free dimension over the adapted layers after the task / rank given to "
              "the task.", "", "| method | " + " | ".join(str(k + 1) for k in range(args.tasks)) + " |",
              "|---|" + "---|" * args.tasks]
    for r in runs:
        if r["min_free_dimension_after_task"]:
            cells = [f"{f}/{g}" for f, g in zip(r["min_free_dimension_after_task"], r["rank_given"])]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for r in runs:
        if r["stopped"]:
            lines += ["", f"* {r['method']} stopped: {r['stopped'].splitlines()[0][:300]}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--energy_threshold", type=float, default=0.95)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    C.setup(args)
    if args.quick:
        args.tasks = 3
    V = vision_example()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pre = V.ExampleArguments(fast=args.quick)
        train, test = V.digits_split(args.seed)
        source = V.pretrain_tiny_vit(pre, train, test, tmp, args.seed)
        tasks = permuted_tasks(args.tasks, args.seed, limit=32 if args.quick else None)
        for method in methods:
            row = run(method, args, source, tasks, str(Path(tmp) / method.replace(" ", "_")))
            print(f"{method}: {row['metrics']} ({row['seconds']:.0f} s)"
                  + (f" stopped: {row['stopped'][:200]}" if row["stopped"] else ""), flush=True)
            runs.append(row)
    payload = {"args": vars(args), "runs": runs}
    path = C.write_results(args, "long_sequence", payload, markdown(runs, args))
    _plots.write_long_sequence_plots(payload, path)  # long_sequence_accuracy / _free_dimension.png
    return payload


if __name__ == "__main__":
    main()
