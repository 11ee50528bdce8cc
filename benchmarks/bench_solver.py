"""Design and memory update at d_in = 4096 (the width of a 7B model): randomized solver against a full eigh.

Covariances ``C = U diag(lambda) U^T`` (U a random rotation) with power-law spectra ``lambda_i = i^-alpha`` (alpha 1,
0.75, 0.5) and a spiked one (a few outlier directions, as massive activations give in LLMs). Task 1 starts from an
empty memory; task 2 (``C_2 = (C_1 + C')/2``) from the exact memory of task 1. For each:

* reference: ``torch.linalg.eigh`` of the symmetric ``Q C^2 Q`` (its top-r eigenvectors are the design; the GPM rule
  applied to all its eigenpairs is the memory update); its time excludes forming the matrix (reported apart);
* ``solver="randomized"``: ``design_eigen`` and ``update_memory`` timed as called by the model (validation included);
* accuracy: principal-angle cosines (subspace.principal_angle_cosines) against the reference, memory dimensions,
  and the energy of the task captured by each memory (the update must reach the threshold).

    python benchmarks/bench_solver.py            # d_in = 4096, about 15 minutes on one core
    python benchmarks/bench_solver.py --quick    # d_in = 256 (seconds)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from peft_inflora import subspace as S  # noqa: E402


def reference(memory: S.Memory, Cov: torch.Tensor, r: int, threshold: float, repeats: int) -> dict:
    t0 = time.perf_counter()
    QC = memory.project(Cov)
    Smat = QC @ QC.T
    Smat = 0.5 * (Smat + Smat.T)
    t_form = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        e, V = torch.linalg.eigh(Smat)
        times.append(time.perf_counter() - t0)
    e, V = torch.flip(e, dims=(0,)).clamp_min(0.0), torch.flip(V, dims=(1,))
    total = float((Cov * Cov).sum())
    captured = total - float(e.sum())
    if memory.dimension == 0:
        j = max(int((torch.cumsum(e, 0) / total < threshold).sum()), 1)
    elif captured / total >= threshold:
        j = 0
    else:
        j = int(torch.nonzero((captured + torch.cumsum(e, 0)) / total >= threshold)[0, 0]) + 1
    new = S._store(memory, V[:, :j], "dualgpm")
    return {"design": V[:, :r], "memory": new, "added": V[:, :j], "eigh_s": C.median(times), "form_s": t_form}


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, C.median(times)


def added_directions(old: S.Memory, new: S.Memory) -> torch.Tensor:
    """An orthonormal basis of what ``new`` holds beyond ``old`` (both memories of one sequence)."""
    basis = new.basis if new.form == "basis" else S._complement_basis(new.basis)
    return S._orthonormalise(old.project(basis)) if basis.shape[1] else basis


def run_case(kind: str, d: int, rotations, r: int, repeats: int, eigh_repeats: int) -> list[dict]:
    lam = C.spectrum(kind, d)
    U1, U2 = rotations
    C1 = (U1 * lam) @ U1.T
    C2 = 0.5 * C1 + 0.5 * ((U2 * lam) @ U2.T)
    rows, memory = [], S.Memory.empty(d)
    fallbacks = {"n": 0}
    original = S._gram_left_singular

    def counting(*a, **k):
        fallbacks["n"] += 1
        return original(*a, **k)

    for task, Cov in enumerate((C1, C2)):
        threshold = S.energy_threshold(0.95, task, 4)
        ref = reference(memory, Cov, r, threshold, eigh_repeats)
        design, t_design = timed(lambda: S.design_eigen(Cov, memory, r, solver="randomized"), repeats)
        fallbacks["n"] = 0
        S._gram_left_singular = counting
        try:
            new, t_memory = timed(lambda: S.update_memory(memory, Cov, threshold, solver="randomized"), repeats)
        finally:
            S._gram_left_singular = original
        design_cos = S.principal_angle_cosines(design.T, ref["design"])
        added_rand, added_ref = added_directions(memory, new), ref["added"]
        mem_cos = S.principal_angle_cosines(added_rand, added_ref) if added_ref.shape[1] and added_rand.shape[1] \
            else torch.ones(1, dtype=torch.float64)
        rows.append({
            "spectrum": kind, "task": task + 1, "threshold": threshold, "d_in": d, "r": r,
            "memory_before": memory.dimension,
            "eigh_s": ref["eigh_s"], "form_s": ref["form_s"],
            "design_randomized_s": t_design, "design_speedup_vs_eigh": ref["eigh_s"] / t_design,
            "design_min_cos": float(design_cos.min()),
            "memory_randomized_s": t_memory, "memory_speedup_vs_eigh": ref["eigh_s"] / t_memory,
            "memory_fell_back_to_dense_eigh": fallbacks["n"] > 0,
            "memory_dim_randomized": new.dimension, "memory_dim_reference": ref["memory"].dimension,
            "memory_added_min_cos": float(mem_cos.min()), "memory_added_mean_cos": float(mem_cos.mean()),
            "captured_randomized": S.captured_energy_ratio(new, Cov),
            "captured_reference": S.captured_energy_ratio(ref["memory"], Cov),
        })
        row = rows[-1]
        print(f"{kind} task {task + 1}: design {row['design_speedup_vs_eigh']:.1f}x (cos {row['design_min_cos']:.6f}),"
              f" memory {row['memory_speedup_vs_eigh']:.1f}x dims {new.dimension}/{ref['memory'].dimension}"
              f"{' (dense fallback)' if row['memory_fell_back_to_dense_eigh'] else ''}", flush=True)
        memory = ref["memory"]
    return rows


def exact_solver_timing(d: int, rotations) -> dict:
    """The package's exact solver (SVD of Q C) once, for the record."""
    lam = C.spectrum("alpha=1.0", d)
    U1, _ = rotations
    Cov = (U1 * lam) @ U1.T
    memory = S.Memory.empty(d)
    t0 = time.perf_counter()
    S.design_eigen(Cov, memory, 8, solver="exact")
    t_design = time.perf_counter() - t0
    t0 = time.perf_counter()
    S.update_memory(memory, Cov, 0.95, solver="exact")
    t_memory = time.perf_counter() - t0
    return {"spectrum": "alpha=1.0", "task": 1, "design_exact_s": t_design, "memory_exact_s": t_memory}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"## Solver at d_in = {result['d_in']} (bench_solver.py{' --quick' if env['quick'] else ''})", "",
             f"torch {env['torch']}; {env['machine']}; torch threads: {env['torch_threads']}; float64; r = "
             f"{result['r']}; medians of {result['repeats']} runs (randomized) and {result['eigh_repeats']} "
             "(eigh).", "",
             "| spectrum | task | memory before | eigh s (+ forming QC^2Q) | design randomized s | design speed-up "
             "| design min cos | memory update randomized s | memory speed-up | memory dims rand. / exact "
             "| added-directions min cos | captured rand. / exact (threshold) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        fb = " (dense eigh fallback)" if row["memory_fell_back_to_dense_eigh"] else ""
        lines.append(
            f"| {row['spectrum']} | {row['task']} | {row['memory_before']} "
            f"| {row['eigh_s']:.2f} (+{row['form_s']:.2f}) "
            f"| {row['design_randomized_s']:.2f} | **{row['design_speedup_vs_eigh']:.1f}x** "
            f"| {row['design_min_cos']:.6f} | {row['memory_randomized_s']:.2f}{fb} "
            f"| **{row['memory_speedup_vs_eigh']:.1f}x** | {row['memory_dim_randomized']} / "
            f"{row['memory_dim_reference']} | {row['memory_added_min_cos']:.4f} "
            f"| {row['captured_randomized']:.4f} / {row['captured_reference']:.4f} ({row['threshold']:.4f}) |")
    if result.get("exact_solver"):
        ex = result["exact_solver"]
        lines += ["", f"The package's exact solver (dense SVD of Q C), {ex['spectrum']}, task 1: design "
                  f"{ex['design_exact_s']:.1f} s, memory update {ex['memory_exact_s']:.1f} s."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=None, help="input width (default 4096; quick 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eigh-repeats", type=int, default=2)
    p.add_argument("--spectra", default="alpha=1.0,alpha=0.75,alpha=0.5,spiked")
    p.add_argument("--no-exact", action="store_true", help="skip the (slow) timing of the exact solver")
    args = p.parse_args(argv)
    C.setup(args)
    d = args.d or (256 if args.quick else 4096)
    repeats, eigh_repeats = (1, 1) if args.quick else (args.repeats, args.eigh_repeats)
    spectra = args.spectra.split(",")[:2] if args.quick else args.spectra.split(",")
    rotations = (C.rotation(d, 1), C.rotation(d, 2))
    rows = []
    for kind in spectra:
        rows += run_case(kind, d, rotations, 8, repeats, eigh_repeats)
    result = {"d_in": d, "r": 8, "repeats": repeats, "eigh_repeats": eigh_repeats, "rows": rows,
              "exact_solver": None if (args.quick or args.no_exact) else exact_solver_timing(d, rotations)}
    result["environment"] = C.environment(args)
    C.write_results(args, "solver", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
