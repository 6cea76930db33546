"""A split's columns in Arrow form, and the `datasets.Dataset` they become.

A source (an embedded corpus, a file, a Hub split) is first read into columns: `text` and, for sentence pairs,
`text_pair` as Arrow strings, and `label` as a `Labels` (class names: one per row, or a set per row with
data.multi_label) or `Scores` (regression: one float per row). `build` turns the columns (or some of their
rows) into a Dataset whose `label` is a ClassLabel id, a List(ClassLabel) of ids, or a float64 Value.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, Value
from datasets.table import InMemoryTable

TEXT, TEXT_PAIR, LABEL = "text", "text_pair", "label"


def factorize(values: list) -> np.ndarray:
    """Equal values -> equal small integers (labels, or multi-label sets as sorted lists)."""
    codes: dict = {}
    return np.fromiter((codes.setdefault(tuple(v) if isinstance(v, list) else v, len(codes)) for v in values),
                       dtype=np.int64, count=len(values))


def codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Each row's index among the column's distinct values (Arrow hashing; distinct values in order of first
    occurrence), and how many there are."""
    distinct = pc.unique(column)
    return pc.index_in(column, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.int64), len(distinct)


class Labels:
    """A split's labels before they are ids. Single-label: each row's code into `values` (the distinct
    label strings), kept as numpy; multi-label: `sets`, each row's sorted list of label strings."""

    def __init__(self, values: list[str] | None = None, codes: np.ndarray | None = None,
                 sets: list[list[str]] | None = None):
        self.values, self.codes, self.sets = values, codes, sets

    def __len__(self) -> int:
        return len(self.sets) if self.sets is not None else len(self.codes)

    def names(self) -> set[str]:
        if self.sets is not None:
            return {label for row in self.sets for label in row}
        return {self.values[i] for i in np.unique(self.codes)}

    def keys(self) -> np.ndarray:
        """Equal labels -> equal integers (what finding copies compares)."""
        return factorize(self.sets) if self.sets is not None else self.codes

    def take(self, rows: np.ndarray) -> Labels:
        if self.sets is not None:
            return Labels(sets=[self.sets[row] for row in rows])
        return Labels(self.values, self.codes[rows])

    def ids(self, names: list[str], rows: np.ndarray | None) -> pa.Array:
        index = {name: i for i, name in enumerate(names)}
        if self.sets is not None:
            sets = self.sets if rows is None else [self.sets[row] for row in rows]
            return pa.array([[index[label] for label in labels] for labels in sets], pa.list_(pa.int64()))
        ids = np.array([index.get(value, -1) for value in self.values], dtype=np.int64)[self.codes]
        return pa.array(ids if rows is None else ids[rows])


class Scores:
    """A regression split's labels: one finite float per row (checked where they are read)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def keys(self) -> np.ndarray:
        """Equal scores -> equal integers."""
        return np.unique(self.values, return_inverse=True)[1].astype(np.int64).reshape(-1)

    def take(self, rows: np.ndarray) -> Scores:
        return Scores(self.values[rows])

    def ids(self, names: list[str], rows: np.ndarray | None) -> pa.Array:
        return pa.array(self.values if rows is None else self.values[rows], pa.float64())


def from_python(columns: dict[str, list], multi_label: bool = False, regression: bool = False) -> dict:
    """Python columns (the embedded corpora, tests) -> the Arrow form `build` takes."""
    out = {name: pa.chunked_array([pa.array(columns[name], pa.string())]) for name in (TEXT, TEXT_PAIR)
           if name in columns}
    if regression:
        out[LABEL] = Scores(np.asarray(columns[LABEL], dtype=np.float64))
    elif multi_label:
        out[LABEL] = Labels(sets=[list(labels) for labels in columns[LABEL]])
    else:
        values = list(dict.fromkeys(columns[LABEL]))
        index = {value: i for i, value in enumerate(values)}
        out[LABEL] = Labels(values, np.fromiter((index[v] for v in columns[LABEL]), np.int64, len(columns[LABEL])))
    return out


def take(split: dict, rows: np.ndarray) -> dict:
    """Some rows of a split's columns, in the order given."""
    return {name: values.take(rows if isinstance(values, (Labels, Scores)) else pa.array(rows))
            for name, values in split.items()}


