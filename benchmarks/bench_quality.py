"""Quality of InfLoRA against baselines on the demo's four text tasks (GitHub issue 6, quality part).

all-MiniLM-L6-v2, class-incremental, the default tasks of examples/continual_text_classification.py (built with its
build_tasks / tokenized) and its settings: r = 8 on query/value, lr 2e-3, 3 epochs, batch 16, 96 tokens), several
seeds. Methods, all run by
peft_inflora.ContinualTrainer (per-task heads, loss over the task's classes, old head rows frozen):

* InfLoRA eigen (the paper's design), with the default statistics budget, and with every batch;
* InfLoRA random (the language-model follow-up's design);
* InfLoRA + classifier alignment after every task (``classifier_alignment``): the authors' (every row re-trained) and
  the new task's rows only, also with every batch read by the statistics; a cosine head while each task trains
  (``head_logits="cosine"``) + the authors' alignment (the trainer's default for class_incremental); sequential LoRA
  with the same heads (new rows; cosine + authors: backbone vs head). Every other method runs with
  ``classifier_alignment="none"``;
* sequential LoRA (PEFT LoRA trained task after task: the forgetting baseline);
* OSF (PEFT's orthogonal subspace fine-tuning), if this PEFT has ``OSFConfig``: after each task the update is merged
  and the weights are decomposed again with a larger preserved rank (50% of the singular directions at task 1, rising
  linearly to 90% at the last task);
* heads only (backbone frozen: only the classifier rows of each task train);
* joint multi-task LoRA (all tasks' data at once: an upper bound; only its final accuracy is meaningful).

Each seed sets the batch order and the head/LoRA initialisation (``--init-seed-zero``: seed-0 initialisation, as
runs before 2026-12-02). Reports mean ± std over seeds of A_T, A_avg, BWT and forgetting (peft_inflora.compare_table)
and, per task, the accuracy right after its own training next to the final one.

    python benchmarks/bench_quality.py                 # 3 seeds, about 1-2 hours on one core
    python benchmarks/bench_quality.py --quick         # smoke run: tiny random BERT, tiny data, 1 seed
    python benchmarks/bench_quality.py --methods "InfLoRA eigen,sequential LoRA" --seeds 0,1,2
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


METHODS = ["InfLoRA eigen", "InfLoRA + authors' CA", "InfLoRA + new-rows CA", "InfLoRA + cosine head + authors' CA",
           "InfLoRA (all batches) + new-rows CA",
           "InfLoRA eigen (all batches)", "InfLoRA random", "sequential LoRA", "sequential LoRA + new-rows CA",
           "sequential LoRA + cosine head + authors' CA", "OSF",
           "heads only", "joint LoRA"]


def alignment_of(method: str) -> str:
    """The trainer's ``classifier_alignment`` of a method: ``authors`` / ``new_rows`` where its name says so,
    else ``none`` (explicitly: the trainer's default for class_incremental aligns)."""
    return "authors" if "authors' CA" in method else "new_rows" if "new-rows CA" in method else "none"


def has_osf() -> bool:
    import peft

    return hasattr(peft, "OSFConfig")


def make_model(method: str, quick: bool, num_labels: int, n_tasks: int, r: int, init_seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from peft_inflora import InfLoRAConfig

    base = C.load_classifier(quick, num_labels=num_labels, seed=init_seed)  # head (and LoRA) initialisation
    targets, head = C.TARGETS, ["classifier"]
    if method.startswith("InfLoRA"):
        config = InfLoRAConfig(r=r, target_modules=targets, modules_to_save=head, energy_threshold=0.95,
                               design="random" if "random" in method else "eigen", total_tasks=n_tasks,
                               statistics_max_tokens=None if "all batches" in method else "auto")
        return get_peft_model(base, config), []
    if method == "OSF":
        from peft import OSFConfig

        config = OSFConfig(target_modules=targets, modules_to_save=head, effective_rank=0.5)
        model = get_peft_model(base, config)
        return model, [OSFContinual(config, n_tasks)]
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets,
                                            modules_to_save=head))
    if method == "heads only":
        C.freeze_lora(model)
    return model, []


