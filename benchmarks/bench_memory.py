"""Memory of InfLoRA against PEFT LoRA: peak memory of the statistics pass and of a training step, and the size of
the saved adapter after T tasks (all in bytes).

Peak memory (CPU, no CUDA here): each phase runs in a fresh child process; a thread samples the process's resident
set size (psutil RSS) every 0.5 ms and the peak minus the RSS just before the phase is reported. The children run
with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc serves every tensor above 128 KiB with mmap and returns it on
free: the RSS then follows live tensor memory instead of the allocator's cache. (tracemalloc sees only Python's own
allocator, not torch's tensors, so it cannot measure this.) Phases on all-MiniLM-L6-v2, r = 8, query/value:

* ``LoRA step`` / ``InfLoRA step (task 1 / task 10)``: 3 training steps (AdamW, batch 16 x 96);
* ``begin_task`` / ``end_task`` (statistics pass + design / memory update) over the demo's first task (288 texts, 96
  tokens, batch 16), with the default token budget and with every batch.

Adapter size: ``save_pretrained`` of InfLoRA after T = 1, 2, 5, 10 tasks (begin/end on small random batches) and of
LoRA (its size does not depend on T), with InfLoRA's bytes split by state (past factors, memory bases, ...).

    python benchmarks/bench_memory.py            # about 3 minutes
    python benchmarks/bench_memory.py --quick    # tiny random BERT (seconds)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


PHASES = ["lora_step", "inflora_step_task1", "inflora_step_task10", "begin_task_auto", "begin_task_full",
          "end_task_auto", "end_task_full"]


# ---------------------------------------------------------------------------------------------- child process
class PeakRSS:
    def __init__(self, interval: float = 0.0005) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # pragma: no cover - not glibc
            pass
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta(self) -> int:
        return int(self.peak - self.baseline)


def child(phase: str, quick: bool) -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    length = 16 if quick else 96
    batch = C.random_batch(16, length, seed=1)
    small = [C.random_batch(4, 16, seed=2, labels=False)]
    info: dict = {"phase": phase}
    if phase in ("lora_step", "inflora_step_task1", "inflora_step_task10"):
        if phase == "lora_step":
            model = C.lora_model(C.load_classifier(quick))
        else:
            model = C.inflora_model(C.load_classifier(quick))
            for _ in range(0 if phase.endswith("task1") else 9):
                model.begin_task(small, progress=False)
                model.end_task(small, progress=False)
            model.begin_task(small, progress=False)
        opt = C.optimizer_for(model)
        model.train()
        with PeakRSS() as peak:
            for _ in range(3):
                C.train_step(model, opt, batch)
        info["peak_delta_bytes"] = peak.delta
        return info
    tokenizer, tasks = C.demo_tasks(quick)
    task = tasks[0]
    loader = list(C.task_loader(task.train_dataset, tokenizer, seed=0))
    loader = [{k: v for k, v in b.items() if k != "labels"} for b in loader]
    budget = "auto" if phase.endswith("auto") else None
    model = C.inflora_model(C.load_classifier(quick, num_labels=len(task.label_names)),
                            statistics_max_tokens=budget)
    model.eval()
    with torch.no_grad():
        model(**loader[0])  # first-call allocations (thread pools, caches) before the baseline
    if phase.startswith("end_task"):
        model.begin_task(loader, progress=False)
    with PeakRSS() as peak:
        if phase.startswith("begin_task"):
            model.begin_task(loader, progress=False)
        else:
            model.end_task(loader, progress=False)
    info["peak_delta_bytes"] = peak.delta
    layers = model.base_model.inflora_layers()
    d = next(iter(layers.values())).in_features
    groups = len(layers) // 2  # query and value of a block read one input
    info["accumulator_bytes"] = groups * d * d * 8
    info["batches"] = len(loader)
    return info


def run_child(phase: str, quick: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", phase] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- adapter size
def adapter_sizes(quick: bool) -> dict:
    from safetensors.torch import load_file

    small = [C.random_batch(4, 16, seed=2, labels=False)]
    out = {"inflora": {}, "lora": None}
    with tempfile.TemporaryDirectory() as tmp:
        lora = C.lora_model(C.load_classifier(quick))
        lora.save_pretrained(Path(tmp) / "lora")
        out["lora"] = (Path(tmp) / "lora" / "adapter_model.safetensors").stat().st_size
        model = C.inflora_model(C.load_classifier(quick))
        done = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for T in (1, 2, 5, 10):
                while done < T:
                    model.begin_task([{k: v for k, v in C.random_batch(4, 16, seed=10 + done).items()
                                       if k != "labels"}], progress=False)
                    model.end_task(small, progress=False)
                    done += 1
                path = Path(tmp) / f"inflora_{T}"
                model.save_pretrained(path)
                file = path / "adapter_model.safetensors"
                parts: dict[str, int] = {}
                for key, tensor in load_file(str(file)).items():
                    kind = next((k for k in ("inflora_past_A", "inflora_past_B", "inflora_memory_form",
                                             "inflora_memory", "inflora_task_ranks", "inflora_A", "inflora_B")
                                 if k in key), "modules_to_save (classifier)" if "classifier" in key else "other")
                    parts[kind] = parts.get(kind, 0) + tensor.numel() * tensor.element_size()
                layer = next(iter(model.base_model.inflora_layers().values()))
                memory = layer.get_memory("default")
                out["inflora"][T] = {"file_bytes": file.stat().st_size, "parts": parts,
                                     "memory_dimension_layer0": memory.dimension, "memory_form": memory.form,
                                     "past_rank": int(layer.inflora_past_B["default"].shape[0])}
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    peaks = result["peak_memory"]
    mib = 2 ** 20
    lines = [f"## Memory (bench_memory.py{' --quick' if env['quick'] else ''})", "",
             f"torch {env['torch']}; {env['machine']}. Peak RSS above the RSS just before the phase, fresh process "
             "per phase, MALLOC_MMAP_THRESHOLD_=131072 (see the script's docstring).", "",
             "| phase | peak memory above baseline (bytes) | MiB | / LoRA step |", "|---|---|---|---|"]
    lora = peaks["lora_step"]["peak_delta_bytes"]
    for phase in PHASES:
        b = peaks[phase]["peak_delta_bytes"]
        lines.append(f"| {phase} | {b} | {b / mib:.1f} | {b / lora:.2f} |")
    acc = peaks["begin_task_full"].get("accumulator_bytes")
    lines += ["", f"Covariance accumulators of a statistics pass: {acc} bytes ({acc / mib:.1f} MiB: one float64 "
              "d_in x d_in per input group).", "",
              "| adapter after T tasks | file bytes | / LoRA | past factors | memory bases | current branch "
              "| classifier | memory dims (layer 0, form) |", "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| LoRA (any T) | {result['adapter']['lora']} | 1.00 | | | | | |")
    for T, row in result["adapter"]["inflora"].items():
        parts = row["parts"]
        past = parts.get("inflora_past_A", 0) + parts.get("inflora_past_B", 0)
        mem = parts.get("inflora_memory", 0)
        cur = parts.get("inflora_A", 0) + parts.get("inflora_B", 0)
        lines.append(f"| InfLoRA T={T} | {row['file_bytes']} | {row['file_bytes'] / result['adapter']['lora']:.2f} "
                     f"| {past} | {mem} | {cur} | {parts.get('modules_to_save (classifier)', 0)} "
                     f"| {row['memory_dimension_layer0']} ({row['memory_form']}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=C.hidden_help())
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.quick)))
        return {}
    C.setup(args)
    result = {"peak_memory": {}, "environment": C.environment(args)}
    for phase in PHASES:
        # quick (a smoke run): in this process, to save the children's start-up; the numbers mean little then
        result["peak_memory"][phase] = child(phase, True) if args.quick else run_child(phase, args.quick)
        print(f"{phase}: {result['peak_memory'][phase]['peak_delta_bytes']} bytes", flush=True)
    result["adapter"] = adapter_sizes(args.quick)
    C.write_results(args, "memory", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