def build(split: dict, names: list[str], multi_label: bool, rows: np.ndarray | None = None) -> Dataset:
    """{text, [text_pair]: Arrow strings, label: Labels | Scores} -> a Dataset of the `rows` (None: all), labels
    as ids."""
    features = {TEXT: Value("string")}
    if TEXT_PAIR in split:
        features[TEXT_PAIR] = Value("string")
    if isinstance(split[LABEL], Scores):
        features[LABEL] = Value("float64")
    else:
        features[LABEL] = List(ClassLabel(names=names)) if multi_label else ClassLabel(names=names)
    features = Features(features)
    arrays = []
    for name in features:
        if name == LABEL:
            arrays.append(split[LABEL].ids(names, rows))
            continue
        column = split[name] if rows is None or _is_all(rows, len(split[name])) else split[name].take(pa.array(rows))
        arrays.append(column.cast(pa.string()))
    table = pa.Table.from_arrays(arrays, schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features))


def _is_all(rows: np.ndarray, length: int) -> bool:
    return len(rows) == length and (length == 0 or (rows[0] == 0 and rows[-1] == length - 1
                                                    and bool(np.all(np.diff(rows) == 1))))


def as_dataset(texts: list[str], labels: list[str], names: list[str], multi_label: bool = False) -> Dataset:
    """Texts and label names (sets of names if multi_label) -> a Dataset of label ids."""
    return build(from_python({TEXT: texts, LABEL: labels}, multi_label), names, multi_label)


def is_multi_label(ds: Dataset | DatasetDict) -> bool:
    """Whether `label` holds a set of label ids per row (data.multi_label) rather than one id."""
    if isinstance(ds, DatasetDict):
        ds = ds["train"]
    return isinstance(ds.features[LABEL], List)


def is_regression(ds: Dataset | DatasetDict) -> bool:
    """Whether `label` holds one number per row (data.problem_type=regression, or auto on a float column)."""
    if isinstance(ds, DatasetDict):
        ds = ds["train"]
    return isinstance(ds.features[LABEL], Value)


def label_names(ds: Dataset | DatasetDict) -> list[str]:
    """The label names in id order of a split (a DatasetDict: its train split), single- or multi-label;
    [] for regression (its one output is named by `corpora.score_name`)."""
    if isinstance(ds, DatasetDict):
        ds = ds["train"]
    feature = ds.features[LABEL]
    if isinstance(feature, Value):
        return []
    return list((feature.feature if isinstance(feature, List) else feature).names)


def column(ds: Dataset, name: str) -> pa.ChunkedArray:
    """One column of a split as Arrow, in the split's row order (an indices mapping is applied by `take`)."""
    return ds.select_columns([name]).with_format("arrow")[:].column(name)


class _TextColumns:
    """The texts of a split, read from Arrow a batch at a time: iterable (more than once) and sized,
    without a Python list of every text."""

    def __init__(self, ds: Dataset, columns: list[str], batch_size: int = 10_000):
        self.ds, self.columns, self.batch_size = ds, columns, batch_size

    def __len__(self) -> int:
        return len(self.ds) * len(self.columns)

    def __iter__(self) -> Iterator[str]:
        for name in self.columns:
            for batch in self.ds.select_columns([name]).with_format("arrow").iter(batch_size=self.batch_size):
                yield from batch.column(name).to_pylist()


def train_texts(ds: Dataset) -> _TextColumns:
    """All texts of a split, second texts of pairs included (a from-scratch vocabulary is built from them):
    an iterable over the Arrow column, so a pretrained model's run never makes a list of them."""
    return _TextColumns(ds, [TEXT] + ([TEXT_PAIR] if TEXT_PAIR in ds.column_names else []))