def _osf_callback_base():
    from peft_inflora import ContinualCallback

    return ContinualCallback


class OSFContinual(_osf_callback_base()):
    """Between tasks: merge each OSF layer's update into its weight and decompose it again with a larger preserved
    rank (fraction 0.5 at the first task, rising linearly to 0.9 at the last)."""

    def __init__(self, config, n_tasks: int) -> None:
        self.config = config
        self.fractions = [0.5 + 0.4 * i / max(n_tasks - 1, 1) for i in range(n_tasks)]

    def on_task_end(self, args, state, control, task=None, task_index=0, result=None, model=None, **kwargs):
        from peft.tuners.osf.layer import OSFLayer

        nxt = task_index + 1
        if nxt >= len(self.fractions) or model is None:
            return
        for module in model.modules():
            if isinstance(module, OSFLayer):
                name = module.active_adapters[0]
                module.merge(adapter_names=[name])
                module.merged_adapters.clear()
                module._detach_hooks()
                rank = max(1, int(self.fractions[nxt] * min(module.in_features, module.out_features)))
                module.update_layer(name, rank, config=self.config)


def head_logits_of(method: str) -> str:
    """The trainer's ``head_logits``: ``cosine`` where the method's name says so, else ``linear``."""
    return "cosine" if "cosine head" in method else "linear"


def training_args(out: str, quick: bool, seed: int, alignment: str = "none", head_logits: str = "linear"):
    from peft_inflora import ContinualTrainingArguments

    return ContinualTrainingArguments(output_dir=out, setting="class_incremental", classifier_alignment=alignment,
                                      head_logits=head_logits,
                                      learning_rate=2e-3,
                                      num_train_epochs=1 if quick else 3, per_device_train_batch_size=16,
                                      per_device_eval_batch_size=64, report_to="none", save_strategy="no",
                                      logging_strategy="no", seed=seed, weight_decay=0.0, disable_tqdm=True,
                                      use_cpu=True)


def joint_tasks(tasks):
    """One task holding every task's data with global labels, and each task's test set with global labels."""
    import datasets

    from peft_inflora import ContinualTask

    trains, tests, names, offset = [], [], [], 0
    for task in tasks:
        n = len(task.label_names)
        column = "labels" if "labels" in task.train_dataset.column_names else "label"

        def shift(batch, offset=offset, column=column):
            return {column: [int(y) + offset for y in batch[column]]}

        plain = [ds.cast_column(column, datasets.Value("int64")) for ds in (task.train_dataset, task.eval_dataset)]
        train, test = (ds.map(shift, batched=True) for ds in plain)
        if column == "label":
            train, test = train.rename_column("label", "labels"), test.rename_column("label", "labels")
        trains.append(train)
        tests.append(test)
        names += [f"{task.name}:{label}" for label in task.label_names]
        offset += n
    joint = ContinualTask("joint", datasets.concatenate_datasets(trains), datasets.concatenate_datasets(tests),
                          label_names=names)
    return joint, tests


def run(method: str, seed: int, tasks, tokenizer, quick: bool, r: int, workdir: str, init_per_seed: bool = True):
    from transformers import DataCollatorWithPadding

    from peft_inflora import ContinualTrainer

    torch.manual_seed(seed)
    num_labels = sum(len(t.label_names) for t in tasks)
    model, callbacks = make_model(method, quick, num_labels, len(tasks), r, init_seed=seed if init_per_seed else 0)
    args = training_args(workdir, quick, seed, alignment_of(method), head_logits_of(method))
    trainer = ContinualTrainer(model=model, args=args,
                               processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                               callbacks=callbacks)
    t0 = time.perf_counter()
    if method != "joint LoRA":
        result = trainer.train_continual(tasks)
        result.extra.update(seconds=time.perf_counter() - t0)
        if method == "heads only":  # the backbone really stayed frozen: LoRA's B factors are still zero
            assert all(float(p.abs().max()) == 0.0 for n, p in model.named_parameters() if "lora_B" in n)
        return result
    joint, tests = joint_tasks(tasks)
    trainer.train_continual([joint])
    accuracies = []
    for test in tests:
        output = trainer.predict(test)
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        accuracies.append(float((np.argmax(logits, axis=-1) == np.asarray(test["labels"])).mean()))
    return {"task_names": [t.name for t in tasks], "accuracies": accuracies,
            "final_accuracy": float(np.mean(accuracies)), "extra": {"seconds": time.perf_counter() - t0}}


