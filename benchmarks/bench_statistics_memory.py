"""Bounded-memory statistics (``statistics_sketch``): peak memory and accuracy of the Frequent Directions sketch
against the exact covariance (GitHub issue 8, part 4).

Three sections:

* ``peak``: ``begin_task`` + ``end_task`` on a stack of ``--layers`` ``nn.Linear(d, d)`` (GELU between them, every
  layer its own input group, d = 4096) fed synthetic activations with a power-law spectrum (``x = z diag(i^-1/2)
  R^T``, R a random rotation), ``--tokens`` tokens per pass in batches of 512, r = 8, exact mode against sketch mode.
  Each mode runs in a fresh child process; a thread samples the process's resident set size (psutil RSS) every
  0.5 ms (as in bench_memory.py, with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed tensors leave the RSS) and the peak
  above the RSS just before ``begin_task`` is reported, with the time in the statistics passes, the design and the
  memory update. The designs and memories of the two modes are compared by principal angles.
* ``synthetic``: one input group at d = 4096, covariances with power-law spectra (``lambda_i = i^-alpha``) and a
  spiked one; task 1 from an empty memory, task 2 (half its tokens from task 1's distribution, half from another
  rotation) from the exact memory of task 1 (a per-step comparison). For each sketch size ell: the smallest
  principal-angle cosine between the sketched and the exact design (r = 8) and between the directions each memory
  update adds, the memory dimensions, and the share of the task's exact energy each memory captures.
* ``minilm``: the same per-step comparison on real activations: the packaged all-MiniLM-L6-v2, the inputs of the
  query/value projections of its 6 blocks (d = 384, one input group per block), the demo's four tasks (all training
  texts, padding left out), the memory carried over with the exact updates; no training in between (the statistics of
  ``end_task`` then equal those of ``begin_task``). Smallest cosine over the 6 groups.

The exact side uses what the package uses in exact mode (``solver="auto"``: randomized above 1024 input features,
equal to a dense eigh to principal-angle cosine 1.000000 in bench_solver.py).

    python benchmarks/bench_statistics_memory.py            # about 7 minutes on one core
    python benchmarks/bench_statistics_memory.py --quick    # tiny sizes (seconds)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_memory import PeakRSS  # noqa: E402

from peft_inflora import subspace as S  # noqa: E402
from peft_inflora.sketch import SKETCH_AUTO_SIZE, SketchAccumulator, SketchWarning  # noqa: E402


R = 8
THRESHOLD = 0.95
MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------- helpers
def draw(n: int, lam: torch.Tensor, rot: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` tokens [n, d] (float32) with covariance ``rot diag(lam) rot^T``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, lam.numel(), generator=g) * lam.sqrt().float()
    return z @ rot.T


def added_directions(old: S.Memory, new: S.Memory) -> torch.Tensor:
    """Orthonormal basis of what ``new`` holds beyond ``old``."""
    basis = new.basis if new.form == "basis" else S._complement_basis(new.basis)
    return S._orthonormalise(old.project(basis)) if basis.shape[1] else basis


def min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest principal-angle cosine between the column spaces (over min(dim a, dim b) angles); 1 when both are
    empty, 0 when only one is."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return 1.0 if a.shape[1] == b.shape[1] else 0.0
    return float(S.principal_angle_cosines(a, b).min())


def exact_step(memory: S.Memory, exact_cov: torch.Tensor, threshold: float) -> dict:
    """The exact mode's design and memory update from ``memory`` (solver "auto", as the package runs it)."""
    t0 = time.perf_counter()
    design = S.design_eigen(exact_cov, memory, R)
    new = S.update_memory(memory, exact_cov, threshold)
    return {"cov": exact_cov, "design": design, "memory": new, "seconds": time.perf_counter() - t0}


