"""Class-incremental heads for InfLoRA on the demo's four text tasks (GitHub issue 14, research).

The backbone runs as in bench_quality.py (all-MiniLM-L6-v2, r = 8 on query/value, lr 2e-3, 3 epochs, batch 16,
``peft_inflora.ContinualTrainer`` with the paper's task-local loss). A subclass of the trainer records, after every
task, the features the head reads (its input, by a forward pre-hook) from three passes:

* ``endtask``: inside ``end_task``'s statistics pass (the batches the default ``statistics_max_tokens="auto"``
  reads: about an eighth of them), eval mode, the task's final model: no extra forward;
* ``full``: an extra eval-mode pass over all of the task's training data;
* ``lastepoch``: the forwards of the last training epoch (train mode, so dropout on, the model still moving);

and the test features of every task seen so far (inside the evaluation's own forwards).

Head methods that only change the head after a task (the authors' classifier alignment, LDA, logit adjustment)
do not change how the backbone trains: the task-local loss reads only the new task's logits, whose rows the next
task's training starts from independently of the old rows (frozen). So they are evaluated offline, on one backbone
run per seed, from the recorded features (``--methods``; exact, not an approximation: see ``online_ca``).
Methods that change training (old-class pseudo-features as negatives, a cosine head) are separate backbone runs
(``--train``). ``--train online_ca`` runs the authors' alignment inside the trainer after every task: its
matrix must equal the offline evaluation of "CA authors [full]" on the ``base`` run of the same seed.

    python benchmarks/bench_heads.py --train base --backbone inflora --seeds 0,1,2     # backbone runs + dumps
    python benchmarks/bench_heads.py --analyze --backbone inflora --seeds 0,1,2        # offline head methods
    python benchmarks/bench_heads.py --quick                                            # smoke run
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_quality as Q  # noqa: E402

from peft_inflora import ContinualTrainer  # noqa: E402
from peft_inflora.continual.alignment import (  # noqa: E402
    ClassFeatureAccumulator,
    ClassStatistics,
    HeadInputRecorder,
    align_classifier,
    storage_bytes,
)
from peft_inflora.continual.heads import find_head  # noqa: E402
from peft_inflora.continual.metrics import (  # noqa: E402
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
)


SOURCES = ("endtask", "full", "lastepoch")


class FeatureList:
    """Duck-typed accumulator for :class:`HeadInputRecorder` that keeps the raw rows (float32) and labels."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.x.append(features.detach().float().cpu())
        self.y.append(torch.as_tensor(labels).reshape(-1).cpu())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.x), torch.cat(self.y)


def accumulate(x: torch.Tensor, y: torch.Tensor, dim: int) -> ClassFeatureAccumulator:
    acc = ClassFeatureAccumulator(dim)
    acc.update(x, y)
    return acc


