"""Adapter bytes of InfLoRA against PEFT LoRA at the same r, by part, after T = 1, 5 and 10 tasks; what a 16-bit memory
basis costs in leakage; what 16-bit past factors would cost in output error.

1. MiniLM (all-MiniLM-L6-v2, offline), r = 8, query/value + the classifier head (``modules_to_save``), as
   bench_memory.py. Ten tasks of random token batches (4 x 8 x 32 tokens each, fresh per task) with a small random
   ``A_t`` standing in for training (sizes do not depend on the values). The same model is saved after T = 1, 5, 10
   in four layouts: ``per-layer`` (the release before: one copy per layer, PEFT's own selection), ``shared`` (one
   copy per input group, float32 memory: the default), ``shared + bf16 memory``, ``shared + fp16 memory``. Bytes
   are read from the files, split by part; ``header`` is the safetensors JSON header.
2. The floor: past_A alone is ``d_out x R`` per layer (``R = T r``), ``T / 2`` times LoRA's ``r (d_in + d_out)``
   per layer when ``d_in = d_out``, so at T = 10 the exact float32 past factors cannot fit in 5x LoRA. What would:
   past factors in bf16; their output error is measured here (the logits of the model with ``past_A``, ``past_B``
   rounded to bf16 against the float32 ones, relative to what the adapter changes), not offered as an option.
3. Leakage of a 16-bit memory (T = 5 and 10): the basis saved in bf16 / fp16 and re-orthonormalised on load against
   the exact one: orthonormality error, ``||Q_loaded - Q_exact||_2`` against the bound of
   :func:`peft_inflora.storage.subspace_error_bound`, and ``interference_report`` leakage of the next task's design
   on the first task's inputs, from the exact and from the loaded memory.
4. A Llama-7B-shaped stack (d = 4096, 32 blocks; q/v = 64 adapted layers as LoRA's default, and q/k/v/o = 128):
   bytes from the analytic formula (:func:`analytic_bytes`) for stored memory columns 512 and 2048 (DualGPM stores at
   most d / 2). The formula is checked against real files: a scaled-down stack (d = 96, 4 blocks of q/k/v/o linears
   where q, k, v read one input) driven by random inputs through 10 tasks, saved after T = 1, 5, 10; the formula
   from the layers' shapes, ranks and memory columns must equal the file's tensor bytes exactly (file size = that +
   the header).

    python benchmarks/bench_adapter_size.py --threads 1          # about 2 minutes
    python benchmarks/bench_adapter_size.py --quick --threads 1  # tiny random BERT (seconds)
"""

from __future__ import annotations

import copy
import json
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


TASKS = (1, 5, 10)
LAYOUTS = ("per-layer", "shared", "shared + bf16 memory", "shared + fp16 memory")
PARTS = ("inflora_past_A", "inflora_past_B", "inflora_memory", "inflora_A", "inflora_B", "classifier", "small",
         "header")


