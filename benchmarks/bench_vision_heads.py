"""Class-incremental heads on the second sequence: the vision example (tiny ViT, split digits 4,5 | 6,7 | 8,9).

Runs ``examples/continual_vision_vit.py`` once per seed and ``--classifier_alignment`` (each seed its own data
split, tiny-ViT pretraining, head/LoRA initialisation and batch order), then reports mean ± std over seeds of A_T,
A_avg, BWT, forgetting and, per task, the accuracy right after its own training next to the final one.

    python benchmarks/bench_vision_heads.py --seeds 0,1,2 --alignments none,new_rows,authors
    python benchmarks/bench_vision_heads.py --seeds 0,1,2 --alignments none,new_rows --statistics every_batch \
        --merge benchmarks/results/vision_heads_3seeds/vision_heads.json   # every batch vs the default's sample
    python benchmarks/bench_vision_heads.py --seeds 0,1,2 --alignments authors --head_logits cosine   # cosine head
    python benchmarks/bench_vision_heads.py --summarize-only      # the table of runs already in --runs
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_quality import own_and_final_table  # noqa: E402


LABELS = {"none": "InfLoRA (trained head)", "new_rows": "InfLoRA + new-rows CA", "authors": "InfLoRA + authors' CA"}


def run_dir(runs: Path, alignment: str, seed: int, every_batch: bool = False, head_logits: str = "linear") -> Path:
    cosine = "_cosine" if head_logits == "cosine" else ""
    return runs / f"vit_{alignment}{cosine}{'_allbatches' if every_batch else ''}_s{seed}"


def label(alignment: str, every_batch: bool, head_logits: str) -> str:
    name = LABELS.get(alignment, alignment)
    if head_logits == "cosine":
        name = name.replace("InfLoRA", "InfLoRA + cosine head").replace("(trained head)", "(trained)")
    return name + (" (all batches)" if every_batch else "")


def main(argv=None) -> dict:
    from peft_inflora import ContinualResult, compare_table

    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--alignments", default="none,new_rows,authors")
    p.add_argument("--runs", default=str(C.ROOT / "runs"), help="where the example's output folders go")
    p.add_argument("--statistics", choices=("default", "every_batch", "both"), default="default",
                   help="the statistics passes of the InfLoRA runs: the default sample "
                        "(statistics_max_tokens='auto'), every batch (statistics_max_tokens=None), or both")
    p.add_argument("--head_logits", choices=("linear", "cosine"), default="linear",
                   help="the head's logits while each task trains (ContinualTrainingArguments.head_logits)")
    p.add_argument("--merge", default="", help="comma-separated vision_heads.json files of earlier runs: their "
                                               "methods are added to the report (runs of this call win)")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    alignments = [a.strip() for a in args.alignments.split(",") if a.strip()]
    runs = Path(args.runs)
    variants = [(a, every) for every in {"default": [False], "every_batch": [True], "both": [False, True]}[
        args.statistics] for a in alignments]
    if not args.summarize_only:
        for seed in seeds:
            for alignment, every_batch in variants:
                folder = run_dir(runs, alignment, seed, every_batch, args.head_logits)
                subprocess.run([sys.executable, str(C.EXAMPLES_DIR / "continual_vision_vit.py"), "--output_dir",
                                str(folder), "--seed", str(seed), "--classifier_alignment", alignment, "--threads",
                                str(args.threads), "--head_logits", args.head_logits]
                               + (["--every_batch"] if every_batch else []), check=True)
    results: dict[str, list] = {}
    for alignment, every_batch in variants:
        found = [run_dir(runs, alignment, s, every_batch, args.head_logits) / "continual_result.json" for s in seeds]
        found = [f for f in found if f.is_file()]
        if found:
            results[label(alignment, every_batch, args.head_logits)] = [ContinualResult.from_json(f) for f in found]
    for earlier in filter(None, (m.strip() for m in args.merge.split(","))):
        for method, runs_of in json.loads(Path(earlier).read_text())["runs"].items():
            results.setdefault(method, [ContinualResult.from_dict(r) for r in runs_of])
    payload = {"seeds": seeds, "task_names": next(iter(results.values()))[0].task_names,
               "runs": {m: [r.to_dict() for r in rs] for m, rs in results.items()}}
    text = "\n".join([
        "## Class-incremental heads on the vision example (bench_vision_heads.py)", "",
        f"examples/continual_vision_vit.py defaults (tiny ViT pretrained on digits 0-3, tasks "
        f"{', '.join(payload['task_names'])}); seeds {seeds} (runs per method: "
        + ", ".join(f"{m} {len(rs)}" for m, rs in results.items()) + ").", "",
        compare_table(results), "", "Accuracy (%) right after each task's own training / at the end:", "",
        own_and_final_table(payload)])
    C.write_results(args, "vision_heads", payload, text)
    return payload


if __name__ == "__main__":
    main()