class GaussianSampler:
    """Draws of every stored class's Gaussian (full covariance + ridge 1e-4, shrinkage ``a``), Cholesky once."""

    def __init__(self, stats: ClassStatistics, shrinkage: float = 0.0) -> None:
        self.means = stats.means.double()
        self.classes = stats.classes
        self.chols = []
        for i in range(len(stats)):
            cov = stats.covariance(i)
            cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / stats.dim * torch.eye(stats.dim,
                                                                                               dtype=cov.dtype)
            self.chols.append(torch.linalg.cholesky(cov + 1e-4 * torch.eye(stats.dim, dtype=cov.dtype)))

    def sample(self, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [m + torch.randn(per_class, m.numel(), dtype=torch.float64, generator=generator) @ L.T
              for m, L in zip(self.means, self.chols)]
        return torch.cat(xs).float(), self.classes.repeat_interleave(per_class)


class HeadStudyTrainer(ContinualTrainer):
    """ContinualTrainer that records head inputs after each task (see the module docstring) and, optionally,
    trains with old-class pseudo-features (``pseudo``) or a cosine head (``cosine``)."""

    def __init__(self, *args, variant: str = "base", seed: int = 0, pseudo_source: str = "full",
                 cosine_scale: float = 16.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.variant, self.seed, self.pseudo_source, self.cosine_scale = variant, seed, pseudo_source, cosine_scale
        self.dumps: list[dict] = []
        self._last_seen = -1
        self._epoch_features = FeatureList()
        self._endtask_features = FeatureList()
        self._stats: ClassStatistics | None = None
        self._sampler: GaussianSampler | None = None
        self._generator = torch.Generator().manual_seed(10_000 + seed)
        head = find_head(self.peft_model)[1]
        self._train_recorder = HeadInputRecorder(head, self._epoch_features)
        self._train_recorder.__enter__()  # records only when set_labels was called (the last epoch's forwards)
        if variant == "cosine":
            head.register_forward_hook(self._cosine_logits)
        self._head_input: torch.Tensor | None = None
        head.register_forward_pre_hook(lambda module, args: setattr(self, "_head_input", args[0]))
        if self.is_inflora:  # piggyback on end_task's statistics pass
            peft_model = self.peft_model
            original = peft_model.base_model.end_task

            def end_task(batches, *a, **k):
                with HeadInputRecorder(find_head(self.peft_model)[1], self._endtask_features) as recorder:
                    return original(recorder.track(batches), *a, **k)

            peft_model.end_task = end_task

    def _cosine_logits(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.cosine_scale * F.linear(F.normalize(args[0], dim=-1), F.normalize(module.weight, dim=-1))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._task_classes is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        last_epoch = self.state.epoch is not None and self.state.epoch >= self.args.num_train_epochs - 1 - 1e-9
        self._train_recorder.set_labels(inputs["labels"] if last_epoch else None)
        if self.variant not in ("pseudo", "pseudo_detached") or self._sampler is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.variant == "pseudo_detached":
            # the paper's task-local loss trains backbone and new rows; a head-only loss over every seen class on
            # the batch's (detached) features and old-class pseudo-features calibrates the new rows against the old
            lo, hi = self._task_classes
            labels = inputs["labels"]
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            features = self._head_input.detach()
            per_class = max(1, math.ceil(labels.numel() / (hi - lo)))
            px, py = self._sampler.sample(per_class, self._generator)
            head = find_head(self.peft_model)[1]
            calib = head(torch.cat([features, px.to(features.device, features.dtype)]))[:, :hi]
            loss = loss + F.cross_entropy(calib.float(), torch.cat([labels, py.to(labels.device)]))
            return (loss, outputs) if return_outputs else loss
        # old-class pseudo-features as negatives: cross-entropy over every seen class on the real batch and on as
        # many Gaussian draws per old class as the batch holds per new class
        lo, hi = self._task_classes
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        per_class = max(1, math.ceil(labels.numel() / (hi - lo)))
        px, py = self._sampler.sample(per_class, self._generator)
        head = find_head(self.peft_model)[1]
        plogits = head(px.to(logits.device, logits.dtype))
        all_logits = torch.cat([logits[:, :hi].float(), plogits[:, :hi].float()])
        loss = F.cross_entropy(all_logits, torch.cat([labels, py.to(labels.device)]))
        return (loss, outputs) if return_outputs else loss

    def prepare_train_dataset(self, dataset, task):
        self._task_train = dataset  # with global labels: the "full" pass of _record_task reads it
        return super().prepare_train_dataset(dataset, task)

    def _predict(self, j, references):
        """The trainer's prediction of task ``j`` in the row after the latest task, with its test features."""
        seen = len(self.continual_tasks) - 1
        if seen != self._last_seen:
            self._last_seen = seen
            self._record_task(seen)
        test = FeatureList()
        with HeadInputRecorder(find_head(self.peft_model)[1], test) as recorder:
            original = self.prediction_step

            def step(model, inputs, *a, **k):
                recorder.set_labels(inputs["labels"])
                return original(model, inputs, *a, **k)

            self.prediction_step = step
            try:
                output = super()._predict(j, references)
            finally:
                del self.prediction_step
        self.dumps[seen]["test"].append(test.tensors())
        return output

    def _score(self, j, seen, output, references):
        accuracy = super()._score(j, seen, output, references)
        self.dumps[seen]["trainer_accuracy"].append(accuracy)
        return accuracy

    def _record_task(self, index: int) -> None:
        """After task ``index``'s end_task: the head, and the three feature sources of its training data."""
        head = find_head(self.peft_model)[1]
        full = FeatureList()
        with HeadInputRecorder(head, full) as recorder:
            original = self.prediction_step

            def step(model, inputs, *a, **k):
                recorder.set_labels(inputs["labels"])
                return original(model, inputs, *a, **k)

            self.prediction_step = step
            t0 = time.perf_counter()
            try:
                self.predict(self._task_train, metric_key_prefix="features")
            finally:
                del self.prediction_step
            full_seconds = time.perf_counter() - t0
        sources = {"full": full.tensors(), "lastepoch": self._epoch_features.tensors()}
        if self._endtask_features.x:
            sources["endtask"] = self._endtask_features.tensors()
        self._epoch_features.x.clear(), self._epoch_features.y.clear()
        self._endtask_features.x.clear(), self._endtask_features.y.clear()
        self.dumps.append({"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(),
                           "classes": self._class_ranges[index], "sources": sources, "test": [],
                           "trainer_accuracy": [], "full_pass_seconds": full_seconds})
        if self.variant in ("pseudo", "pseudo_detached", "online_ca"):
            if self._stats is None:
                self._stats = ClassStatistics(head.in_features, "full")
            x, y = sources[self.pseudo_source]
            self._stats.add_task(accumulate(x, y, head.in_features), index)
        if self.variant in ("pseudo", "pseudo_detached"):
            self._sampler = GaussianSampler(self._stats)
        if self.variant == "online_ca" and index > 0:  # the parity check of the offline evaluation
            align_classifier(head, self._stats, mean_decay=True, logit_temperature=0.1, seed=1000 * self.seed + index)


def make_model(args, seed: int, num_labels: int, n_tasks: int):
    """bench_quality's models, except that the head (and LoRA's A) initialisation follows the seed too."""
    from peft import get_peft_model

    from peft_inflora import InfLoRAConfig

    base = C.load_classifier(args.quick, num_labels=num_labels, seed=seed)  # torch.manual_seed(seed), then the head
    if args.backbone == "inflora":
        return get_peft_model(base, InfLoRAConfig(r=args.r, target_modules=C.TARGETS, modules_to_save=["classifier"],
                                                  energy_threshold=0.95, total_tasks=n_tasks, random_seed=seed))
    return C.lora_model(base, r=args.r)


def train_runs(args, tasks, tokenizer) -> None:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for variant in [v.strip() for v in args.train.split(",") if v.strip()]:
        for seed in seeds_of(args):
            model = make_model(args, seed, sum(len(t.label_names) for t in tasks), len(tasks))
            from transformers import DataCollatorWithPadding

            with tempfile.TemporaryDirectory() as tmp:
                trainer = HeadStudyTrainer(model=model, args=Q.training_args(tmp, args.quick, seed),
                                           processing_class=tokenizer,
                                           data_collator=DataCollatorWithPadding(tokenizer), variant=variant,
                                           seed=seed, pseudo_source=args.pseudo_source)
                t0 = time.perf_counter()
                result = trainer.train_continual(tasks)
                seconds = time.perf_counter() - t0
            suffix = f"_{args.pseudo_source}" if variant in ("pseudo", "pseudo_detached", "online_ca") else ""
            name = f"{args.backbone}_{variant}{suffix}"
            torch.save({"dumps": trainer.dumps, "matrix": result.accuracy_matrix, "seconds": seconds,
                        "task_names": result.task_names, "variant": variant}, cache / f"{name}_seed{seed}.pt")
            print(f"{name} seed {seed}: {result.metrics()} ({seconds:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------- offline heads
def accuracy_row(logits_fn, dump: dict) -> list[float]:
    hi = dump["classes"][1]
    # exact k / N in float64, as the trainer's accuracy metric computes it
    return [int((logits_fn(x)[:, :hi].argmax(-1) == y).sum()) / len(y) for x, y in dump["test"]]


def linear(weight: torch.Tensor, bias: torch.Tensor):
    return lambda x: x @ weight.T + bias


def cosine(weight: torch.Tensor, scale: float = 16.0):
    return lambda x: scale * F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).T


def lda_head(stats: ClassStatistics, shrinkage: float, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Gaussian classifier with the pooled within-class covariance, shrunk towards ``tr/d I``:
    ``w_c = S^-1 mu_c``, ``b_c = -mu_c^T S^-1 mu_c / 2 + log(n_c / N)``."""
    d = stats.dim
    if stats.storage == "shared":
        pooled = stats.covariance(0)
    else:
        dof = (stats.counts - 1).clamp_min(0)
        pooled = sum(dof[i] * stats.covariance(i) for i in range(len(stats))) / dof.sum()
    pooled = (1 - shrinkage) * pooled + shrinkage * torch.trace(pooled) / d * torch.eye(d, dtype=torch.float64)
    pooled = pooled + 1e-6 * torch.eye(d, dtype=torch.float64)
    means = stats.means.double()
    w = torch.linalg.solve(pooled, means.T).T
    b = -0.5 * (w * means).sum(-1) + torch.log(stats.counts / stats.counts.sum())
    weight, bias = torch.zeros(num_rows, d, dtype=torch.float64), torch.full((num_rows,), -1e9, dtype=torch.float64)
    weight[stats.classes], bias[stats.classes] = w, b
    return weight.float(), bias.float()


def head_methods(source: str) -> dict[str, dict]:
    s = f" [{source}]"
    return {
        f"CA authors (decay, norm 0.1){s}": dict(kind="ca", mean_decay=True, logit_temperature=0.1),
        f"CA plain (no decay, no norm){s}": dict(kind="ca", mean_decay=False, logit_temperature=None),
        f"CA plain + shrinkage 0.5{s}": dict(kind="ca", mean_decay=False, logit_temperature=None, shrinkage=0.5),
        f"CA authors + shrinkage 0.5{s}": dict(kind="ca", mean_decay=True, logit_temperature=0.1, shrinkage=0.5),
        f"CA plain, shared cov{s}": dict(kind="ca", storage="shared", mean_decay=False, logit_temperature=None),
        f"CA plain, lowrank 16{s}": dict(kind="ca", storage="lowrank", rank=16, mean_decay=False,
                                         logit_temperature=None),
        f"CA new task's rows only (plain){s}": dict(kind="ca", mean_decay=False, logit_temperature=None,
                                                    new_only=True),
        f"CA new task's rows only (norm 0.1){s}": dict(kind="ca", mean_decay=False, logit_temperature=0.1,
                                                       new_only=True),
        f"CA new task's rows only (norm 0.1), shared cov{s}": dict(kind="ca", mean_decay=False,
                                                                   logit_temperature=0.1, new_only=True,
                                                                   storage="shared"),
        f"CA new task's rows only (norm 0.1), lowrank 16{s}": dict(kind="ca", mean_decay=False,
                                                                   logit_temperature=0.1, new_only=True,
                                                                   storage="lowrank", rank=16),
        f"CA norm 0.1, no decay{s}": dict(kind="ca", mean_decay=False, logit_temperature=0.1),
        f"CA authors, shared cov{s}": dict(kind="ca", mean_decay=True, logit_temperature=0.1, storage="shared"),
        f"CA authors, lowrank 16{s}": dict(kind="ca", mean_decay=True, logit_temperature=0.1, storage="lowrank",
                                           rank=16),
        f"NCM (cosine to class means){s}": dict(kind="ncm"),
        f"LDA shrinkage 0.1{s}": dict(kind="lda", shrinkage=0.1),
        f"LDA shrinkage 0.5{s}": dict(kind="lda", shrinkage=0.5),
        f"LDA shrinkage 0.5, lowrank 16{s}": dict(kind="lda", shrinkage=0.5, storage="lowrank", rank=16),
        f"logit adjustment by counts{s}": dict(kind="la"),
    }


def simulate(run: dict, method: dict, source: str, seed: int, head_kind: str) -> list[list[float]]:
    """The accuracy matrix of ``method`` applied after every task of a recorded run."""
    dumps = run["dumps"]
    d = dumps[0]["weight"].shape[1]
    rows_n = dumps[0]["weight"].shape[0]
    stats = ClassStatistics(d, method.get("storage", "full"), rank=method.get("rank"))
    head = nn.Linear(d, rows_n)
    matrix = []
    for t, dump in enumerate(dumps):
        lo, hi = dump["classes"]
        x, y = dump["sources"][source]
        stats.add_task(accumulate(x, y, d), t)
        with torch.no_grad():  # the new task's rows as trained; old rows as the method left them
            head.weight[lo:hi], head.bias[lo:hi] = dump["weight"][lo:hi], dump["bias"][lo:hi]
            if t == 0:
                head.weight.copy_(dump["weight"]), head.bias.copy_(dump["bias"])
        if method["kind"] == "ca":
            if t > 0:  # the authors align from the second task on
                align_classifier(head, stats, mean_decay=method["mean_decay"],
                                 logit_temperature=method["logit_temperature"],
                                 shrinkage=method.get("shrinkage", 0.0), seed=1000 * seed + t,
                                 trainable_tasks=[t] if method.get("new_only") else None)
            fn = linear(head.weight.detach(), head.bias.detach())
        elif method["kind"] == "ncm":
            means = torch.zeros(rows_n, d)
            means[stats.classes] = stats.means.float()
            fn = cosine(means)
        elif method["kind"] == "lda":
            fn = linear(*lda_head(stats, method["shrinkage"], rows_n))
        else:  # logit adjustment: logits - log prior from the stored counts (tau = 1)
            prior = torch.zeros(rows_n)
            prior[stats.classes] = (stats.counts / stats.counts.sum()).float()
            base = cosine(dump["weight"]) if head_kind == "cosine" else linear(dump["weight"], dump["bias"])
            fn = (lambda b, p: (lambda z: b(z) - torch.log(p.clamp_min(1e-12))))(base, prior)
        matrix.append(accuracy_row(fn, dump))
    return matrix


def summarize(matrices: list[list[list[float]]]) -> dict:
    out = {}
    for name, fn in [("A_T", final_accuracy), ("A_avg", average_incremental_accuracy),
                     ("BWT", backward_transfer), ("forgetting", forgetting)]:
        v = np.array([100 * fn(m) for m in matrices])
        out[name] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    diag = np.array([[100 * m[j][j] for j in range(len(m))] for m in matrices])
    final = np.array([[100 * v for v in m[-1]] for m in matrices])
    out["own"] = diag.mean(0).tolist()
    out["own_std"] = (diag.std(0, ddof=1) if len(diag) > 1 else 0 * diag[0]).tolist()
    out["own_min"] = float(diag.min())
    out["final"] = final.mean(0).tolist()
    return out


def fmt(pair) -> str:
    return f"{pair[0]:.2f} ± {pair[1]:.2f}"


def analyze(args) -> dict:
    cache = Path(args.cache)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    results, lines = {}, []
    task_names = None
    for name in names:
        runs = {s: torch.load(cache / f"{name}_seed{s}.pt", weights_only=False) for s in seeds_of(args)}
        head_kind = "cosine" if "_cosine" in name else "linear"
        task_names = next(iter(runs.values()))["task_names"]
        # the offline evaluation of the trained head must reproduce the trainer's matrix exactly
        for seed, run in runs.items():
            for dump, row in zip(run["dumps"], run["matrix"]):
                fn = cosine(dump["weight"]) if head_kind == "cosine" else linear(dump["weight"], dump["bias"])
                offline = accuracy_row(fn, dump)
                assert np.allclose(offline, row, atol=1e-6), (name, seed, offline, row)
        entries = {f"{name}: trained head": {s: r["matrix"] for s, r in runs.items()}}
        sources = [s for s in args.sources.split(",")
                   if all(s in d["sources"] for r in runs.values() for d in r["dumps"])]
        for source in sources:
            for label, method in head_methods(source).items():
                if args.methods and not any(key in label for key in args.methods.split("|")):
                    continue
                entries[f"{name}: {label}"] = {s: simulate(r, method, source, s, head_kind) for s, r in runs.items()}
        for label, per_seed in entries.items():
            summary = summarize(list(per_seed.values()))
            results[label] = {"summary": summary, "matrices": per_seed}
            own = " / ".join(f"{v:.1f} ± {e:.1f}" for v, e in zip(summary["own"], summary["own_std"]))
            final = " / ".join(f"{v:.1f}" for v in summary["final"])
            lines.append(f"| {label} | {len(per_seed)} | {fmt(summary['A_T'])} | {fmt(summary['A_avg'])} | "
                         f"{fmt(summary['BWT'])} | {fmt(summary['forgetting'])} | {own} | "
                         f"{summary['own_min']:.1f} | {final} |")
        seconds = [r["seconds"] for r in runs.values()]
        lines.append(f"| ({name}: {np.mean(seconds):.0f} s per backbone run) | | | | | | | | |")
    header = ("| method | seeds | A_T (%) | A_avg (%) | BWT (pp) | forgetting (pp) | own task right after its "
              f"training ({' / '.join(task_names)}) | worst own (any seed) | final row |")
    table = "\n".join([header, "|---|---:|---:|---:|---:|---:|---|---:|---|"] + lines)
    bytes_table = storage_table()
    md = "\n\n".join([f"## Heads (bench_heads.py), seeds {seeds_of(args)}", table, bytes_table])
    C.write_results(args, "heads", {"seeds": seeds_of(args), "task_names": task_names, "results": results,
                                    "storage_bytes": storage_rows()}, md)
    return results


def storage_rows() -> list[dict]:
    rows = []
    for d, classes in [(384, 9), (768, 200)]:
        for storage, rank in [("full", 0), ("shared", 0), ("lowrank", 16)]:
            for size in (8, 4):
                rows.append({"d": d, "classes": classes, "storage": storage, "rank": rank, "element_bytes": size,
                             "bytes": storage_bytes(d, classes, storage, rank, size)})
    return rows


def storage_table() -> str:
    lines = ["| d | classes | storage | float64 bytes | float32 bytes |", "|---:|---:|---|---:|---:|"]
    rows = storage_rows()
    for r in rows[::2]:
        f32 = next(x for x in rows if x["d"] == r["d"] and x["storage"] == r["storage"] and x["element_bytes"] == 4)
        name = r["storage"] + (f" k={r['rank']}" if r["rank"] else "")
        lines.append(f"| {r['d']} | {r['classes']} | {name} | {r['bytes']:,} | {f32['bytes']:,} |")
    return "\n".join(lines)


def seeds_of(args) -> list[int]:
    return [0] if args.quick else [int(s) for s in args.seeds.split(",")]


def main(argv=None):
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--backbone", default="inflora", choices=["inflora", "lora"])
    p.add_argument("--train", default="",
                   help="comma-separated training variants to run: base, pseudo, pseudo_detached, cosine, online_ca")
    p.add_argument("--pseudo_source", default="full", choices=list(SOURCES))
    p.add_argument("--analyze", action="store_true", help="evaluate the head methods on the recorded runs")
    p.add_argument("--runs", default="inflora_base", help="recorded runs to analyze (e.g. inflora_base,lora_base)")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--methods", default="", help="'|'-separated substrings of the head methods to evaluate")
    p.add_argument("--cache", default="/tmp/bench_heads_cache", help="folder of the recorded runs (large .pt)")
    args = p.parse_args(argv)
    C.setup(args)
    if args.train:
        tokenizer, tasks = C.demo_tasks(args.quick)
        train_runs(args, tasks, tokenizer)
    if args.analyze:
        return analyze(args)
    return None


if __name__ == "__main__":
    main()
