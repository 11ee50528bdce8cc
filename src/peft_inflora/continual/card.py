"""The model card of a continual adapter: Hub metadata and a README that says what was learned and how to go on.

:func:`build_model_card` is a pure function of the run's :class:`~.result.ContinualResult`, the PEFT config and the
options; :class:`~.hub.HubMixin` calls it wherever the trainer writes an adapter (``save_model``, every
``continual/after-task-NN`` checkpoint, ``save_for_hub``, ``push_to_hub``, the per-task branches). The metadata is
built with huggingface_hub's ``ModelCardData`` (``library_name: peft``, ``base_model``, tags with ``inflora`` and
``continual-learning``, license, language, datasets, and a ``model-index`` with A_T, A_avg, BWT and forgetting) and
the card with ``ModelCard``; no YAML is written by hand and no template placeholder is left.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .metrics import _METRICS, _markdown
from .result import ContinualResult


__all__ = ["CARD_TAGS", "TRAINING_OPTIONS", "CardLocation", "build_model_card", "hub_base_model", "pipeline_tag"]

CARD_TAGS = ("peft", "inflora", "continual-learning")
# a Hub repo id ("name" or "owner/name"); a local path is no valid `base_model` in the metadata
_REPO_ID = re.compile(r"^(?:[\w][\w.-]*/)?[\w][\w.-]*$")
# PEFT task types (and model class suffixes) -> the Hub's pipeline tag
_PIPELINE_TAGS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation",
                  "SEQ_2_SEQ_LM": "text2text-generation", "TOKEN_CLS": "token-classification",
                  "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction"}
_CLASS_SUFFIXES = {"ForSequenceClassification": "text-classification",
                   "ForImageClassification": "image-classification", "ForCausalLM": "text-generation",
                   "ForConditionalGeneration": "text2text-generation"}
# the InfLoRA options shown in the card (in this order), when the config has them
_INFLORA_OPTIONS = ("r", "target_modules", "rank_pattern", "energy_threshold", "energy", "adaptive_threshold",
                    "total_tasks", "design", "memory", "fold", "solver", "statistics_max_batches",
                    "statistics_max_tokens", "statistics_sketch", "share_input_statistics", "modules_to_save")
TRAINING_OPTIONS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay", "seed")
_CONTINUAL_OPTIONS = ("setting", "loss_classes", "head_logits", "classifier_alignment", "eval_metric")


@dataclass
class CardLocation:
    """Where the card's adapter lives, for the loading snippet: ``REPO_ID`` (a Hub repository or a local folder),
    with a ``revision`` (a per-task branch) or a ``subfolder`` (``last-checkpoint``, ``continual/after-task-NN``)."""

    revision: Optional[str] = None
    subfolder: Optional[str] = None
    checkpoint_of: Optional[str] = None  # the output_dir of a local continual/after-task-NN checkpoint
    extra_lines: list[str] = field(default_factory=list)


def _as_list(value: Union[None, str, Sequence[str]]) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def hub_base_model(name: Optional[str]) -> Optional[str]:
    """``name`` when it reads as a Hub repo id (not a local folder), else ``None``."""
    if not name or os.path.isabs(name) or os.path.exists(name) or not _REPO_ID.match(name):
        return None
    return name


def pipeline_tag(peft_config: Any, model_class: str) -> Optional[str]:
    """The Hub's pipeline tag of the adapted model (from PEFT's task type, else the model class name)."""
    task_type = getattr(peft_config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    if task_type in _PIPELINE_TAGS:
        return _PIPELINE_TAGS[task_type]
    return next((tag for suffix, tag in _CLASS_SUFFIXES.items() if model_class.endswith(suffix)), None)


def _metric_label(result: ContinualResult, setting: str) -> str:
    """The metric of the matrix: the tasks' one metric, or "score" when tasks are scored differently."""
    names = {info.get("metric") for info in (result.extra.get("tasks") or {}).values() if info.get("metric")}
    if len(names) == 1:
        return str(names.pop())
    if names:
        return "score (each task's metric is in the task table)"
    return "exact_match" if setting == "generation" else "accuracy"