def own_and_final_table(result: dict) -> str:
    """Per task, mean ± std over seeds: the accuracy right after the task's own training (``a[j][j]``) and at the
    end (``a[T-1][j]``), for every continual method; joint training: its final accuracy per task."""
    names = result["task_names"]
    head = " | ".join(f"{n} own / final" for n in names)
    lines = [f"| method | {head} | worst own (any seed) |", "|---|" + "---|" * len(names) + "---:|"]

    def pm(values):
        a = 100 * np.asarray(values, dtype=float)
        return f"{a.mean():.1f} ± {a.std(ddof=1):.1f}" if len(a) > 1 else f"{a.mean():.1f}"

    for method, runs in result["runs"].items():
        if method == "joint LoRA":
            cells = [f"- / {pm([r['accuracies'][j] for r in runs])}" for j in range(len(names))]
            lines.append(f"| {method} | " + " | ".join(cells) + " | - |")
            continue
        matrices = [r["accuracy_matrix"] for r in runs]
        cells = [f"{pm([m[j][j] for m in matrices])} / {pm([m[-1][j] for m in matrices])}" for j in range(len(names))]
        worst = min(m[j][j] for m in matrices for j in range(len(names)))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * worst:.1f} |")
    return "\n".join(lines)


def markdown(result: dict, table: str) -> str:
    env = result["environment"]
    lines = [f"## Quality on the demo's four tasks (bench_quality.py{' --quick' if env['quick'] else ''})", "",
             f"torch {env['torch']}, peft {env['peft']}; tasks {', '.join(result['task_names'])}; "
             f"seeds {result['seeds']}; "
             + ("tiny random BERT, tiny data (smoke run: the numbers mean nothing)." if env["quick"]
                else "all-MiniLM-L6-v2.")
             + (" Head and LoRA initialisation per seed." if result.get("init_per_seed", True)
                else " Head and LoRA initialisation of seed 0 for every seed"
                + (f" in {', '.join(result['seed_zero_init'])} (earlier runs), per seed in the others."
                   if result.get("seed_zero_init") else ".")), "", table, "",
             "Accuracy (%) on each task right after its own training, and at the end (mean ± std over seeds):", "",
             own_and_final_table(result), ""]
    joint = result["runs"].get("joint LoRA")
    if joint:
        a = np.array([run["final_accuracy"] for run in joint])
        std = f" ± {100 * a.std(ddof=1):.2f}" if len(a) > 1 else ""
        lines.append(f"Joint multi-task LoRA (upper bound, all data at once): A_T = {100 * a.mean():.2f}{std} %.")
    lines += ["", "| method | mean seconds per run | of which statistics passes |", "|---|---|---|"]
    for method, runs in result["runs"].items():
        seconds = np.mean([run["extra"].get("seconds", float("nan")) for run in runs])
        stats = np.mean([sum(run.get("statistics_seconds") or [0.0]) for run in runs])
        lines.append(f"| {method} | {seconds:.0f} | {stats:.0f} |")
    return "\n".join(lines)


