"""Repeated texts and the train/validation/test split.

Every row is kept: repeated annotations are data. A text (for sentence pairs, a (text, text_pair) pair) that
occurs more than once is a group, and a split keeps each group whole, so no text is in both training and
evaluation. `Copies` counts the groups and their conflicting labels for the one line each source gets;
data.drop_duplicates=true drops exact copies (same text and label) first, counted.

The split is datasets' stratified `train_test_split` (same checks, same rows for a source without repeated
texts) applied to the groups: each group is one unit, stratified by its first row's label. Neither datasets
nor scikit-learn has a stratified split by fraction that keeps groups whole (sklearn's StratifiedGroupKFold
splits into folds), so the group <-> row bookkeeping is here.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from datasets.utils.stratify import stratified_shuffle_split_generate_indices

from ..errors import DataError
from .columns import LABEL, TEXT, TEXT_PAIR, Scores, codes, column, is_multi_label, is_regression

COPIES_WARNING_FRACTION = 0.10  # warn when more than this share of a source's rows repeat an earlier row's text
_PAIR_SEPARATOR = "\x00"         # joins a pair's two texts into one key (a NUL is not text a file holds)


@dataclass(frozen=True)
class Copies:
    """How a source's rows repeat. `group`: each row's text (or pair) as a dense id, in order of first
    occurrence; `repeated_texts` (K) groups of more than one row, holding `repeated_rows` (M) rows, of which
    `conflicting` (C) carry more than one label (regression: more than one score)."""
    group: np.ndarray
    repeated_texts: int
    repeated_rows: int
    conflicting: int

    @property
    def rows(self) -> int:
        return len(self.group)

    @property
    def extra_rows(self) -> int:
        """Rows that repeat an earlier row's text."""
        return self.rows - (int(self.group.max()) + 1 if self.rows else 0)


def text_keys(split: dict) -> pa.ChunkedArray:
    """What makes two rows the same example: the text, or the pair (the same first text with another second
    text is another example)."""
    if TEXT_PAIR not in split:
        return split[TEXT]
    texts, pairs = (split[name].cast(pa.large_string()) for name in (TEXT, TEXT_PAIR))
    return pc.binary_join_element_wise(texts, pairs, pa.scalar(_PAIR_SEPARATOR, pa.large_string()))


def find_copies(split: dict) -> Copies:
    group, distinct = codes(text_keys(split))
    sizes = np.bincount(group, minlength=distinct)
    labels = split[LABEL].keys()
    combos = np.unique(group * (int(labels.max(initial=0)) + 1) + labels)  # distinct (group, label) pairs
    labelled = np.bincount(combos // (int(labels.max(initial=0)) + 1), minlength=distinct)
    repeated = sizes > 1
    return Copies(group, int(repeated.sum()), int(sizes[repeated].sum()), int((labelled > 1).sum()))


def exact_copies(split: dict, copies: Copies) -> np.ndarray:
    """The rows to keep under data.drop_duplicates=true: the first of rows with the same text and label."""
    labels = split[LABEL].keys()
    combos = copies.group * (int(labels.max(initial=0)) + 1) + labels
    return np.sort(np.unique(combos, return_index=True)[1])


def describe(copies: Copies, where: str, split: dict) -> tuple[str, str | None]:
    """The source's data line, and a warning when many rows are copies (None otherwise)."""
    texts = "text pairs" if TEXT_PAIR in split else "texts"
    labels = "different scores" if isinstance(split[LABEL], Scores) else "conflicting labels"
    line = (f"read {copies.rows} rows from {where}; {copies.repeated_texts} {texts} occur more than once "
            f"({copies.repeated_rows} rows), kept in one split; {copies.conflicting} carry {labels}")
    if copies.rows and copies.extra_rows > COPIES_WARNING_FRACTION * copies.rows:
        return line, (f"{where}: {copies.extra_rows} of {copies.rows} rows ({copies.extra_rows / copies.rows:.0%}) "
                      f"repeat an earlier row's {texts[:-1]}; each stays in one split, but repeated rows weigh more in "
                      "training: data.drop_duplicates=true drops exact copies (same text and label)")
    return line, None


def overlap(train: dict, other: dict) -> int:
    """How many rows of a given validation/test split have a text (pair) that training also holds."""
    return int(pc.sum(pc.is_in(text_keys(other), value_set=pc.unique(text_keys(train)))).as_py() or 0)


# --- the grouped split -------------------------------------------------------------------------

def grouped_split(pool: Dataset, group: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                  keep_test: Dataset | None) -> DatasetDict:
    """train/validation(/test) from `pool`, each group of rows (`group`: a dense id per row, in order of first
    occurrence) whole in one split; a given test split is kept."""
    if val_fraction <= 0:
        raise DataError("data.validation_fraction must be > 0 when no validation file/split is given")
    first = np.unique(group, return_index=True)[1]   # each group's first row (group ids increase with it)
    units = _Units(pool, first)
    rest, out = np.arange(len(first)), {}
    if test_fraction > 0 and keep_test is None:
        rest, test = units.split(rest, test_fraction, seed, "data.test_fraction")
        out["test"] = test
    rest, out["validation"] = units.split(rest, val_fraction / (1 - test_fraction if keep_test is None else 1),
                                          seed, "data.validation_fraction")
    out["train"] = rest
    rows = _rows_of_groups(group)
    splits = {name: pool.select(rows(groups)) for name, groups in out.items()}
    if keep_test is not None:
        splits["test"] = keep_test
    return DatasetDict({k: splits[k] for k in ("train", "validation", "test") if k in splits})


class _Units:
    """The groups of a pool as the units of a split: each stratified by its first row's label."""

    def __init__(self, pool: Dataset, first: np.ndarray):
        self.regression, self.multi = is_regression(pool), is_multi_label(pool)
        labels = column(pool, LABEL).take(pa.array(first))
        self.labels = labels.to_pylist() if self.multi else labels.to_numpy()

    def split(self, units: np.ndarray, fraction: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(kept, held out) of `units`, in datasets' order: the first split's units are the second's pool."""
        if self.regression:
            strata, by = None, LABEL
        elif self.multi:
            strata, by = np.array(strata_of([self.labels[u] for u in units]), dtype=np.int64), "_stratum"
        else:
            strata, by = self.labels[units], LABEL
        try:
            kept, held = split_indices(len(units), strata, fraction, seed, by)
        except ValueError as err:  # e.g. fewer held-out rows than classes
            raise DataError(f"cannot split {len(units)} training texts with {key}={fraction:g}: {err}") from err
        return units[kept], units[held]


def _rows_of_groups(group: np.ndarray):
    """groups -> their rows: the groups in the order given, each group's rows in file order."""
    by_group = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(group))])

    def rows(groups: np.ndarray) -> np.ndarray:
        if len(groups) == 0:
            return np.zeros(0, dtype=np.int64)
        lengths = starts[groups + 1] - starts[groups]
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return by_group[np.repeat(starts[groups], lengths) + offsets]
    return rows


