"""Speed of InfLoRA against PEFT LoRA (GitHub issue 6, speed part).

1. Training step time, InfLoRA / LoRA at the same rank (8), targets (query, value) and batch (16 x 96 tokens) on
   all-MiniLM-L6-v2, at task 1 and at task 10 (nine finished tasks folded into the adapter, ``fold="adapter"``).
   The two models are stepped in alternation (ABBA order), so both see the same background load; the ratio is
   median(InfLoRA) / median(LoRA). Also: how many matmuls one adapted layer runs at task 1 and at task 10 (the
   folded past must be one matmul pair, whatever the number of tasks).
2. Statistics + design + memory update of one task / one training epoch of that task, on the demo's four tasks
   (examples/continual_text_classification.py: 96 texts per class, 96 tokens, batch 16), with the default token
   budget (``statistics_max_tokens="auto"``) and with every batch (``None``), with a breakdown.
3. Sampled against full-data design: principal-angle cosines (subspace.principal_angle_cosines) between the design
   from the default budget and from all the task's data, per input group, for the demo's tasks in sequence; the
   split-half floor (the designs of two disjoint halves of the data) and the energy efficiency (energy of the full-
   data covariance the sampled design captures / what the full-data design captures) put them in perspective.

    python benchmarks/bench_speed.py            # full run (about 20-30 minutes on one core)
    python benchmarks/bench_speed.py --quick    # smoke run on a tiny random BERT (seconds)
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


# ---------------------------------------------------------------------------------------------- 1. step time
def count_matmuls(layer: torch.nn.Module, d_in: int) -> int:
    """Number of matmul-like torch calls in one forward of an adapted layer."""
    from torch.overrides import TorchFunctionMode

    names = {"linear", "matmul", "mm", "addmm", "bmm", "__matmul__", "einsum"}

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in names:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 4, d_in)
    with torch.no_grad(), Count():
        layer(x)
    return Count.n


def finish_tasks(model, n_tasks: int, d_batch: dict) -> None:
    """``n_tasks`` begin/end cycles on small random batches, then begin the next task."""
    small = [{k: v for k, v in d_batch.items() if k != "labels"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_tasks):
            model.begin_task(small, progress=False)
            model.end_task(small, progress=False)
        model.begin_task(small, progress=False)


def step_ratio(lora, other, batch: dict, pairs: int, warmup: int = 2) -> dict:
    opt_a, opt_b = C.optimizer_for(lora), C.optimizer_for(other)
    lora.train()
    other.train()
    for _ in range(warmup):
        C.train_step(lora, opt_a, batch)
        C.train_step(other, opt_b, batch)
    t_lora, t_other, pair_ratios = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            a = C.train_step(lora, opt_a, batch)
            b = C.train_step(other, opt_b, batch)
        else:
            b = C.train_step(other, opt_b, batch)
            a = C.train_step(lora, opt_a, batch)
        t_lora.append(a)
        t_other.append(b)
        pair_ratios.append(b / a)
    return {"lora_median_s": C.median(t_lora), "inflora_median_s": C.median(t_other),
            "ratio": C.median(t_other) / C.median(t_lora), "median_pair_ratio": C.median(pair_ratios),
            "pair_ratio_iqr": C.iqr(pair_ratios), "pairs": pairs}


def bench_step_time(args) -> dict:
    quick = args.quick
    length = 16 if quick else 96
    batch = C.random_batch(16, length, seed=1)
    small = C.random_batch(4, 16, seed=2)
    lora = C.lora_model(C.load_classifier(quick))
    inf1 = C.inflora_model(C.load_classifier(quick))
    inf1.begin_task([small], progress=False)
    inf10 = C.inflora_model(C.load_classifier(quick))
    finish_tasks(inf10, 9, small)
    inf10_factored = C.inflora_model(C.load_classifier(quick), cache_past_weight=False)
    finish_tasks(inf10_factored, 9, small)
    models = {"task 1": inf1, "task 10": inf10, "task 10, cache_past_weight=False": inf10_factored}
    if not quick:
        inf10_base = C.inflora_model(C.load_classifier(quick), fold="base")
        finish_tasks(inf10_base, 9, small)
        models["task 10, fold=base"] = inf10_base
    pairs = 3 if quick else args.pairs
    d_in = inf1.base_model.model.config.hidden_size
    out = {"batch": [16, length], "r": 8, "targets": C.TARGETS, "rows": {}}
    # the cached and the factored forward of the same finished tasks agree (a non-zero past, so it means something)
    x = torch.randn(2, 5, d_in)
    cached = inf10.base_model.model.bert.encoder.layer[0].attention.self.query
    factored = inf10_factored.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        for layer in (cached, factored):
            layer.inflora_past_A["default"].copy_(torch.randn(layer.inflora_past_A["default"].shape,
                                                              generator=torch.Generator().manual_seed(0)))
        factored.base_layer.weight.copy_(cached.base_layer.weight)
        factored.inflora_past_B["default"].copy_(cached.inflora_past_B["default"])
        out["max_abs_difference_cached_vs_factored"] = float((cached(x) - factored(x)).abs().max())
    for name, model in models.items():
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        row = step_ratio(lora, model, batch, pairs)
        row["past_rank"] = int(layer.inflora_past_B["default"].shape[0])
        row["matmuls_per_adapted_layer_forward"] = count_matmuls(layer, d_in)
        out["rows"][name] = row
        print(f"step time {name}: ratio {row['ratio']:.3f}", flush=True)
    lora_layer = lora.base_model.model.bert.encoder.layer[0].attention.self.query
    out["lora_matmuls_per_adapted_layer_forward"] = count_matmuls(lora_layer, d_in)
    return out


# ---------------------------------------------------------------------------------------------- 2. statistics / epoch
def train_epoch(model, loader, lr: float = 2e-3) -> float:
    opt = C.optimizer_for(model, lr)
    model.train()
    t0 = time.perf_counter()
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def one_task_timing(template, loader) -> dict:
    import peft_inflora.lifecycle as L
    import peft_inflora.model as M

    model = copy.deepcopy(template)
    with C.Timers([M, L], ["collect_statistics", "design_eigen", "update_memory"]) as timers:
        t0 = time.perf_counter()
        model.begin_task(loader, progress=False)
        t_begin = time.perf_counter() - t0
        t_epoch = train_epoch(model, loader)
        t0 = time.perf_counter()
        model.end_task(loader, progress=False)
        t_end = time.perf_counter() - t0
    return {"begin_s": t_begin, "end_s": t_end, "epoch_s": t_epoch, "ratio": (t_begin + t_end) / t_epoch,
            "statistics_s": timers.seconds["collect_statistics"], "design_s": timers.seconds["design_eigen"],
            "memory_s": timers.seconds["update_memory"]}


def bench_statistics_ratio(args, tasks, tokenizer) -> dict:
    variants = {"auto (default)": "auto", "all batches": None}
    out = {}
    for t_index, task in enumerate(tasks):
        if args.quick and t_index > 0:
            break
        repeats = 1 if args.quick else (args.repeats if t_index == 0 else max(1, args.repeats - 2))
        n_labels = len(task.label_names)
        templates = {name: C.inflora_model(C.load_classifier(args.quick, num_labels=n_labels),
                                           statistics_max_tokens=value) for name, value in variants.items()}
        rows = {name: [] for name in variants}
        loader = C.task_loader(task.train_dataset, tokenizer, seed=t_index)
        tokens = sum(int(b["attention_mask"].sum()) for b in loader)
        padded = sum(int(b["attention_mask"].numel()) for b in loader)
        for rep in range(repeats):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                rows[name].append(one_task_timing(templates[name], loader))
        summary = {}
        for name, runs in rows.items():
            summary[name] = {key: C.median([r[key] for r in runs]) for key in runs[0]}
            summary[name]["ratio_runs"] = [r["ratio"] for r in runs]
        out[task.name] = {"texts": task.train_dataset.num_rows, "batches": len(loader), "tokens": tokens,
                          "padded_tokens": padded, "repeats": repeats, "variants": summary}
        print(f"statistics/epoch {task.name}: " + ", ".join(
            f"{n} {s['ratio']:.3f}" for n, s in summary.items()), flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 3. design cosines
def _design_metrics(C_full, C_other, memory, r: int) -> dict:
    from peft_inflora.subspace import design_eigen, principal_angle_cosines

    B_full = design_eigen(C_full, memory, r)
    B_other = design_eigen(C_other, memory, r)
    cos = principal_angle_cosines(B_full.T, B_other.T)
    QC = memory.project(C_full)
    s = torch.linalg.svdvals(QC)
    U = (B_other / B_other.norm(dim=1, keepdim=True)).T
    efficiency = float((U.T @ QC).pow(2).sum() / s[: B_full.shape[0]].pow(2).sum())
    return {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()), "energy_efficiency": efficiency}


def bench_design_cosines(args, tasks, tokenizer) -> dict:
    from peft_inflora.statistics import collect_statistics
    from peft_inflora.subspace import Memory, captured_energy_ratio, energy_threshold, update_memory

    base = C.load_classifier(args.quick, num_labels=10)
    model = C.inflora_model(base)
    net, layers = model.base_model.model, model.base_model.inflora_layers()
    seeds = 1 if args.quick else args.seeds
    memories: dict[str, Memory] = {}
    out = {}
    for t_index, task in enumerate(tasks):
        if args.quick and t_index > 1:
            break
        threshold = energy_threshold(0.95, t_index, len(tasks))
        full_loader = list(C.task_loader(task.train_dataset, tokenizer, seed=100 + t_index))
        groups = collect_statistics(net, layers, full_loader, progress=False)
        full = {g.leader: g.accumulator.covariance() for g in groups}
        halves = [full_loader[0::2], full_loader[1::2]]
        half_cov = [{g.leader: g.accumulator.covariance() for g in collect_statistics(net, layers, h, progress=False)}
                    for h in halves] if len(full_loader) >= 2 else None
        per_seed = []
        for seed in range(seeds):
            loader = C.task_loader(task.train_dataset, tokenizer, seed=seed)
            groups = collect_statistics(net, layers, loader, max_tokens="auto", progress=False)
            sampled = {g.leader: g.accumulator.covariance() for g in groups}
            n_tokens = int(groups[0].accumulator.count.item())
            for leader, C_full in full.items():
                memory = memories.get(leader, Memory.empty(C_full.shape[0]))
                row = _design_metrics(C_full, sampled[leader], memory, 8)
                m_full = update_memory(memory, C_full, threshold)
                m_samp = update_memory(memory, sampled[leader], threshold)
                row.update(layer=leader, seed=seed, tokens=n_tokens,
                           memory_added_full=m_full.dimension - memory.dimension,
                           memory_added_sampled=m_samp.dimension - memory.dimension,
                           threshold=threshold,
                           captured_by_sampled_memory=captured_energy_ratio(m_samp, C_full),
                           captured_by_full_memory=captured_energy_ratio(m_full, C_full))
                per_seed.append(row)
        floor = []
        if half_cov is not None:
            for leader in full:
                memory = memories.get(leader, Memory.empty(full[leader].shape[0]))
                floor.append(_design_metrics(half_cov[0][leader], half_cov[1][leader], memory, 8))
        total_tokens = sum(int(b["attention_mask"].sum()) for b in full_loader)
        out[task.name] = {
            "threshold": threshold, "task_tokens": total_tokens, "sampled_tokens": per_seed[0]["tokens"],
            "seeds": seeds, "groups": len(full), "rows": per_seed,
            "min_of_min_cos": min(r["min_cos"] for r in per_seed),
            "median_min_cos": C.median([r["min_cos"] for r in per_seed]),
            "median_mean_cos": C.median([r["mean_cos"] for r in per_seed]),
            "min_energy_efficiency": min(r["energy_efficiency"] for r in per_seed),
            "median_energy_efficiency": C.median([r["energy_efficiency"] for r in per_seed]),
            "min_captured_by_sampled_memory": min(r["captured_by_sampled_memory"] for r in per_seed),
            "split_half_median_min_cos": C.median([r["min_cos"] for r in floor]) if floor else None,
            "split_half_median_mean_cos": C.median([r["mean_cos"] for r in floor]) if floor else None,
            "split_half_median_energy_efficiency": C.median([r["energy_efficiency"] for r in floor]) if floor
            else None,
        }
        print(f"design cosines {task.name}: median min cos {out[task.name]['median_min_cos']:.3f}, median mean "
              f"cos {out[task.name]['median_mean_cos']:.3f}", flush=True)
        for leader, C_full in full.items():  # the sequence continues with the full-data memory
            memories[leader] = update_memory(memories.get(leader, Memory.empty(C_full.shape[0])), C_full, threshold)
    return out


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"## Speed (bench_speed.py{' --quick' if env['quick'] else ''})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
             f"{env['machine']}; torch threads inside the process: {env['torch_threads']}.", "",
             "### Training step time, InfLoRA / LoRA (same r, targets, batch)", "",
             "| state | past rank | matmuls per adapted-layer forward | LoRA median s | InfLoRA median s | ratio "
             "| median pair ratio (IQR) |", "|---|---|---|---|---|---|---|"]
    steps = result["step_time"]
    difference = steps.get("max_abs_difference_cached_vs_factored", float("nan"))
    for name, row in steps["rows"].items():
        lo, hi = row["pair_ratio_iqr"]
        lines.append(f"| {name} | {row['past_rank']} | {row['matmuls_per_adapted_layer_forward']} "
                     f"| {row['lora_median_s']:.3f} | {row['inflora_median_s']:.3f} | **{row['ratio']:.3f}** "
                     f"| {row['median_pair_ratio']:.3f} ({lo:.3f}-{hi:.3f}) |")
    lines += ["", f"LoRA runs {steps['lora_matmuls_per_adapted_layer_forward']} matmuls per adapted-layer forward; "
              f"batch {steps['batch'][0]} x {steps['batch'][1]} tokens, {steps['rows']['task 1']['pairs']} "
              "alternating step pairs after 2 warm-up steps each. Task 10: nine tasks finished with begin/end_task "
              "on small random batches. `task 10` uses the default `cache_past_weight=True` (W + past_A past_B run "
              "as one cached weight); `cache_past_weight=False` runs the past as its two stacked factors. On the same "
              f"weights the two forwards differ by at most {difference:.1e} (float32).", "",
              "### Statistics + design + memory update of one task / one training epoch", "",
              "| task | texts | batches | tokens (padded) | budget | ratio | begin s | end s | epoch s "
              "| statistics s | design s | memory s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, row in result["statistics_ratio"].items():
        for name, v in row["variants"].items():
            lines.append(f"| {task} | {row['texts']} | {row['batches']} | {row['tokens']} ({row['padded_tokens']}) "
                         f"| {name} | **{v['ratio']:.3f}** | {v['begin_s']:.2f} | {v['end_s']:.2f} "
                         f"| {v['epoch_s']:.2f} | {v['statistics_s']:.2f} | {v['design_s']:.3f} "
                         f"| {v['memory_s']:.3f} |")
    lines += ["", "Medians over the repeats (default and full alternate); ratio = (begin_task + end_task) / one "
              "epoch of plain training steps (AdamW) over the same DataLoader.", "",
              "### Design from the default token budget against the full-data design", "",
              "| task | threshold | task tokens | sampled tokens | median min cos | worst min cos | median mean cos "
              "| median energy eff. | worst energy eff. | split-half min cos | split-half mean cos "
              "| split-half energy eff. | worst captured by sampled memory |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, row in result["design_cosines"].items():
        lines.append(
            f"| {task} | {row['threshold']:.4f} | {row['task_tokens']} | {row['sampled_tokens']} "
            f"| {row['median_min_cos']:.3f} | {row['min_of_min_cos']:.3f} | {row['median_mean_cos']:.3f} "
            f"| {row['median_energy_efficiency']:.4f} | {row['min_energy_efficiency']:.4f} "
            f"| {C.fmt(row['split_half_median_min_cos'])} | {C.fmt(row['split_half_median_mean_cos'])} "
            f"| {C.fmt(row['split_half_median_energy_efficiency'], 4)} "
            f"| {row['min_captured_by_sampled_memory']:.4f} |")
    lines += ["", "Per input group (6 on MiniLM: query and value of a block share one) and shuffle seed: cosines of "
              "the principal angles between the r=8 designs; energy efficiency = ||B_s Q C||_F^2 / (sum of the top-8 "
              "squared singular values of Q C), C the full-data covariance (1 = as good as the full-data design); "
              "split-half: the same between the designs of two disjoint halves of the data (the noise floor of the "
              "full-data design itself); captured by sampled memory: energy of the full-data covariance inside the "
              "memory updated from the sample (the memory update asks for >= threshold)."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=30, help="alternating step pairs per state")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the statistics/epoch timing (first task)")
    p.add_argument("--seeds", type=int, default=3, help="shuffle seeds of the sampled design")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: step,ratio,cosines")
    args = p.parse_args(argv)
    C.setup(args)
    skip = set(filter(None, args.skip.split(",")))
    previous = {}
    saved = Path(args.out) / f"speed{'_quick' if args.quick else ''}.json"
    if skip and saved.is_file():  # keep the skipped sections of the last run
        previous = json.loads(saved.read_text())
    result = {"sections_from_previous_run": sorted(skip)}
    result["step_time"] = bench_step_time(args) if "step" not in skip else previous.get("step_time", {"rows": {}})
    tokenizer, tasks = C.demo_tasks(args.quick)
    result["statistics_ratio"] = bench_statistics_ratio(args, tasks, tokenizer) if "ratio" not in skip \
        else previous.get("statistics_ratio", {})
    result["design_cosines"] = bench_design_cosines(args, tasks, tokenizer) if "cosines" not in skip \
        else previous.get("design_cosines", {})
    result["environment"] = C.environment(args)
    complete = all(result[k] for k in ("statistics_ratio", "design_cosines")) and result["step_time"]["rows"]
    C.write_results(args, "speed", result, markdown(result) if complete else "(partial run)")
    return result


if __name__ == "__main__":
    main()