def merge(args) -> dict:
    """One table from several runs' ``quality.json`` (e.g. one folder per seed): runs of a method are pooled, each
    (method, seed) once. A (method, seed) found again in a later folder (a rerun, e.g. after a default changed)
    replaces the earlier run; ``replaced`` in the result lists them."""
    from peft_inflora import ContinualResult, compare_table

    by_seed: dict[str, dict[int, dict]] = {}  # method -> seed -> run, in the order first seen
    replaced: list[str] = []
    task_names, environment = None, None
    seed_zero: set[tuple[str, int]] = set()  # (method, seed) runs made before the per-seed initialisation
    for folder in [f.strip() for f in args.merge.split(",") if f.strip()]:
        data = __import__("json").loads((Path(folder) / "quality.json").read_text())
        task_names, environment = data["task_names"], data["environment"]
        earlier_zero = data.get("seed_zero_init")  # a merged folder names its seed-0-initialised methods
        for method, method_runs in data["runs"].items():
            per_seed_init = (method not in earlier_zero) if earlier_zero is not None \
                else data.get("init_per_seed", False)
            method_seeds = data.get("seeds_per_method", {}).get(method, data["seeds"])
            for seed, run in zip(method_seeds, method_runs):
                if seed in by_seed.setdefault(method, {}):
                    replaced.append(f"{method} seed {seed} (by {folder})")
                by_seed[method][seed] = run
                (seed_zero.discard if per_seed_init else seed_zero.add)((method, seed))
    order = [m for m in METHODS if m in by_seed] + [m for m in by_seed if m not in METHODS]
    runs = {m: list(by_seed[m].values()) for m in order}
    seed_zero_init = {m for m, _ in seed_zero}
    seeds_of = {m: list(by_seed[m]) for m in order}
    continual = {m: [ContinualResult.from_dict(r) for r in rs] for m, rs in runs.items() if m != "joint LoRA"}
    seeds = sorted({s for ss in seeds_of.values() for s in ss})
    result = {"seeds": seeds, "seeds_per_method": {m: seeds_of[m] for m in order}, "methods": order,
              "task_names": task_names, "runs": runs, "merged_from": args.merge, "replaced": replaced,
              "init_per_seed": not seed_zero_init, "seed_zero_init": sorted(seed_zero_init),
              "environment": {**environment, "quick": False}}
    path = C.write_results(args, "quality", result, markdown(result, compare_table(continual)))
    _plots.write_quality_plots(result, path)  # quality_accuracy.png, quality_forgetting.png
    return result


def main(argv=None) -> dict:
    from peft_inflora import compare_table

    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--init-seed-zero", action="store_true",
                   help="initialise the head (and LoRA) with seed 0 for every seed, as runs before 2026-12-02 did "
                        "(default: each seed its own initialisation as well as its own batch order)")
    p.add_argument("--merge", default=None,
                   help="comma-separated folders of earlier runs (each with quality.json): combine their runs into "
                        "one table (mean ± std over all seeds found) instead of training")
    args = p.parse_args(argv)
    C.setup(args)
    if args.merge:
        return merge(args)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "OSF" in methods and not has_osf():
        methods.remove("OSF")
        print("this PEFT has no OSFConfig: OSF skipped")
    tokenizer, tasks = C.demo_tasks(args.quick)
    runs: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for seed in seeds:
                result = run(method, seed, tasks, tokenizer, args.quick, args.r,
                             str(Path(tmp) / f"{''.join(ch for ch in method if ch.isalnum())}_{seed}"),
                             init_per_seed=not args.init_seed_zero)
                runs.setdefault(method, []).append(result)
                metrics = result if isinstance(result, dict) else result.metrics()
                print(f"{method} seed {seed}: {metrics}", flush=True)
    continual = {m: rs for m, rs in runs.items() if m != "joint LoRA"}
    table = compare_table(continual) if continual else ""
    result = {"seeds": seeds, "methods": methods, "task_names": [t.name for t in tasks],
              "init_per_seed": not args.init_seed_zero,
              "runs": {m: [r if isinstance(r, dict) else r.to_dict() for r in rs] for m, rs in runs.items()},
              "environment": C.environment(args)}
    path = C.write_results(args, "quality", result, markdown(result, table))
    _plots.write_quality_plots(result, path)  # quality_accuracy.png, quality_forgetting.png
    return result


if __name__ == "__main__":
    main()