def split_indices(n_samples: int, strata: np.ndarray | None, test_size: float, seed: int, by: str):
    """The (train, test) indices of `Dataset.train_test_split(test_size, stratify_by_column=by, seed=seed)`
    (datasets 2.x-5.x) over `n_samples` units, its checks and messages included; `strata` None: a seeded random
    split (no stratification)."""
    if n_samples == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if test_size <= 0 or test_size >= 1:
        raise ValueError(f"test_size={test_size} should be either positive and smaller "
                         f"than the number of samples {n_samples} or a float in the (0, 1) range")
    n_test = math.ceil(test_size * n_samples)
    n_train = n_samples - n_test
    if n_train == 0:
        raise ValueError(f"With n_samples={n_samples}, test_size={test_size} and train_size=None, the "
                         "resulting train set will be empty. Adjust any of the aforementioned parameters.")
    rng = np.random.default_rng(seed)
    if strata is None:
        permutation = rng.permutation(n_samples)
        return permutation[n_test:], permutation[:n_test]
    try:
        return next(stratified_shuffle_split_generate_indices(strata, n_train, n_test, rng=rng))
    except ValueError as error:
        if str(error) == "Minimum class count error":
            raise ValueError(f"The least populated class in {by} column has only 1 member, which is too few. "
                             "The minimum number of groups for any class cannot be less than 2.") from None
        raise


def strata_of(label_sets: list[list[int]]) -> list[int]:
    """Each multi-label row's stratum (0: rare, 1: empty, 2 + label id): its rarest label (by count in
    these rows; ties: the lowest id), so rare labels are spread over the splits first; the empty set is
    a stratum of its own. A stratified split needs 2 rows per stratum: smaller strata are pooled as
    `rare`, and a lone `rare` row joins the largest stratum (ties: the lowest key)."""
    counts = Counter(label for labels in label_sets for label in labels)
    keys = [min(labels, key=lambda label: (counts[label], label)) if labels else _EMPTY
            for labels in label_sets]
    sizes = Counter(keys)
    keys = [key if sizes[key] >= 2 else _RARE for key in keys]
    sizes = Counter(keys)
    if sizes[_RARE] == 1 and len(sizes) > 1:
        largest = max((key for key in sizes if key != _RARE), key=lambda key: (sizes[key], -key))
        keys = [largest if key == _RARE else key for key in keys]
    return [key - _RARE for key in keys]


_RARE, _EMPTY = -2, -1  # strata keys below the label ids


def capped(splits: DatasetDict, caps: dict[str, int | None], seed: int) -> DatasetDict:
    """Each split cut to its cap (a seeded sample; None: all); an empty split stops the run."""
    out = {}
    for split, ds in splits.items():
        cap = caps[split]
        if cap is not None and cap < len(ds):
            ds = ds.shuffle(seed=seed).select(range(cap)).flatten_indices()
        if len(ds) == 0:
            raise DataError(f"the {split} split is empty")
        out[split] = ds
    return DatasetDict(out)