def compare_step(memory: S.Memory, exact: dict, sketched, threshold: float) -> dict:
    """The design and memory update from ``memory`` with the sketched statistics, against ``exact``
    (:func:`exact_step` from the same memory)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        design = S.design_eigen(sketched, memory, R)
        new = S.update_memory(memory, sketched, threshold)
        t_sketch = time.perf_counter() - t0
    exact_cov, design_ex, new_ex, t_exact = exact["cov"], exact["design"], exact["memory"], exact["seconds"]
    return {
        "design_min_cos": min_cos(design.T, design_ex.T),
        "memory_added_min_cos": min_cos(added_directions(memory, new), added_directions(memory, new_ex)),
        "memory_dim_sketch": new.dimension, "memory_dim_exact": new_ex.dimension,
        "captured_sketch": S.captured_energy_ratio(new, exact_cov),
        "captured_exact": S.captured_energy_ratio(new_ex, exact_cov),
        "sketch_warnings": sum(issubclass(w.category, SketchWarning) for w in caught),
        "design_memory_s_sketch": t_sketch, "design_memory_s_exact": t_exact,
    }


def sketch_of(tokens: torch.Tensor, ell: int, memory: Optional[S.Memory], batch: int = 512):
    """The sketched statistics of ``tokens`` split by ``memory``, as sketch mode collects them (None: a plain sketch of
    all the tokens, without the split)."""
    acc = SketchAccumulator(tokens.shape[1], ell, memory=memory)
    for chunk in tokens.split(batch):
        acc.update(chunk)
    return acc.covariance()


# ---------------------------------------------------------------------------------------------- peak memory
class Stack(nn.Module):
    """``layers`` x (Linear(d, d), GELU); every Linear reads its own input (one input group each)."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.act = nn.GELU()

    def forward(self, x, attention_mask=None, labels=None):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = self.act(x)
        return x


