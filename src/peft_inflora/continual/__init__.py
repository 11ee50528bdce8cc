"""The continual-learning application: a task loop over Hugging Face trainers, with heads, evaluation, results,
plots and the Hub. It uses only the public API of the method (``peft_inflora``).

Modules, one job each: ``arguments`` (the options and ``ContinualTask``), ``loop`` (the mixin over Trainer hooks, with
``sequence``: the sequence so far, found and adopted, and ``task_evaluation``: the rows of the matrix), ``trainer``
(``ContinualTrainer``, ``ContinualSeq2SeqTrainer``), ``heads`` (global labels, head growth, frozen rows, the cosine
head), ``evaluation`` (classification and generation, scored by ``evaluate`` metrics shipped in
``evaluate_metrics/``), ``checkpoint`` (save and resume), ``card`` (the model card), ``hub`` (pushes, hub_strategy),
``revisions`` (per-task branch names), ``class_statistics`` and ``alignment`` (per-class feature statistics;
classifier alignment: the math), ``head_alignment`` (the same inside a run: statistics per task, alignment after it,
their file next to the adapter), ``capacity`` (the memory's fill), ``metrics`` and ``result`` (the accuracy matrix
and its metrics), ``plots`` (matplotlib, imported only there).
"""

from .alignment import (
    ClassFeatureAccumulator,
    ClassStatistics,
    HeadInputRecorder,
    align_classifier,
    collect_class_statistics,
    storage_bytes,
)
from .arguments import (
    CLASS_STATISTICS_SOURCES,
    CLASSIFIER_ALIGNMENTS,
    LOSS_CLASSES,
    SETTINGS,
    ContinualArguments,
    ContinualSeq2SeqTrainingArguments,
    ContinualTask,
    ContinualTrainingArguments,
)
from .evaluation import TaskMetric, exact_match, load_metric, normalize_answer, tokenize_instruction_dataset
from .head_alignment import CLASS_STATISTICS_FILE, load_class_statistics, save_class_statistics
from .hub import HubPushError, task_revision_name, task_revision_names, task_revisions
from .loop import ContinualCallback, ContinualMixin
from .metrics import (
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    incremental_accuracies,
)
from .result import RESULT_FILE, ContinualResult, compare_table
from .trainer import ContinualSeq2SeqTrainer, ContinualTrainer


__all__ = [
    "CLASSIFIER_ALIGNMENTS",
    "CLASS_STATISTICS_FILE",
    "CLASS_STATISTICS_SOURCES",
    "ClassFeatureAccumulator",
    "ClassStatistics",
    "HeadInputRecorder",
    "align_classifier",
    "collect_class_statistics",
    "load_class_statistics",
    "save_class_statistics",
    "storage_bytes",
    "LOSS_CLASSES",
    "RESULT_FILE",
    "SETTINGS",
    "ContinualArguments",
    "ContinualCallback",
    "ContinualMixin",
    "ContinualResult",
    "ContinualSeq2SeqTrainer",
    "ContinualSeq2SeqTrainingArguments",
    "ContinualTask",
    "ContinualTrainer",
    "ContinualTrainingArguments",
    "HubPushError",
    "TaskMetric",
    "average_incremental_accuracy",
    "backward_transfer",
    "compare_table",
    "exact_match",
    "final_accuracy",
    "forgetting",
    "incremental_accuracies",
    "load_metric",
    "normalize_answer",
    "task_revision_name",
    "task_revision_names",
    "task_revisions",
    "tokenize_instruction_dataset",
]
