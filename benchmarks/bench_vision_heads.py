"""Class-incremental heads on the second sequence: the vision example (tiny ViT, split digits 4,5 | 6,7 | 8,9).

Runs ``examples/continual_vision_vit.py`` once per seed and ``--classifier_alignment`` (each seed its own data
split, tiny-ViT pretraining, head/LoRA initialisation and batch order), then reports mean ± std over seeds of A_T,
A_avg, BWT, forgetting and, per task, the accuracy right after its own training next to the final one.

    python benchmarks/bench_vision_heads.py --seeds 0,1,2 --alignments none,new_rows,authors
    python benchmarks/bench_vision_heads.py --summarize-only      # the table of runs already in --runs
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_quality import own_and_final_table  # noqa: E402


LABELS = {"none": "InfLoRA (trained head)", "new_rows": "InfLoRA + new-rows CA", "authors": "InfLoRA + authors' CA"}


def run_dir(runs: Path, alignment: str, seed: int) -> Path:
    return runs / f"vit_{alignment}_s{seed}"


def main(argv=None) -> dict:
    from peft_inflora import ContinualResult, compare_table

    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--alignments", default="none,new_rows,authors")
    p.add_argument("--runs", default=str(C.ROOT / "runs"), help="where the example's output folders go")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    alignments = [a.strip() for a in args.alignments.split(",") if a.strip()]
    runs = Path(args.runs)
    if not args.summarize_only:
        for seed in seeds:
            for alignment in alignments:
                subprocess.run([sys.executable, str(C.EXAMPLES_DIR / "continual_vision_vit.py"), "--output_dir",
                                str(run_dir(runs, alignment, seed)), "--seed", str(seed), "--classifier_alignment",
                                alignment, "--threads", str(args.threads)], check=True)
    results: dict[str, list] = {}
    for alignment in alignments:
        found = [run_dir(runs, alignment, s) / "continual_result.json" for s in seeds]
        found = [f for f in found if f.is_file()]
        if found:
            results[LABELS.get(alignment, alignment)] = [ContinualResult.from_json(f) for f in found]
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