# ---------------------------------------------------------------------------------------------- file reading
def file_parts(file: Path) -> dict[str, int]:
    """Bytes of a safetensors file by part (tensor data from the header's offsets, and the header itself)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    parts = dict.fromkeys(PARTS, 0)
    parts["header"] = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        state = key.rsplit(".", 1)[-1]
        kind = state if state in PARTS else "classifier" if "classifier" in key else "small"
        parts[kind] += size
    parts["file"] = len(raw)
    return parts


def save(model, folder: Path, layout: str) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTuner

    from peft_inflora.model import InfLoRAModel

    config = model.peft_config["default"]
    config.memory_storage_dtype = {"shared + bf16 memory": "bfloat16", "shared + fp16 memory": "float16"}.get(
        layout, "float32")
    if layout == "per-layer":  # the release before shared storage: PEFT's own selection
        own = InfLoRAModel._get_adapter_state_dict
        InfLoRAModel._get_adapter_state_dict = classmethod(BaseTuner._get_adapter_state_dict.__func__)
        try:
            model.save_pretrained(folder)
        finally:
            InfLoRAModel._get_adapter_state_dict = own
    else:
        model.save_pretrained(folder)
    config.memory_storage_dtype = "float32"
    return file_parts(folder / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------- MiniLM
def task_batches(seed: int, quick: bool) -> list[dict]:
    n, length = (2, 16) if quick else (4, 32)
    return [{k: v for k, v in C.random_batch(8, length, seed=1000 * seed + i).items() if k != "labels"}
            for i in range(n)]


def fake_training(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in model.base_model.inflora_layers().values():
        a = layer.inflora_A["default"]
        a.data = 0.02 * torch.randn(a.shape, generator=g)


def logits(model, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in data]).double()


def projector_gap(exact, loaded) -> float:
    return float(torch.linalg.matrix_norm(exact.projector() - loaded.projector(), ord=2))


def leakage_of_loaded_memory(model, folder: Path, old: list[dict], new: list[dict], quick: bool) -> dict:
    """Load ``folder`` (a 16-bit memory), compare its memory with the model's exact one, and the interference of the
    next task's design from each on ``old``."""
    from peft import PeftModel

    from peft_inflora.storage import MEMORY_STORAGE_DTYPES, subspace_error_bound

    loaded = PeftModel.from_pretrained(C.load_classifier(quick), folder).eval()
    dtype = MEMORY_STORAGE_DTYPES[json.loads((folder / "adapter_config.json").read_text())["memory_storage_dtype"]]
    exact_layers, loaded_layers = model.base_model.inflora_layers(), loaded.base_model.inflora_layers()
    rows = []
    for name, layer in loaded_layers.items():
        basis = layer.inflora_memory["default"].double()
        exact, got = exact_layers[name].get_memory("default"), layer.get_memory("default")
        rows.append({"layer": name, "stored_columns": int(basis.shape[1]),
                     "orthonormality": float((basis.T @ basis - torch.eye(basis.shape[1], dtype=torch.float64))
                                             .abs().max()) if basis.shape[1] else 0.0,
                     "projector_gap": projector_gap(exact, got),
                     "bound": subspace_error_bound(exact.d_in, int(basis.shape[1]), dtype)})
    ref = copy.deepcopy(model)
    ref.begin_task(new, progress=False)
    loaded.begin_task(new, progress=False)
    leak_exact = {r.layers[0]: r.leakage for r in ref.interference_report(old)}
    leak_loaded = {r.layers[0]: r.leakage for r in loaded.interference_report(old)}
    return {"layers": rows,
            "max_orthonormality": max(r["orthonormality"] for r in rows),
            "max_projector_gap": max(r["projector_gap"] for r in rows),
            "min_bound": min(r["bound"] for r in rows),
            "gap_within_bound": all(r["projector_gap"] <= r["bound"] for r in rows),
            "max_leakage_exact_memory": max(leak_exact.values()),
            "max_leakage_loaded_memory": max(leak_loaded.values()),
            "max_leakage_increase": max(leak_loaded[k] - leak_exact[k] for k in leak_exact)}


def bf16_past_cost(model, probe: list[dict]) -> dict:
    """Output error of rounding every past_A and past_B to bf16: logits against the float32 adapter."""
    layers = model.base_model.inflora_layers()
    full = logits(model, probe)
    with model.disable_adapter():
        base = logits(model, probe)
    kept = {n: (layer.inflora_past_A["default"], layer.inflora_past_B["default"]) for n, layer in layers.items()}
    weight_errors = []
    try:
        for n, layer in layers.items():
            a, b = kept[n]
            a16, b16 = a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()
            layer.inflora_past_A["default"], layer.inflora_past_B["default"] = a16, b16
            dw = a.double() @ b.double()
            weight_errors.append(float(torch.linalg.norm(a16.double() @ b16.double() - dw) / torch.linalg.norm(dw)))
        rounded = logits(model, probe)
    finally:
        for n, layer in layers.items():
            layer.inflora_past_A["default"], layer.inflora_past_B["default"] = kept[n]
    return {"max_relative_delta_w_error": max(weight_errors),
            "logits_error_relative_to_adapter_change": float(torch.linalg.norm(rounded - full)
                                                             / torch.linalg.norm(full - base)),
            "logits_error_relative_to_logits": float(torch.linalg.norm(rounded - full) / torch.linalg.norm(full)),
            "max_abs_logit_error": float((rounded - full).abs().max()),
            "argmax_agreement": float((rounded.argmax(-1) == full.argmax(-1)).double().mean())}


