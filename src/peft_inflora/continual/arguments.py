"""The continual options as dataclass fields, and one task of a sequence.

:class:`ContinualArguments` holds every option of the task loop as a dataclass field with ``metadata={"help": ...}``,
so ``HfArgumentParser`` parses it and shows it in ``--help``, and ``TrainingArguments.to_json_string`` /
``training_args.bin`` save it with the run. It is a mixin: :class:`ContinualTrainingArguments` is
``(ContinualArguments, TrainingArguments)``, :class:`ContinualSeq2SeqTrainingArguments` is
``(ContinualArguments, Seq2SeqTrainingArguments)``, and a TRL config is ``(ContinualArguments, SFTConfig)``. Every
continual option is checked in ``__post_init__``, before the Trainer exists (so before it creates a Hub repository).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .class_statistics import STORAGES


SETTINGS = ("class_incremental", "task_incremental", "generation")
LOSS_CLASSES = ("task", "seen")
# classifier alignment after each task (see head_alignment.py); "auto": see ContinualArguments.alignment_mode
CLASSIFIER_ALIGNMENTS = ("auto", "none", "authors", "new_rows")
CLASS_STATISTICS_SOURCES = ("last_epoch", "extra_pass")
HEAD_LOGITS = ("auto", "linear", "cosine")  # the head's logits while a task trains (heads.CosineLogits)
# the PEFT task types a user may pass to `setting` by mistake (PeftConfig.task_type is another option)
_PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

__all__ = ["CLASSIFIER_ALIGNMENTS", "CLASS_STATISTICS_SOURCES", "HEAD_LOGITS", "ContinualArguments",
           "ContinualSeq2SeqTrainingArguments", "ContinualTask", "ContinualTrainingArguments", "LOSS_CLASSES",
           "SETTINGS", "task_record"]


@dataclass
class ContinualTask:
    """One task of a sequence.

    Args:
        name: a short, unique name (used in file names, logs, the model card and Hub branch names).
        train_dataset: the task's training data (a ``datasets.Dataset`` or torch dataset of model inputs). For
            classification it carries local labels ``0..C-1`` in a ``labels`` (or ``label``) column. May be ``None``
            for a task that is already learned and is passed only to be evaluated (``previous_tasks=``).
        eval_dataset: the task's test data, same format (generation: a prompt and an answer column, see
            ``ContinualArguments.eval_prompt_column``). Every task needs one: it is evaluated after every later task.
        label_names: the task's class names (classification); inferred from a ``ClassLabel`` feature or the labels
            present when omitted.
        metric: how the task is scored in the accuracy matrix, instead of the run's ``eval_metric`` (default: the
            shipped ``accuracy`` / ``exact_match``): an ``evaluate`` module (``evaluate.load("rouge")``), its name
            or local path, or ``f(predictions, references) -> float | dict`` (see
            :class:`~.evaluation.TaskMetric`). The score must lie in [0, 1].
        metric_key: the entry of the metric's result dict that is the score (e.g. ``"rougeL"``).
    """

    name: str
    train_dataset: Any = None
    eval_dataset: Any = None
    label_names: Optional[Sequence[str]] = None
    metric: Any = None
    metric_key: Optional[str] = None

    def __repr__(self) -> str:  # short: the default repr would print whole datasets
        extra = f", metric={getattr(self.metric, 'name', self.metric)!r}" if self.metric is not None else ""
        return f"ContinualTask(name={self.name!r}, label_names={self.label_names!r}{extra})"


def _size(dataset: Any) -> Optional[int]:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        return None


def task_record(task: ContinualTask) -> dict[str, Any]:
    """What a result keeps of a task (``extra["tasks"][name]``, shown in the model card): its sizes and labels."""
    labels = task.label_names
    if labels is None:
        features = getattr(task.train_dataset, "features", None) or {}
        for column in ("labels", "label"):
            names = getattr(features.get(column), "names", None) if hasattr(features, "get") else None
            if names:
                labels = names
                break
    return {"train_examples": _size(task.train_dataset), "eval_examples": _size(task.eval_dataset),
            "label_names": [str(n) for n in labels] if labels is not None else None}


@dataclass
class ContinualArguments:
    """The continual-learning options (a dataclass mixin; combine it with a ``TrainingArguments`` class)."""

    setting: str = field(default="class_incremental", metadata={
        "help": "The continual setting. class_incremental: tasks bring their own labels 0..C-1, mapped to one global "
                "label space; one head over all classes seen so far, no task id at test time. task_incremental: as "
                "class_incremental, but each task is evaluated among its own classes only. generation: causal-LM or "
                "seq2seq tasks with the model's own loss, evaluated by the exact match of greedy generations (or the "
                "trainer's answer_metric). (Not PEFT's task_type, which stays in the PEFT config.)",
        "choices": list(SETTINGS)})
    loss_classes: str = field(default="task", metadata={
        "help": "Classification loss: cross-entropy over the current task's classes (task, the paper's: other "
                "classes' head rows get no gradient) or over all classes seen so far (seen: old rows stay frozen but "
                "compete).",
        "choices": list(LOSS_CLASSES)})
    generation_max_new_tokens: int = field(default=32, metadata={
        "help": "setting=generation: the number of new tokens generated per test prompt in the evaluation."})
    eval_prompt_column: str = field(default="prompt", metadata={
        "help": "setting=generation: the column of a task's eval_dataset that holds the prompts."})
    eval_answer_column: str = field(default="answer", metadata={
        "help": "setting=generation: the column of a task's eval_dataset that holds the reference answers."})
    eval_metric: Optional[str] = field(default=None, metadata={
        "help": "The evaluate metric that scores every task in the accuracy matrix (a ContinualTask's metric "
                "overrides it): a name or a local path for evaluate.load. Default: the accuracy (classification) or "
                "exact_match (generation) modules shipped in the package, which load offline; 'accuracy' and "
                "'exact_match' name them too. Its score must lie in [0, 1] (e.g. rouge with eval_metric_key=rougeL)."})
    eval_metric_key: Optional[str] = field(default=None, metadata={
        "help": "The entry of eval_metric's result dict that is a task's score (default: the metric's name, or its "
                "only entry)."})
    push_task_revisions: bool = field(default=False, metadata={
        "help": "After every finished task, push the adapter (with its memory), the result so far, the plots and a "
                "model card to the branch task-<k>-<name> of hub_model_id (k 1-based); the end of train_continual "
                "pushes to hub_revision (main). Needs push_to_hub=True and hub_model_id."})
    task_revision_base: Optional[str] = field(default=None, metadata={
        "help": "With push_task_revisions: the revision each new task branch is created from (default: hub_revision, "
                "else main)."})

    head_logits: str = field(default="auto", metadata={
        "help": "Classification: the logits each task's training loss reads. linear: W x + b. cosine: "
                "cosine_scale * cos(x, w_c) (features and head rows normalised, bias unused), which removes the norm "
                "bias between the rows of different tasks; classifier alignment then re-fits the head as linear "
                "W x + b for the evaluation (with classifier_alignment=none the evaluation reads the cosine logits "
                "too). auto (default): cosine with setting=class_incremental and classifier_alignment=auto (which "
                "then means authors: the best measured pair, benchmarks/RESULTS.md section 11), linear otherwise.",
        "choices": list(HEAD_LOGITS)})
    cosine_scale: float = field(default=16.0, metadata={
        "help": "head_logits=cosine: the scale s of the logits s * cos(x, w_c)."})
    classifier_alignment: str = field(default="auto", metadata={
        "help": "Classifier alignment after each task (before its evaluation), from per-class feature statistics "
                "(mean, covariance of the head's input) of every class seen so far. authors: re-train every seen "
                "row (the InfLoRA repository's inflora_ca); new_rows: re-train only the new task's rows (best with "
                "a linear head, benchmarks/RESULTS.md section 10); none: off; auto (default): with "
                "setting=class_incremental, authors after a cosine head (head_logits auto or cosine: the default "
                "pair, best measured) and new_rows after head_logits=linear; none otherwise. Needs an nn.Linear head "
                "in modules_to_save.",
        "choices": list(CLASSIFIER_ALIGNMENTS)})
    alignment_epochs: int = field(default=5, metadata={
        "help": "Classifier alignment: epochs over Gaussian samples (each epoch C steps of samples_per_class)."})
    alignment_samples_per_class: int = field(default=256, metadata={
        "help": "Classifier alignment: samples drawn per class per epoch (and the batch size of its SGD steps)."})
    alignment_lr: float = field(default=0.01, metadata={
        "help": "Classifier alignment: SGD learning rate (momentum 0.9, weight decay 5e-4, cosine schedule)."})
    alignment_mean_decay: Optional[bool] = field(default=None, metadata={
        "help": "Classifier alignment: scale the mean of a class of task t_c by 0.9 + 0.1 (t_c + 1) / (t + 1) "
                "(the authors' code). Default: on for authors, off for new_rows (as measured best)."})
    alignment_logit_temperature: Optional[float] = field(default=0.1, metadata={
        "help": "Classifier alignment: divide the logits by the mean per-task logit norm and this temperature "
                "(the authors' normalisation; what makes alignment work on the demo). None: off."})
    class_statistics_storage: str = field(default="lowrank", metadata={
        "help": "How the class statistics are stored (and saved with the adapter): full (a d x d covariance per "
                "class), shared (one pooled covariance + per-class means) or lowrank (per class the top "
                "class_statistics_rank eigenpairs + the residual diagonal; default, within noise of full at 1/21 "
                "of the bytes on the demo; see docs/heads.md).",
        "choices": list(STORAGES)})
    class_statistics_rank: int = field(default=16, metadata={
        "help": "class_statistics_storage=lowrank: the rank k kept per class."})
    class_statistics_source: str = field(default="last_epoch", metadata={
        "help": "Where the class statistics come from: last_epoch (the head inputs of the last training epoch's "
                "own forwards, train mode: no extra pass) or extra_pass (one more eval-mode pass over the task's "
                "training data after training; ~1 point better on the demo, ~0.4 epoch of compute).",
        "choices": list(CLASS_STATISTICS_SOURCES)})

    def __post_init__(self) -> None:
        self._check_continual_arguments()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    @classmethod
    def continual_field_names(cls) -> list[str]:
        """The names of the continual options (the fields of this mixin)."""
        return [f.name for f in fields(ContinualArguments)]

    def continual_dict(self) -> dict[str, Any]:
        """The continual options by name (saved in the result's ``extra["continual_arguments"]``)."""
        return {name: getattr(self, name) for name in self.continual_field_names()}

    def head_mode(self) -> str:
        """The head's training logits, ``"cosine"`` or ``"linear"`` (``"auto"`` resolved: cosine for
        ``class_incremental`` with ``classifier_alignment="auto"``)."""
        if self.head_logits != "auto":
            return self.head_logits
        auto = self.setting == "class_incremental" and self.classifier_alignment == "auto"
        return "cosine" if auto else "linear"

    def alignment_mode(self) -> Optional[str]:
        """The classifier alignment this run makes: ``"authors"``, ``"new_rows"`` or ``None`` (``"auto"`` resolved
        by ``setting`` and the head: with ``class_incremental``, ``authors`` after a cosine head, every row re-fitted
        as a linear head, and ``new_rows`` after a linear one; the best measured for each)."""
        mode = self.classifier_alignment
        if mode in (None, "none"):
            return None
        if mode == "auto":
            if self.setting != "class_incremental":
                return None
            return "authors" if self.head_mode() == "cosine" else "new_rows"
        return mode

    def alignment_decay(self) -> bool:
        """``alignment_mean_decay``, its default resolved (on for ``authors``, off for ``new_rows``)."""
        if self.alignment_mean_decay is None:
            return self.alignment_mode() == "authors"
        return bool(self.alignment_mean_decay)

    def _check_head_arguments(self) -> None:
        if self.head_logits not in HEAD_LOGITS:
            raise ValueError(f"head_logits must be one of {HEAD_LOGITS}, got {self.head_logits!r}.")
        if self.head_logits == "cosine" and self.setting == "generation":
            raise ValueError("head_logits='cosine' changes a classification head's logits: setting='generation' has "
                             "no classifier head, so drop head_logits.")
        scale = self.cosine_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"cosine_scale must be a number > 0 (the logits are cosine_scale * cos(x, w_c)), got "
                             f"{scale!r}.")

    def _check_alignment_arguments(self) -> None:
        mode = self.classifier_alignment
        if mode is not None and mode not in CLASSIFIER_ALIGNMENTS:
            raise ValueError(f"classifier_alignment must be one of {CLASSIFIER_ALIGNMENTS} (or None), got {mode!r}.")
        if mode in ("authors", "new_rows") and self.setting != "class_incremental":
            raise ValueError(
                f"classifier_alignment={mode!r} corrects the bias between tasks of one head over all classes, which "
                f"only setting='class_incremental' has (got setting={self.setting!r}: "
                + ("generation has no classifier head" if self.setting == "generation" else
                   "task_incremental evaluates each task among its own classes")
                + "): drop classifier_alignment or set it to 'none'.")
        for name in ("alignment_epochs", "alignment_samples_per_class", "class_statistics_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if isinstance(self.alignment_lr, bool) or not isinstance(self.alignment_lr, (int, float)) \
                or not self.alignment_lr > 0:
            raise ValueError(f"alignment_lr must be a number > 0, got {self.alignment_lr!r}.")
        if self.alignment_mean_decay is not None and not isinstance(self.alignment_mean_decay, bool):
            raise ValueError(f"alignment_mean_decay must be True, False or None (default), got "
                             f"{self.alignment_mean_decay!r}.")
        t = self.alignment_logit_temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ValueError(f"alignment_logit_temperature must be a number > 0, or None to turn the logit "
                             f"normalisation off, got {t!r}.")
        if self.class_statistics_storage not in STORAGES:
            raise ValueError(f"class_statistics_storage must be one of {STORAGES}, got "
                             f"{self.class_statistics_storage!r}.")
        if self.class_statistics_source not in CLASS_STATISTICS_SOURCES:
            raise ValueError(f"class_statistics_source must be one of {CLASS_STATISTICS_SOURCES}, got "
                             f"{self.class_statistics_source!r}.")

    def _check_continual_arguments(self) -> None:
        """Every continual option, checked before anything is built; each error says what to change."""
        if self.setting not in SETTINGS:
            hint = (f" ({self.setting!r} is a PEFT task_type: keep it in the PEFT config, e.g. "
                    "InfLoRAConfig(task_type=...), and choose the continual setting here)"
                    if str(self.setting).upper() in _PEFT_TASK_TYPES else "")
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}{hint}.")
        if self.loss_classes not in LOSS_CLASSES:
            raise ValueError(f"loss_classes must be one of {LOSS_CLASSES}, got {self.loss_classes!r}.")
        if self.setting == "generation" and self.loss_classes != "task":
            raise ValueError("loss_classes applies to classification (setting=class_incremental or task_incremental); "
                             "with setting='generation' the loss is the model's own: drop loss_classes.")
        if isinstance(self.generation_max_new_tokens, bool) or not isinstance(self.generation_max_new_tokens, int) \
                or self.generation_max_new_tokens < 1:
            raise ValueError(f"generation_max_new_tokens must be an int >= 1, got {self.generation_max_new_tokens!r}.")
        for name in ("eval_prompt_column", "eval_answer_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a column name, got {getattr(self, name)!r}.")
        for name in ("eval_metric", "eval_metric_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a name (or, for eval_metric, a local path) for evaluate.load, got "
                                 f"{value!r}; a metric object or function goes to ContinualTask(metric=...).")
        if self.eval_metric_key is not None and self.eval_metric is None:
            raise ValueError("eval_metric_key names an entry of eval_metric's result: set eval_metric too (the "
                             "shipped accuracy / exact_match give one entry each).")
        if not isinstance(self.push_task_revisions, bool):
            raise ValueError(
                f"push_task_revisions must be True or False, got {self.push_task_revisions!r}: True pushes the state "
                "after every task to its own branch task-<k>-<name> of hub_model_id (branches, not tags: a branch "
                "can be uploaded to directly and updated when a failed push is retried).")
        if self.push_task_revisions:
            missing = [] if getattr(self, "push_to_hub", False) else ["push_to_hub=True"]
            if not getattr(self, "hub_model_id", None):
                missing.append("hub_model_id='<user or org>/<repo>'")
            if missing:
                raise ValueError(
                    "push_task_revisions=True pushes each finished task to a branch of the Hub repository "
                    f"hub_model_id: set {', '.join(missing)} (--{' --'.join(m.split('=')[0] for m in missing)}), "
                    "or drop push_task_revisions.")
        elif self.task_revision_base is not None:
            raise ValueError("task_revision_base is the revision the per-task branches are created from: it needs "
                             "push_task_revisions=True (or drop task_revision_base).")
        self._check_head_arguments()
        self._check_alignment_arguments()


@dataclass
class ContinualTrainingArguments(ContinualArguments, TrainingArguments):
    """``TrainingArguments`` plus the continual options of :class:`ContinualArguments`, for ``ContinualTrainer``."""


@dataclass
class ContinualSeq2SeqTrainingArguments(ContinualArguments, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus the continual options, for ``ContinualSeq2SeqTrainer``."""
