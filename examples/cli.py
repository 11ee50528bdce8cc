"""Command lines of the examples: a script's own options plus every ``ContinualTrainingArguments`` field.

``parse_arguments(ScriptArguments, defaults, argv)`` parses ``--help``-documented dataclasses with
``HfArgumentParser``: the script's small dataclass, and ``ContinualTrainingArguments`` (all of ``TrainingArguments``
plus the continual options ``--setting``, ``--loss_classes``, ``--generation_max_new_tokens``,
``--push_task_revisions`` ...). ``defaults`` are the script's defaults for those fields; flags given on the command
line win.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Optional

from transformers import HfArgumentParser

from peft_inflora import ContinualResult, ContinualTrainingArguments, compare_table


def parse_arguments(script_class: type, defaults: dict[str, Any], argv: Optional[list[str]] = None) -> tuple:
    """``(script options, ContinualTrainingArguments)`` from ``argv`` (default ``sys.argv[1:]``) over ``defaults``."""
    parser = HfArgumentParser((script_class, ContinualTrainingArguments))
    parser.set_defaults(**defaults)
    return tuple(parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv)))


def with_output_dir(training: ContinualTrainingArguments, output_dir: str) -> ContinualTrainingArguments:
    """The same arguments writing to another folder (one run of a script among several)."""
    return dataclasses.replace(training, output_dir=str(output_dir))


def print_results(result: ContinualResult, baseline: Optional[Callable[[], ContinualResult]], output_dir: str,
                  start: float) -> None:
    """Print InfLoRA's accuracy matrix and metrics; with ``baseline`` (a function that runs sequential LoRA), run it
    and print its table and the comparison; then the headline and where the files are."""
    print("\n" + result.summary_table())
    if baseline is not None:
        other = baseline()
        print("\n" + other.summary_table())
        print("\n" + compare_table({"InfLoRA": result, other.method: other}))
    print("\n" + result.headline())
    print(f"adapter and results saved to {output_dir} (total time {time.perf_counter() - start:.0f} s)")
