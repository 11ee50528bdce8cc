"""GPU figures on a Llama-shaped model (issue 13, part 5): one prepared script with a time budget.

Measured, each side by side in one run:

1. **Step time InfLoRA / LoRA** (PEFT LoRA at the same r, q_proj / v_proj) at task 1 and at task 10: one optimizer
   step (forward, backward, AdamW) on the same batch, the two models alternated, medians over ``--pairs`` pairs, with
   ``torch.cuda.synchronize()`` around each step. Task 10 gets its 9 finished tasks from ``begin_task`` /
   ``end_task`` on small random batches (sizes and costs do not depend on the values).
2. **Statistics + design / one epoch**: ``begin_task`` + ``end_task`` over ``--epoch_batches`` batches, against one
   training epoch over the same batches (the same InfLoRA model, its next task).
3. **Solver at d_in = 4096 and 8192**: ``design_eigen(solver="randomized")`` against ``torch.linalg.eigh`` of the
   covariance and ``solver="exact"``, float64 on the device, a ``1/i`` spectrum in a random basis; the agreement is
   the smallest principal-angle cosine between the randomized and the eigh design.
4. **Peak memory**: ``torch.cuda.max_memory_allocated`` over the timed steps of each model (reset before each).

The base is a random ``LlamaConfig`` (hidden 4096, intermediate 11008, 32 heads, vocab 32000: Llama-7B's widths;
``--layers`` of its 32 decoder layers, 8 by default, to fit the budget) in bf16; the adapters are float32. Every
phase checks the remaining budget first and is skipped with a note when too little is left, and results are written
after every phase, so a run killed at its limit still leaves what it measured.

On the GPU machine::

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu

Smoke run on a CPU (tiny shapes, seconds): ``python benchmarks/bench_gpu.py --quick --device cpu``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from peft_inflora import subspace as S  # noqa: E402


TARGETS = ["q_proj", "v_proj"]


def llama(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.quick:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=128, max_position_embeddings=256)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                             max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised on the device: seconds on a GPU, not minutes on its host
        return LlamaForCausalLM(config).to(dtype=getattr(torch, args.dtype))


def adapted(args, method: str):
    from peft import LoraConfig, get_peft_model

    from peft_inflora import InfLoRAConfig

    config = LoraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM") if method == "lora" else \
        InfLoRAConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(llama(args), config)


def batch(args, seed: int, rows: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = 128 if args.quick else 32000
    ids = torch.randint(0, vocab, (rows or args.batch, args.seq), generator=g).to(args.device)
    return {"input_ids": ids, "labels": ids}


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def step(args, model, optimizer, data: dict) -> float:
    sync(args)
    t0 = time.perf_counter()
    model(**data).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(args)
    return time.perf_counter() - t0


def peak_bytes(args) -> int:
    return int(torch.cuda.max_memory_allocated()) if args.device.startswith("cuda") else 0


def reset_peak(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def step_ratio(args, lora, inflora, data: dict) -> dict:
    """Alternated steps (LoRA first on even pairs), after 2 warm-up steps each; peak memory per model."""
    opts = {"lora": C.optimizer_for(lora), "inflora": C.optimizer_for(inflora)}
    models = {"lora": lora, "inflora": inflora}
    times: dict[str, list[float]] = {"lora": [], "inflora": []}
    peaks = {}
    for name in ("lora", "inflora"):
        reset_peak(args)
        for _ in range(2):
            step(args, models[name], opts[name], data)
        peaks[name] = peak_bytes(args)
    for i in range(args.pairs):
        for name in (("lora", "inflora") if i % 2 == 0 else ("inflora", "lora")):
            times[name].append(step(args, models[name], opts[name], data))
    return {"lora_median_s": C.median(times["lora"]), "inflora_median_s": C.median(times["inflora"]),
            "ratio": C.median(times["inflora"]) / C.median(times["lora"]), "pairs": args.pairs,
            "lora_peak_bytes": peaks["lora"], "inflora_peak_bytes": peaks["inflora"]}


def fake_tasks(args, model, n: int) -> float:
    """``n`` finished tasks from small random batches; returns the seconds they took."""
    small = [{"input_ids": batch(args, 100 + k, rows=2)["input_ids"]} for k in range(2)]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            model.begin_task(small, progress=False)
            model.end_task(small, progress=False)
    return time.perf_counter() - t0


def phase_steps(args, result: dict, lora, inflora) -> None:
    data = batch(args, 1)
    small = [{"input_ids": batch(args, 2, rows=2)["input_ids"]}]
    inflora.begin_task(small, progress=False)
    result["steps"]["task 1"] = step_ratio(args, lora, inflora, data)
    inflora.end_task(small, progress=False)
    result["steps"]["fake_tasks_s"] = fake_tasks(args, inflora, 8)
    inflora.begin_task(small, progress=False)
    result["steps"]["task 10"] = step_ratio(args, lora, inflora, data)
    layer = inflora.base_model.model.model.layers[0].self_attn.q_proj
    result["steps"]["task 10"]["past_rank"] = int(layer.inflora_past_B["default"].shape[0])
    inflora.end_task(small, progress=False)
    for task in ("task 1", "task 10"):
        print(f"step InfLoRA / LoRA at {task}: {result['steps'][task]['ratio']:.3f}", flush=True)


def phase_statistics(args, result: dict, inflora) -> None:
    batches = [batch(args, 10 + k) for k in range(args.epoch_batches)]
    unlabelled = [{"input_ids": b["input_ids"]} for b in batches]
    sync(args)
    t0 = time.perf_counter()
    inflora.begin_task(unlabelled, progress=False)
    sync(args)
    begin_s = time.perf_counter() - t0
    optimizer = C.optimizer_for(inflora)
    epoch_s = sum(step(args, inflora, optimizer, b) for b in batches)
    t0 = time.perf_counter()
    inflora.end_task(unlabelled, progress=False)
    sync(args)
    end_s = time.perf_counter() - t0
    result["statistics"] = {"batches": args.epoch_batches, "begin_task_s": begin_s, "end_task_s": end_s,
                            "epoch_s": epoch_s, "ratio": (begin_s + end_s) / epoch_s}
    print(f"statistics + design / epoch: {result['statistics']['ratio']:.3f}", flush=True)


def phase_solver(args, result: dict, d: int) -> None:
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(d)
    U = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, device=device, generator=g))[0]
    lam = C.spectrum("alpha=1.0", d).to(device)
    cov = (U * lam) @ U.T
    memory = S.Memory.empty(d, device=device)
    row = {"d_in": d, "r": 8}
    for name, fn in (("eigh", lambda: torch.linalg.eigh(cov)),
                     ("randomized", lambda: S.design_eigen(cov, memory, 8, solver="randomized")),
                     ("exact", lambda: S.design_eigen(cov, memory, 8, solver="exact"))):
        fn()  # warm-up (kernels, workspaces)
        sync(args)
        t0 = time.perf_counter()
        out = fn()
        sync(args)
        row[f"{name}_s"] = time.perf_counter() - t0
        if name == "eigh":
            reference = torch.flip(out[1], dims=(1,))[:, :8]
        elif name == "randomized":
            row["randomized_min_cos_vs_eigh"] = float(S.principal_angle_cosines(out.T, reference).min())
    row["eigh_over_randomized"] = row["eigh_s"] / row["randomized_s"]
    result["solver"].append(row)
    print(f"solver d_in={d}: eigh {row['eigh_s']:.3f} s, randomized {row['randomized_s']:.3f} s "
          f"(cos {row['randomized_min_cos_vs_eigh']:.6f}), exact {row['exact_s']:.3f} s", flush=True)


def markdown(result: dict) -> str:
    lines = [f"# GPU figures ({result['device_name']})", "", f"Model: {result['model']}", ""]
    if result["steps"]:
        lines += ["| step | LoRA s | InfLoRA s | InfLoRA / LoRA | LoRA peak GiB | InfLoRA peak GiB |",
                  "|---|---|---|---|---|---|"]
        for task in ("task 1", "task 10"):
            if task in result["steps"]:
                r = result["steps"][task]
                lines.append(f"| {task} | {C.fmt(r['lora_median_s'], 4)} | {C.fmt(r['inflora_median_s'], 4)} | "
                             f"{C.fmt(r['ratio'])} | {r['lora_peak_bytes'] / 2**30:.2f} | "
                             f"{r['inflora_peak_bytes'] / 2**30:.2f} |")
    if result["statistics"]:
        s = result["statistics"]
        lines += ["", f"Statistics + design / one epoch ({s['batches']} batches): begin {C.fmt(s['begin_task_s'])} s "
                  f"+ end {C.fmt(s['end_task_s'])} s vs epoch {C.fmt(s['epoch_s'])} s = **{C.fmt(s['ratio'])}**"]
    if result["solver"]:
        lines += ["", "| d_in | eigh s | randomized s | exact s | eigh / randomized | min cos vs eigh |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['d_in']} | {C.fmt(r['eigh_s'])} | {C.fmt(r['randomized_s'])} | {C.fmt(r['exact_s'])} | "
                  f"{C.fmt(r['eigh_over_randomized'], 1)} | {r['randomized_min_cos_vs_eigh']:.6f} |"
                  for r in result["solver"]]
    lines += [""] + [f"- skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default=None, help="base model dtype (default bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the Llama-7B-shaped model")
    p.add_argument("--batch", type=int, default=4, help="sequences per training step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--pairs", type=int, default=10, help="alternated LoRA / InfLoRA step pairs per timing")
    p.add_argument("--epoch_batches", type=int, default=16, help="batches of the statistics / epoch comparison")
    p.add_argument("--budget_s", type=float, default=420.0, help="wall-clock budget; later phases are skipped")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.pairs, args.epoch_batches = 2, 16, 3, 2
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    C.setup(args)
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device_name": name, "steps": {}, "statistics": {}, "solver": [], "skipped": [],
              "model": ("tiny Llama (quick)" if args.quick else f"Llama-7B widths, {args.layers} layers") +
              f", {args.dtype} base, r = 8 on {TARGETS}, batch {args.batch} x {args.seq} tokens"}

    def save() -> None:
        C.write_results(args, "gpu", result, markdown(result))

    lora, inflora = adapted(args, "lora"), adapted(args, "inflora")
    phases = [("steps", 0.45, lambda: phase_steps(args, result, lora, inflora)),
              ("statistics", 0.25, lambda: phase_statistics(args, result, inflora))]
    phases += [(f"solver d_in={d}", 0.1, lambda d=d: phase_solver(args, result, d))
               for d in ((64, 128) if args.quick else (4096, 8192))]
    for label, share, run in phases:
        if left() < share * args.budget_s:
            result["skipped"].append(f"{label}: {left():.0f} s of the budget left")
            continue
        run()
        save()
    result["total_s"] = time.perf_counter() - start
    save()
    return result


if __name__ == "__main__":
    main()