def peak_child(mode: str, d: int, layers: int, tokens: int, batch: int, out: str) -> dict:
    from peft import get_peft_model
    from safetensors.torch import save_file

    import peft_inflora.lifecycle as L
    import peft_inflora.model as M
    from peft_inflora import InfLoRAConfig

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = Stack(d, layers).eval()
    ell = None if mode == "exact" else int(mode.split("=")[1])
    model = get_peft_model(base, InfLoRAConfig(r=R, target_modules=r"layers\.\d+", statistics_max_tokens=None,
                                               statistics_sketch=ell))
    lam = C.spectrum("alpha=1.0", d)
    rot = C.rotation(d, 1, torch.float32)
    data = [{"x": draw(batch, lam, rot, seed=100 + i)[None]} for i in range(tokens // batch)]
    with torch.no_grad():
        model(**data[0])  # first-call allocations before the baseline
    timers = C.Timers([M, L], ["collect_statistics", "design_eigen", "update_memory"])
    with timers, PeakRSS() as peak:
        t0 = time.perf_counter()
        model.begin_task(data, progress=False)
        t_begin = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.end_task(data, progress=False)
        t_end = time.perf_counter() - t0
    layers_ = model.base_model.inflora_layers()
    state = {}
    for i, (name, layer) in enumerate(layers_.items()):
        state[f"design.{i}"] = layer.inflora_past_B["default"].detach().double().contiguous()
        memory = layer.get_memory("default")
        basis = memory.basis if memory.form == "basis" else S._complement_basis(memory.basis.double())
        state[f"memory.{i}"] = basis.double().contiguous()
    save_file(state, out)
    per_group = d * d * 8 if ell is None else 2 * ell * d * 8
    return {"mode": mode, "peak_delta_bytes": peak.delta, "begin_task_s": t_begin, "end_task_s": t_end,
            "statistics_s": timers.seconds["collect_statistics"], "design_s": timers.seconds["design_eigen"],
            "memory_update_s": timers.seconds["update_memory"], "accumulator_bytes": layers * per_group,
            "groups": layers}


def run_peak_child(mode: str, args, out: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", mode, "--d", str(args.d), "--layers", str(args.layers),
           "--tokens", str(args.tokens), "--batch", str(args.batch), "--child-out", out]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_section(args) -> dict:
    from safetensors.torch import load_file

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for mode in ["exact"] + [f"sketch={ell}" for ell in args.peak_ells]:
            files[mode] = os.path.join(tmp, f"{mode}.safetensors")
            if args.quick:  # a smoke run: in this process
                rows[mode] = peak_child(mode, args.d, args.layers, args.tokens, args.batch, files[mode])
            else:
                rows[mode] = run_peak_child(mode, args, files[mode])
            print(f"peak {mode}: {rows[mode]['peak_delta_bytes'] / MIB:.1f} MiB above baseline, begin "
                  f"{rows[mode]['begin_task_s']:.1f} s, end {rows[mode]['end_task_s']:.1f} s", flush=True)
        exact = load_file(files["exact"])
        for mode in rows:
            if mode == "exact":
                continue
            other = load_file(files[mode])
            design_cos = [min_cos(exact[f"design.{i}"].T, other[f"design.{i}"].T) for i in range(args.layers)]
            memory_cos = [min_cos(exact[f"memory.{i}"], other[f"memory.{i}"]) for i in range(args.layers)]
            rows[mode]["design_min_cos"] = min(design_cos)
            rows[mode]["memory_min_cos"] = min(memory_cos)
            rows[mode]["memory_dims"] = [int(other[f"memory.{i}"].shape[1]) for i in range(args.layers)]
        rows["exact"]["memory_dims"] = [int(exact[f"memory.{i}"].shape[1]) for i in range(args.layers)]
    return {"d_in": args.d, "layers": args.layers, "tokens": args.tokens, "batch": args.batch, "rows": rows}


# ---------------------------------------------------------------------------------------------- synthetic
def synthetic_section(args) -> list[dict]:
    d, n = args.d, args.synthetic_tokens
    rot1, rot2 = C.rotation(d, 1, torch.float32), C.rotation(d, 2, torch.float32)
    rows = []
    for kind in args.spectra:
        lam = C.spectrum(kind, d)
        tasks = [draw(n, lam, rot1, seed=11),
                 torch.cat([draw(n // 2, lam, rot1, seed=12), draw(n - n // 2, lam, rot2, seed=13)])]
        exact = []
        for X in tasks:
            X64 = X.double()
            exact.append(X64.T @ X64 / X.shape[0])
            del X64
        memory = S.Memory.empty(d)
        for t in range(2):
            threshold = S.energy_threshold(THRESHOLD, t, None)
            reference = exact_step(memory, exact[t], threshold)
            for ell in args.ells:
                row = compare_step(memory, reference, sketch_of(tasks[t], ell, memory), threshold)
                row.update({"spectrum": kind, "task": t + 1, "ell": ell, "d_in": d, "tokens": n,
                            "memory_before": memory.dimension, "threshold": threshold})
                rows.append(row)
                print(f"synthetic {kind} task {t + 1} ell {ell}: design cos {row['design_min_cos']:.6f}, memory "
                      f"cos {row['memory_added_min_cos']:.4f}, dims {row['memory_dim_sketch']}/"
                      f"{row['memory_dim_exact']}", flush=True)
            memory = reference["memory"]
    return rows


# ---------------------------------------------------------------------------------------------- MiniLM
def minilm_tokens(model, loader) -> list[torch.Tensor]:
    """Per block: the non-padding inputs of the query/value projections [N, 384] over the loader."""
    layers = [m.attention.self.query for m in model.bert.encoder.layer]
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    mask_box = {}

    def hook(i):
        def fn(module, inputs):
            x = inputs[0]
            store[i].append(x.reshape(-1, x.shape[-1])[mask_box["mask"].reshape(-1)].detach().clone())
        return fn

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in loader:
                mask_box["mask"] = batch["attention_mask"].bool()
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(chunks) for chunks in store]


def minilm_section(args) -> list[dict]:
    tokenizer, tasks = C.demo_tasks(args.quick)
    model = C.load_classifier(args.quick).eval()
    per_task = [minilm_tokens(model, C.task_loader(task.train_dataset, tokenizer, seed=0)) for task in tasks]
    d = per_task[0][0].shape[1]
    ells = [ell for ell in args.minilm_ells if 2 * ell < d]
    memories = [S.Memory.empty(d) for _ in per_task[0]]
    rows = []
    for t, groups in enumerate(per_task):
        threshold = S.energy_threshold(THRESHOLD, t, None)
        references = [exact_step(memories[g], (X.double().T @ X.double()) / X.shape[0], threshold)
                      for g, X in enumerate(groups)]
        for ell in ells:
            per_group = [compare_step(memories[g], references[g], sketch_of(X, ell, memories[g]), threshold)
                         for g, X in enumerate(groups)]
            unsplit = [min_cos(S.design_eigen(sketch_of(X, ell, None), memories[g], R).T, references[g]["design"].T)
                       for g, X in enumerate(groups)] if t > 0 else None
            rows.append({
                "task": t + 1, "task_name": tasks[t].name, "ell": ell, "d_in": d,
                "tokens": int(groups[0].shape[0]), "threshold": threshold,
                "memory_before": [m.dimension for m in memories],
                "design_min_cos": min(r["design_min_cos"] for r in per_group),
                "design_min_cos_unsplit": min(unsplit) if unsplit else None,
                "memory_added_min_cos": min(r["memory_added_min_cos"] for r in per_group),
                "memory_dims_sketch": [r["memory_dim_sketch"] for r in per_group],
                "memory_dims_exact": [r["memory_dim_exact"] for r in per_group],
                "captured_sketch_min": min(r["captured_sketch"] for r in per_group),
                "captured_exact_min": min(r["captured_exact"] for r in per_group),
                "sketch_warnings": sum(r["sketch_warnings"] for r in per_group),
            })
            row = rows[-1]
            print(f"minilm task {t + 1} ell {ell}: design cos {row['design_min_cos']:.6f}, memory cos "
                  f"{row['memory_added_min_cos']:.4f}, dims {sum(row['memory_dims_sketch'])}/"
                  f"{sum(row['memory_dims_exact'])}", flush=True)
        memories = [reference["memory"] for reference in references]
    return rows


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    env = result["environment"]
    peak = result["peak"]
    lines = [f"## Statistics memory (bench_statistics_memory.py{' --quick' if env['quick'] else ''})", "",
             f"torch {env['torch']}; {env['machine']}; torch threads: {env['torch_threads']}; float64 statistics; "
             f"r = {R}; energy threshold {THRESHOLD}. Command: `{env.get('command')}`; {result['wall_s']:.0f} s.", ""]
    if peak:
        lines += _peak_markdown(peak)
    if result["synthetic"]:
        lines += _synthetic_markdown(result["synthetic"])
    if result["minilm"]:
        lines += _minilm_markdown(result["minilm"])
    return "\n".join(lines)


def _peak_markdown(peak: dict) -> list[str]:
    lines = [f"### Peak memory: begin_task + end_task, {peak['layers']} x nn.Linear({peak['d_in']}, {peak['d_in']}), "
             f"{peak['tokens']} tokens per pass (batches of {peak['batch']}), one input group per layer", "",
             "Peak RSS above the RSS just before begin_task (fresh process per mode, psutil sampling every 0.5 ms, "
             "MALLOC_MMAP_THRESHOLD_=131072); the model's weights are part of the baseline.", "",
             "| mode | peak above baseline (MiB) | / exact | statistics held (MiB) | statistics passes s | design s "
             "| memory update s | design min cos vs exact | memory min cos vs exact | memory dims |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    exact_peak = peak["rows"]["exact"]["peak_delta_bytes"]
    for mode, row in peak["rows"].items():
        dims = row["memory_dims"]
        lines.append(
            f"| {mode} | {row['peak_delta_bytes'] / MIB:.1f} | {row['peak_delta_bytes'] / exact_peak:.3f} "
            f"| {row['accumulator_bytes'] / MIB:.1f} | {row['statistics_s']:.1f} | {row['design_s']:.2f} "
            f"| {row['memory_update_s']:.2f} | {C.fmt(row.get('design_min_cos'), 6)} "
            f"| {C.fmt(row.get('memory_min_cos'), 6)} | {min(dims)}-{max(dims)} |")
    return lines + [""]


def _synthetic_markdown(rows: list[dict]) -> list[str]:
    lines = [f"### Synthetic activations, one input group, d_in = {rows[0]['d_in']}, {rows[0]['tokens']} tokens per "
             "task", "",
             "Per step: both sides start from the exact memory of the task before. `memory cos`: smallest "
             "principal-angle cosine between the directions the two updates add (over the smaller number). "
             "`captured`: share of the task's exact (squared) energy the new memory holds.", "",
             "| spectrum | task | memory before | ell | design min cos | memory min cos | memory dims sketch / exact "
             "| captured sketch / exact (threshold) | sketch warnings |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['spectrum']} | {row['task']} | {row['memory_before']} | {row['ell']} "
            f"| {row['design_min_cos']:.6f} | {row['memory_added_min_cos']:.4f} "
            f"| {row['memory_dim_sketch']} / {row['memory_dim_exact']} "
            f"| {row['captured_sketch']:.4f} / {row['captured_exact']:.4f} ({row['threshold']:.4f}) "
            f"| {row['sketch_warnings']} |")
    return lines + [""]


def _minilm_markdown(rows: list[dict]) -> list[str]:
    first = rows[0]
    lines = [f"### Real activations: all-MiniLM-L6-v2, query/value inputs of the 6 blocks (d_in = "
             f"{first['d_in']}), the demo's 4 tasks", "",
             "Per step from the exact memory of the task before; smallest cosine over the 6 input groups; memory dims "
             "summed over the groups. `unsplit`: the design from a plain sketch of all the tokens (not split by the "
             "memory), for comparison.", "",
             "| task | tokens | ell | design min cos | (unsplit) | memory min cos | memory dims sketch / exact (sum) "
             "| captured min sketch / exact | sketch warnings |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['task']} ({row['task_name']}) | {row['tokens']} | {row['ell']} "
            f"| {row['design_min_cos']:.6f} | {C.fmt(row['design_min_cos_unsplit'], 4)} "
            f"| {row['memory_added_min_cos']:.4f} "
            f"| {sum(row['memory_dims_sketch'])} / {sum(row['memory_dims_exact'])} "
            f"| {row['captured_sketch_min']:.4f} / {row['captured_exact_min']:.4f} | {row['sketch_warnings']} |")
    return lines


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=None, help="input width of the peak and synthetic sections (4096)")
    p.add_argument("--layers", type=int, default=None, help="layers of the peak-memory stack (8)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per statistics pass in the peak section (2048)")
    p.add_argument("--batch", type=int, default=None, help="tokens per batch in the peak section (512)")
    p.add_argument("--peak-ells", default=None, help=f"sketch sizes of the peak section ({SKETCH_AUTO_SIZE})")
    p.add_argument("--ells", default=None, help="sketch sizes of the synthetic section (128,256,512)")
    p.add_argument("--minilm-ells", default=None, help="sketch sizes of the MiniLM section (64,128,160)")
    p.add_argument("--spectra", default=None, help="synthetic spectra (alpha=1.0,spiked; also e.g. alpha=0.75)")
    p.add_argument("--synthetic-tokens", type=int, default=None, help="tokens per synthetic task (8192)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: peak,synthetic,minilm")
    p.add_argument("--child", default=None, help=C.hidden_help())
    p.add_argument("--child-out", default=None, help=C.hidden_help())
    args = p.parse_args(argv)
    quick = args.quick
    args.d = args.d or (256 if quick else 4096)
    args.layers = args.layers or (2 if quick else 8)
    args.tokens = args.tokens or (512 if quick else 2048)
    args.batch = args.batch or (128 if quick else 512)
    if args.child:
        print(json.dumps(peak_child(args.child, args.d, args.layers, args.tokens, args.batch, args.child_out)))
        return {}
    C.setup(args)
    args.peak_ells = [int(x) for x in (args.peak_ells or ("32" if quick else str(SKETCH_AUTO_SIZE))).split(",")]
    args.ells = [int(x) for x in (args.ells or ("16,32,64" if quick else "128,256,512")).split(",")]
    args.minilm_ells = [int(x) for x in (args.minilm_ells or ("8,16" if quick else "64,128,160")).split(",")]
    args.spectra = (args.spectra or ("alpha=1.0" if quick else "alpha=1.0,spiked")).split(",")
    args.synthetic_tokens = args.synthetic_tokens or (1024 if quick else 8192)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    result = {
        "r": R, "threshold": THRESHOLD,
        "peak": peak_section(args) if "peak" not in skip else None,
        "synthetic": synthetic_section(args) if "synthetic" not in skip else [],
        "minilm": minilm_section(args) if "minilm" not in skip else [],
    }
    result["wall_s"] = time.perf_counter() - t0
    result["environment"] = C.environment(args)
    C.write_results(args, "statistics_memory", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