def _capacity_rows(result: ContinualResult, peft_config: Any, live: Optional[list[Any]]) -> list[list[str]]:
    """One row per adapted layer group: d_in, memory, free, rank, threshold, full-rank tasks still fitting."""
    rows = []
    done = result.num_learned
    records = result.extra.get("capacity") or []
    if done and len(records) >= done:
        rank = getattr(peft_config, "r", 0)
        for layer, (memory, free, threshold) in records[done - 1].items():
            rows.append((layer, memory + free, memory, free, rank, threshold))
    elif live:
        rows = [(c.layers[0], c.d_in, c.memory_dimension, c.free_dimension, c.rank, c.energy_threshold) for c in live]
    adaptive = bool(getattr(peft_config, "adaptive_threshold", False))
    out = []
    for layer, d_in, memory, free, rank, threshold in rows:
        growth = memory / max(done, 1)
        if rank <= 0:
            fits = "n/a"
        elif free < rank:
            fits = "0"
        elif adaptive or growth == 0:
            fits = str(free // rank) if adaptive else "all"
        else:
            fits = f"~{1 + int((free - rank) // growth)}"
        out.append([f"`{layer}`", str(d_in), str(memory), str(free), str(rank),
                    "" if threshold is None else f"{threshold:.4f}", fits])
    return out


def _task_rows(result: ContinualResult) -> list[list[str]]:
    info = result.extra.get("tasks") or {}
    ranges = result.extra.get("class_ranges") or []
    rows = []
    for j, name in enumerate(result.task_names):
        task = info.get(name, {})
        classes = ""
        if j < len(ranges):
            lo, hi = ranges[j]
            classes = f"{hi - lo} (global {lo}..{hi - 1})"
            labels = task.get("label_names")
            if labels:
                shown = ", ".join(map(str, labels[:8])) + (", ..." if len(labels) > 8 else "")
                classes += f": {shown}"
        size = ("" if task.get(key) is None else str(task[key]) for key in ("train_examples", "eval_examples"))
        status = "learned" if j < result.num_learned else "planned"
        rows.append([str(j + 1), f"`{name}`", classes or "-", *size, task.get("metric") or "-", status])
    return rows


def _value(value: Any) -> str:
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    text = f"`{value}`" if not isinstance(value, (list, tuple)) else ", ".join(f"`{v}`" for v in value)
    return text or "-"


def build_model_card(
    *,
    model_name: str,
    result: Optional[ContinualResult],
    peft_config: Any,
    is_inflora: bool,
    setting: str,
    options: Mapping[str, Any],
    base_model: Optional[str],
    model_class: str,
    num_labels: Optional[int],
    capacity: Optional[list[Any]] = None,
    location: Optional[CardLocation] = None,
    language: Union[None, str, Sequence[str]] = None,
    license: Optional[str] = None,
    tags: Union[None, str, Sequence[str]] = None,
    finetuned_from: Optional[str] = None,
    tasks: Union[None, str, Sequence[str]] = None,
    dataset_tags: Union[None, str, Sequence[str]] = None,
    dataset: Union[None, str, Sequence[str]] = None,
    dataset_args: Union[None, str, Sequence[str]] = None,
    previous: Optional[ModelCardData] = None,
    versions: Optional[Mapping[str, str]] = None,
) -> ModelCard:
    """The card of a continual adapter.

    ``language`` ... ``dataset_args`` are the arguments of ``transformers.Trainer.create_model_card``: ``language``,
    ``license``, ``tags`` (added to ``peft``, ``inflora``, ``continual-learning``), ``finetuned_from`` (the
    ``base_model``; default: the base model's name when it is a Hub repo id), ``tasks`` (the pipeline tag and the
    model-index task), ``dataset`` / ``dataset_tags`` (``datasets``; the first names the model-index dataset) and
    ``dataset_args``. ``previous`` is the metadata PEFT's ``save_pretrained`` wrote (its tags are kept).
    """
    location = location or CardLocation()
    method = result.method if result is not None else ("InfLoRA" if is_inflora else "sequential PEFT")
    all_tags = list(CARD_TAGS) + ([] if is_inflora else ["baseline"])
    for tag in _as_list(previous.tags if previous is not None else None) + _as_list(tags):
        if tag not in all_tags and not tag.startswith("base_model:"):  # the Hub derives those from base_model
            all_tags.append(tag)
    base = finetuned_from or hub_base_model(base_model)
    task_list = _as_list(tasks)
    pipeline = task_list[0] if task_list else (previous.pipeline_tag if previous is not None else None) \
        or pipeline_tag(peft_config, model_class)
    datasets = _as_list(dataset) + [d for d in _as_list(dataset_tags) if d not in _as_list(dataset)]
    eval_results = None
    metric = _metric_label(result, setting) if result is not None else None
    if result is not None and result.accuracy_matrix and pipeline:
        sequence = " -> ".join(result.task_names[: result.num_learned])
        eval_results = [
            EvalResult(task_type=pipeline, dataset_type=datasets[0] if datasets else "continual-task-sequence",
                       dataset_name=f"{result.num_learned} tasks: {sequence}",
                       dataset_args=(_as_list(dataset_args) or [None])[0], metric_type=key,
                       metric_name=f"{label} ({metric})" if unit == "%" else label, metric_value=round(value, 6))
            for (key, label, unit, _), value in zip(_METRICS, result.metrics().values())]
    data = ModelCardData(
        base_model=base, library_name="peft", tags=all_tags,
        license=license or (previous.license if previous is not None else None),
        language=_as_list(language) or None, datasets=datasets or None, pipeline_tag=pipeline,
        model_name=model_name if eval_results else None, eval_results=eval_results)

    lines = [f"# {model_name}", ""]
    what = ("An [InfLoRA](https://arxiv.org/abs/2404.00228) adapter (interference-free low-rank adaptation, CVPR "
            "2024)" if is_inflora else f"A {method} adapter (a sequential fine-tuning baseline, no protection "
            "against forgetting)")
    lines += [f"{what} trained with [peft-inflora](https://pypi.org/project/peft-inflora/) on a sequence of tasks, "
              f"one after another (setting: `{setting}`)"
              + (f", on the base model `{base_model}`." if base_model else "."), ""]
    if location.revision is not None and result is not None and result.num_learned:
        done = result.num_learned
        lines += [f"This revision (`{location.revision}`) holds the adapter after task {done} "
                  f"({result.task_names[done - 1]}); the repository's other `task-<k>-<name>` branches hold the other "
                  "points of the sequence.", ""]
    if location.checkpoint_of is not None and result is not None:
        lines += [f"This is the checkpoint after task {result.num_learned} of the run in `{location.checkpoint_of}` "
                  "(a resume point: `train_continual(tasks, resume_from_checkpoint=True)` continues after it).", ""]
    lines += location.extra_lines

    lines += ["## Task sequence", ""]
    if result is None:
        lines += ["No task has been learned yet.", ""]
    else:
        lines += [f"Tasks learned ({result.num_learned}): " + ", ".join(result.task_names[: result.num_learned])
                  + f" ({result.num_tasks} planned).", "",
                  _markdown(["#", "task", "classes", "train examples", "eval examples", "metric", "status"],
                            ["---:", "---", "---", "---:", "---:", "---", "---"], _task_rows(result)), ""]
    lines += ["## Results", ""]
    if result is not None and result.accuracy_matrix:
        scope = {"class_incremental": "among all classes seen so far (no task id at test time)",
                 "task_incremental": "among the task's own classes (task id given)",
                 "generation": "of the greedy answers"}.get(setting, "")
        lines += [f"`a[i][j]`: {metric} (%) on task `j` after training task `i`, {scope}. A_T: mean of the last row; "
                  "A_avg: mean over rows of each row's mean; BWT: mean change of each old task from just after it "
                  "was learned to the end (negative = forgetting); forgetting: mean drop from each old task's best "
                  "score to its final one (pp).", "", result.summary_table(), ""]
    else:
        lines += ["No row of the accuracy matrix yet.", ""]

    lines += ["## Settings", ""]
    config_rows = [[f"`{k}`", _value(getattr(peft_config, k))] for k in _INFLORA_OPTIONS
                   if hasattr(peft_config, k) and getattr(peft_config, k) not in (None, {}, [])]
    peft_type = getattr(getattr(peft_config, "peft_type", None), "value", getattr(peft_config, "peft_type", None))
    config_rows.insert(0, ["PEFT method", f"`{peft_type}`"])
    config_rows += [[f"`{k}`", _value(options[k])] for k in _CONTINUAL_OPTIONS + TRAINING_OPTIONS
                    if options.get(k) is not None]
    lines += [_markdown(["option", "value"], ["---", "---"], config_rows), ""]
    cap = _capacity_rows(result, peft_config, capacity) if (is_inflora and result is not None) else []
    if cap:
        lines += ["## Capacity left per layer", "",
                  "The memory holds the input directions earlier tasks rely on; a new task's `B_t` lives in the "
                  "free directions. A layer gives the next task its full rank while `free >= r`; the last column "
                  "projects how many more tasks get it at the memory's growth so far.", "",
                  _markdown(["layer (group)", "d_in", "memory", "free", "r", "last threshold", "full-rank tasks left"],
                            ["---", "---:", "---:", "---:", "---:", "---:", "---:"], cap), ""]

    load_from = "REPO_ID" + (f', revision="{location.revision}"' if location.revision else "") \
        + (f', subfolder="{location.subfolder}"' if location.subfolder else "")
    with_labels = setting != "generation" and num_labels
    result_from = "REPO_ID" + (f', revision="{location.revision}"' if location.revision else "")
    lines += ["## How to load and continue", "",
              "`REPO_ID` is this repository's id or a local copy of it. `import peft_inflora` registers the InfLoRA "
              "method with PEFT: it is needed before loading.", "", "```python",
              "import peft_inflora", "from peft import PeftModel",
              "from peft_inflora import ContinualResult, ContinualTask, ContinualTrainer, ContinualTrainingArguments",
              "", f"base = ...  # {base_model or 'the base model'}"
              + (f", with num_labels={num_labels} (the head grown over the tasks learned)" if with_labels else ""),
              f"model = PeftModel.from_pretrained(base, {load_from}, is_trainable=True)"]
    if location.subfolder:
        lines += ["# the result of this checkpoint: download the folder, then ContinualResult.from_pretrained(folder)"]
    else:
        lines += [f"previous = ContinualResult.from_pretrained({result_from})  # the accuracy matrix so far"]
    lines += ["# continue the sequence: the learned tasks (with their eval data) first, then new ones",
              "trainer = ContinualTrainer(model=model, args=ContinualTrainingArguments(output_dir=\"next\"))",
              "trainer.train_continual(learned_tasks + new_tasks"
              + (", previous_result=previous)" if not location.subfolder else ", previous_result=...)"),
              "# or, in any training loop: model.begin_task(batches); train; model.end_task(batches)", "```", ""]
    if versions:
        lines += ["## Framework versions", ""] + [f"- {name} {version}" for name, version in versions.items()] + [""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return card