def minilm(quick: bool) -> dict:
    out: dict = {"lora": None, "inflora": {}, "leakage": {}, "bf16_past": {}}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(tmp)
        lora = C.lora_model(C.load_classifier(quick))
        lora.save_pretrained(tmp / "lora")
        out["lora"] = file_parts(tmp / "lora" / "adapter_model.safetensors")
        model = C.inflora_model(C.load_classifier(quick)).eval()
        probe = [{k: v for k, v in C.random_batch(8, 32, seed=99).items() if k != "labels"}]
        first = task_batches(0, quick)
        done = 0
        for T in TASKS:
            while done < T:
                model.begin_task(task_batches(done, quick), progress=False)
                fake_training(model, done)
                model.end_task(task_batches(done, quick), progress=False)
                done += 1
            rows = {}
            for i, layout in enumerate(LAYOUTS):
                rows[layout] = save(model, tmp / f"T{T}_{i}", layout)
            layer = next(iter(model.base_model.inflora_layers().values()))
            memory = layer.get_memory("default")
            out["inflora"][T] = {"layouts": rows, "memory_dimension_layer0": memory.dimension,
                                 "memory_form": memory.form,
                                 "stored_memory_columns": [int(m.inflora_memory["default"].shape[1]) for m in
                                                           model.base_model.inflora_layers().values()],
                                 "past_rank": int(layer.inflora_past_B["default"].shape[0])}
            if T in (5, 10):
                nxt = task_batches(100 + T, quick)
                out["leakage"][T] = {layout: leakage_of_loaded_memory(model, tmp / f"T{T}_{i}", first, nxt, quick)
                                     for i, layout in enumerate(LAYOUTS) if "16 memory" in layout}
            out["bf16_past"][T] = bf16_past_cost(model, probe)
            print(f"MiniLM T={T}: " + ", ".join(f"{k} {v['file']}" for k, v in rows.items()), flush=True)
    return out


