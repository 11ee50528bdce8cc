"""Entry point of the task-boundary failure tests: ``torchrun --nproc_per_node 2 boundary_failure_worker.py OUT``.

A ContinualTrainer under DDP (gloo) learns two tasks (2 + 3 classes, the default head: cosine logits, the authors'
alignment), five times, each time with one process failing alone at one task boundary: ``prepare``
(``prepare_train_dataset`` raises on rank 1 before task 1), ``head`` (growing the head for task 2 raises on rank 1),
``alignment`` (the classifier alignment after task 2 raises on rank 1), ``evaluation`` (scoring the evaluation after
task 2 raises on rank 1), ``checkpoint`` (writing the checkpoint of task 2 raises on rank 0, the process that writes).
Per case and rank, ``OUT/<case>-rank{r}.json`` holds the error raised, the seconds until it was raised, the adapter's
tasks afterwards, the head (its rows, every value) and the classes with stored statistics; in the ``alignment``
case also the head as the alignment received it (``head_before_alignment``). Each case's ``output_dir`` is
``OUT/<case>``.
"""

from __future__ import annotations

import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))
from continual_fixtures import inflora_bert, tasks, training_args  # noqa: E402

import peft_inflora.continual.head_alignment as head_alignment  # noqa: E402
import peft_inflora.continual.heads as heads  # noqa: E402
import peft_inflora.continual.loop as loop  # noqa: E402
import peft_inflora.continual.task_evaluation as task_evaluation  # noqa: E402
from peft_inflora import ContinualTrainer  # noqa: E402
from peft_inflora.continual.heads import find_head  # noqa: E402


CASES = ("prepare", "head", "alignment", "evaluation", "checkpoint")


class InjectedFailure(RuntimeError):
    pass


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    real_accuracy, real_save = task_evaluation.classification_accuracy, loop.save_after_task
    real_grown_head, real_align = heads.grown_head, head_alignment.align_classifier
    for case in CASES:
        seen = {}
        class Trainer(ContinualTrainer):
            def prepare_train_dataset(self, dataset, task):
                if case == "prepare" and rank == 1:
                    raise InjectedFailure(f"{case} on rank {rank}")
                return dataset

        def accuracy(predictions, labels, classes, *rest):
            if case == "evaluation" and rank == 1 and classes[1] == 5:  # the row after task 2 (classes 0..4)
                raise InjectedFailure(f"{case} on rank {rank}")
            return real_accuracy(predictions, labels, classes, *rest)

        def save(model, result, *args, **kwargs):
            if case == "checkpoint" and rank == 0 and result.num_learned == 2:
                raise InjectedFailure(f"{case} on rank {rank}")
            return real_save(model, result, *args, **kwargs)

        def grown_head(model, num_classes, *rest):
            if case == "head" and rank == 1 and num_classes == 5:  # the head of task 2 (classes 2..4)
                raise InjectedFailure(f"{case} on rank {rank}")
            return real_grown_head(model, num_classes, *rest)

        def align(head, statistics, **kwargs):
            seen["head_before_alignment"] = head.weight.tolist()
            if case == "alignment" and rank == 1:
                raise InjectedFailure(f"{case} on rank {rank}")
            return real_align(head, statistics, **kwargs)

        task_evaluation.classification_accuracy, loop.save_after_task = accuracy, save
        heads.grown_head, head_alignment.align_classifier = grown_head, align
        model = inflora_bert(statistics_max_tokens=None)
        args = training_args(os.path.join(out, case), num_train_epochs=1, ddp_backend="gloo", ddp_timeout=120)
        trainer = Trainer(model=model, args=args)
        t0 = time.perf_counter()
        try:
            trainer.train_continual(tasks((2, 3)))
            error = None
        except Exception as err:  # recorded for the test
            error = {"type": type(err).__name__, "message": str(err), "step": getattr(err, "step", None),
                     "failed_ranks": getattr(err, "failed_ranks", None)}
        record = {"error": error, "seconds": time.perf_counter() - t0, "tasks_done": model.tasks_done(),
                  "task_in_progress": model.task_in_progress(), "trainer_tasks": len(trainer.continual_tasks),
                  "head": find_head(model)[1].weight.tolist(), "statistics_classes": sorted(
                      trainer._head_alignment.statistics.classes.tolist()) if trainer._head_alignment.statistics
                  is not None else [], **seen}
        with open(os.path.join(out, f"{case}-rank{rank}.json"), "w") as f:
            json.dump(record, f)
    task_evaluation.classification_accuracy, loop.save_after_task = real_accuracy, real_save
    heads.grown_head, head_alignment.align_classifier = real_grown_head, real_align


if __name__ == "__main__":
    main(sys.argv[1])