# ---------------------------------------------------------------------------------------------- Llama-shaped stack
class Block(nn.Module):
    """q/k/v/o projections of one attention block: q, k and v read the same input tensor, o its own."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q_proj(x) + self.k_proj(x) + self.v_proj(x)
        return x + self.o_proj(torch.tanh(h))


class Stack(nn.Module):
    def __init__(self, d: int, blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def analytic_bytes(layers: list[dict], groups: list[dict], tasks: int, memory_bytes: int = 4,
                   factor_bytes: int = 4) -> dict[str, int]:
    """Tensor bytes of a saved InfLoRA adapter with no task in progress (shared layout).

    ``layers``: per adapted layer ``d_out``, ``R`` (sum of its task ranks) and ``source`` (name-length in bytes of the
    layer holding its group's past_B / memory, or None when it holds them itself: the group's first layer).
    ``groups``: per input group ``d_in``, ``R`` and ``stored_columns`` of the memory. Per layer: past_A
    ``d_out R``, task_ranks ``8 T``, energy_thresholds ``4 T``, memory_form 8, empty A / B 0; per group past_B
    ``R d_in`` and memory ``d_in k`` once; each other layer of a group: two uint8 names (past_B and memory sources).
    """
    parts = dict.fromkeys(("inflora_past_A", "inflora_past_B", "inflora_memory", "small"), 0)
    for layer in layers:
        parts["inflora_past_A"] += layer["d_out"] * layer["R"] * factor_bytes
        parts["small"] += 8 * tasks + 4 * tasks + 8
        if layer["source"] is not None:
            parts["small"] += 2 * layer["source"]
    for group in groups:
        parts["inflora_past_B"] += group["R"] * group["d_in"] * factor_bytes
        parts["inflora_memory"] += group["d_in"] * group["stored_columns"] * memory_bytes
    parts["total"] = sum(parts.values())
    return parts


def lora_bytes(shapes: list[tuple[int, int]], r: int) -> int:
    return sum(r * (d_in + d_out) * 4 for d_in, d_out in shapes)


def layout_of(model, group_leaders: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """The formula's inputs read off a model's layers (shapes, ranks, memory columns) and its grouping."""
    layers, groups = [], []
    for name, layer in model.base_model.inflora_layers().items():
        leader = group_leaders[name]
        R = int(layer.inflora_past_A["default"].shape[1])
        layers.append({"d_out": layer.out_features, "R": R,
                       "source": None if leader == name else len(leader.encode())})
        if leader == name:
            groups.append({"d_in": layer.in_features, "R": R,
                           "stored_columns": int(layer.inflora_memory["default"].shape[1])})
    return layers, groups


def verify_stack(quick: bool) -> list[dict]:
    from peft import get_peft_model

    from peft_inflora import InfLoRAConfig

    d, blocks, r = (32, 2, 2) if quick else (96, 4, 4)
    rows = []
    for targets in (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]):
        torch.manual_seed(0)
        model = get_peft_model(Stack(d, blocks), InfLoRAConfig(r=r, target_modules=targets,
                                                                statistics_max_tokens=None, energy_threshold=0.9,
                                                                total_tasks=10, adaptive_threshold=True))
        leaders = {}
        for name in model.base_model.inflora_layers():
            block, proj = name.rsplit(".", 1)
            leaders[name] = name if proj == "o_proj" else f"{block}.{[t for t in targets if t != 'o_proj'][0]}"
        g = torch.Generator().manual_seed(1)
        done = 0
        with tempfile.TemporaryDirectory() as tmp:
            for T in TASKS:
                while done < T:
                    # each task's inputs span a fresh random d/16-dim subspace: the q/k/v memory grows past d / 2
                    # (DualGPM then stores the complement); adaptive_threshold leaves o_proj room for every task
                    basis = torch.linalg.qr(torch.randn(d, d // 16, generator=g))[0]
                    data = [{"x": torch.randn(64, d // 16, generator=g) @ basis.T} for _ in range(2)]
                    model.begin_task(data, progress=False)
                    fake_training(model, done)
                    model.end_task(data, progress=False)
                    done += 1
                model.save_pretrained(Path(tmp) / f"T{T}")
                parts = file_parts(Path(tmp) / f"T{T}" / "adapter_model.safetensors")
                layers, groups = layout_of(model, leaders)
                formula = analytic_bytes(layers, groups, T)
                tensor_bytes = parts["file"] - parts["header"]
                rows.append({"targets": "/".join(t.split("_")[0] for t in targets), "d": d, "blocks": blocks,
                             "r": r, "T": T, "file_bytes": parts["file"], "header_bytes": parts["header"],
                             "tensor_bytes": tensor_bytes, "formula_bytes": formula["total"],
                             "equal": tensor_bytes == formula["total"],
                             "stored_columns": [g_["stored_columns"] for g_ in groups]})
    return rows


def llama_7b(r: int = 8) -> list[dict]:
    d, blocks = 4096, 32
    rows = []
    for targets, per_block in (("q/v", ["q", "v"]), ("q/k/v/o", ["q", "k", "v", "o"])):
        shapes = [(d, d)] * (blocks * len(per_block))
        lora = lora_bytes(shapes, r)
        name = len(b"model.layers.31.self_attn.q_proj")  # the longest source name (bytes), for the small keys
        for T in TASKS:
            R = T * r
            for k in (512, 2048):
                for memory_bytes, label in ((4, "float32"), (2, "bfloat16")):
                    layers, groups = [], []
                    for _ in range(blocks):
                        qkv = [p for p in per_block if p != "o"]
                        for i, _p in enumerate(qkv):
                            layers.append({"d_out": d, "R": R, "source": None if i == 0 else name})
                        groups.append({"d_in": d, "R": R, "stored_columns": k})
                        if "o" in per_block:
                            layers.append({"d_out": d, "R": R, "source": None})
                            groups.append({"d_in": d, "R": R, "stored_columns": k})
                    shared = analytic_bytes(layers, groups, T, memory_bytes)
                    per_layer = analytic_bytes([dict(x, source=None) for x in layers],
                                               [{"d_in": d, "R": R, "stored_columns": k}] * len(layers), T,
                                               memory_bytes)
                    rows.append({"targets": targets, "layers": len(layers), "groups": len(groups), "T": T,
                                 "stored_columns": k, "memory_dtype": label, "lora_bytes": lora,
                                 "shared": shared, "per_layer_total": per_layer["total"],
                                 "ratio_shared": shared["total"] / lora, "ratio_per_layer": per_layer["total"] / lora})
    return rows


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    m = result["minilm"]
    lora = m["lora"]["file"]
    lines = [f"## Adapter size (bench_adapter_size.py{' --quick' if result['environment']['quick'] else ''})", "",
             f"MiniLM, r = 8, query/value + classifier. LoRA file: {lora} bytes "
             f"({m['lora']['header']} of them header).", "",
             "| T | layout | file bytes | / LoRA | past_A | past_B | memory | classifier | small | header |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for T, row in m["inflora"].items():
        for layout, p in row["layouts"].items():
            lines.append(f"| {T} | {layout} | {p['file']} | {p['file'] / lora:.2f} | {p['inflora_past_A']} | "
                         f"{p['inflora_past_B']} | {p['inflora_memory']} | {p['classifier']} | {p['small']} | "
                         f"{p['header']} |")
    lines += ["", "Memory columns stored per layer at T = 10: "
              f"{m['inflora'][max(m['inflora'])]['stored_memory_columns']}.", "",
              "16-bit past factors (not an option; measured by rounding past_A, past_B in the live model):", "",
              "| T | bytes if past factors were bf16 (shared, f32 memory) | / LoRA | max rel. dW error "
              "| logits error / adapter change | max abs logit error | argmax agreement |",
              "|---|---|---|---|---|---|---|"]
    for T, cost in m["bf16_past"].items():
        p = m["inflora"][T]["layouts"]["shared"]
        halved = p["file"] - (p["inflora_past_A"] + p["inflora_past_B"]) // 2
        lines.append(f"| {T} | {halved} | {halved / lora:.2f} | {cost['max_relative_delta_w_error']:.2e} | "
                     f"{cost['logits_error_relative_to_adapter_change']:.2e} | {cost['max_abs_logit_error']:.2e} | "
                     f"{cost['argmax_agreement']:.3f} |")
    lines += ["", "16-bit memory, re-orthonormalised on load (per layer max; leakage = interference_report of the "
              "next task's design on task 1's inputs; gap = spectral norm of Q_loaded - Q_exact):", "",
              "| T | memory | max orthonormality error | max gap | smallest bound | within bound "
              "| max leakage (exact memory) | max leakage (loaded) | max increase |",
              "|---|---|---|---|---|---|---|---|---|"]
    for T, rows in m["leakage"].items():
        for layout, x in rows.items():
            lines.append(f"| {T} | {layout.split('+ ')[1]} | {x['max_orthonormality']:.1e} | "
                         f"{x['max_projector_gap']:.2e} | {x['min_bound']:.2e} | {x['gap_within_bound']} | "
                         f"{x['max_leakage_exact_memory']:.2e} | {x['max_leakage_loaded_memory']:.2e} | "
                         f"{x['max_leakage_increase']:.2e} |")
    lines += ["", "Analytic formula against saved files (scaled-down stack, tensor bytes = file - header):", "",
              "| targets | d | blocks | r | T | file bytes | header | tensor bytes | formula | equal | stored memory "
              "columns per group |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in result["stack_check"]:
        lines.append(f"| {x['targets']} | {x['d']} | {x['blocks']} | {x['r']} | {x['T']} | {x['file_bytes']} | "
                     f"{x['header_bytes']} | {x['tensor_bytes']} | {x['formula_bytes']} | {x['equal']} | "
                     f"{x['stored_columns']} |")
    mib = 2 ** 20
    lines += ["", "Llama-7B-shaped stack (d = 4096, 32 blocks, r = 8; analytic, headers left out), MiB:", "",
              "| targets | layers / groups | T | memory columns stored | memory dtype | LoRA | InfLoRA shared "
              "| past_A | past_B | memory | / LoRA | per-layer copies / LoRA |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in result["llama_7b"]:
        s = x["shared"]
        lines.append(f"| {x['targets']} | {x['layers']} / {x['groups']} | {x['T']} | {x['stored_columns']} | "
                     f"{x['memory_dtype']} | {x['lora_bytes'] / mib:.1f} | {s['total'] / mib:.1f} | "
                     f"{s['inflora_past_A'] / mib:.1f} | {s['inflora_past_B'] / mib:.1f} | "
                     f"{s['inflora_memory'] / mib:.1f} | {x['ratio_shared']:.1f} | {x['ratio_per_layer']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    C.setup(args)
    result = {"minilm": minilm(args.quick), "stack_check": verify_stack(args.quick), "llama_7b": llama_7b()}
    result["environment"] = C.environment(args)
    C.write_results(args, "adapter_size", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
