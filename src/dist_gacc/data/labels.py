"""Labels of a user source (a file or a Hub split): the problem type, the checked columns, the label names.

A source's columns are checked over whole columns (the first bad row is named) and become the column form
of columns.py: texts as Arrow strings, labels as `Labels` (class names; sets of names with data.multi_label)
or `Scores` (regression). Class names keep a ClassLabel's own names; other labels are their text, integers
and whole-number floats written as integers ("1", not "1.0").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, Value

from ..config import DataConfig
from ..errors import DataError
from .columns import LABEL, TEXT, TEXT_PAIR, Labels, Scores, codes, column

# problem_type=auto: a float label column whose values are all whole numbers, with at most this many distinct
# values, holds class ids (what pandas writes for an integer column with a missing cell), not scores.
MAX_WHOLE_NUMBER_CLASSES = 20


@dataclass(frozen=True)
class ProblemType:
    """data.problem_type resolved on the training source, and why (named in the data lines and in errors)."""
    name: str   # classification | regression
    why: str    # "data.problem_type=regression", or "data.problem_type=auto chose ...: <reason>"


def resolve_problem_type(ds: Dataset, cfg: DataConfig) -> ProblemType:
    """auto: regression where the label column holds numbers that are not class ids -- a float type with a
    fractional value, or more than MAX_WHOLE_NUMBER_CLASSES distinct whole numbers; classification otherwise
    (strings, integers: ratings 1..5 stay classes; whole-number floats such as 0.0, 1.0)."""
    if cfg.problem_type != "auto":
        return ProblemType(cfg.problem_type, f"data.problem_type={cfg.problem_type}")
    feature, name, chose = ds.features.get(cfg.label_column), cfg.label_column, "data.problem_type=auto chose"
    if cfg.multi_label:
        return ProblemType("classification", f"{chose} multi-label classification (data.multi_label=true)")
    if feature is None:  # checked_columns names the missing column
        return ProblemType("classification", f"{chose} classification")
    if not (isinstance(feature, Value) and feature.dtype.startswith("float")):
        held = "class names" if isinstance(feature, ClassLabel) else \
            f"{feature.dtype} values" if isinstance(feature, Value) else type(feature).__name__
        return ProblemType("classification", f"{chose} classification: column {name!r} holds {held}")
    values = column(ds, name).drop_null().to_numpy()
    values = values[np.isfinite(values)]
    fractional = np.flatnonzero(values != np.round(values))
    distinct = np.unique(values)
    if len(fractional):
        return ProblemType("regression", f"{chose} regression: column {name!r} holds fractional numbers "
                                         f"(e.g. {values[fractional[0]]:g})")
    if len(distinct) > MAX_WHOLE_NUMBER_CLASSES:
        return ProblemType("regression", f"{chose} regression: column {name!r} holds {len(distinct)} distinct whole "
                                         f"numbers (class ids: at most {MAX_WHOLE_NUMBER_CLASSES})")
    shown = ", ".join(f"{v:g}" for v in distinct[:MAX_WHOLE_NUMBER_CLASSES])
    return ProblemType("classification", f"{chose} classification: column {name!r} holds floats that are all whole "
                                         f"numbers, {len(distinct)} distinct ({shown}): class ids; set "
                                         "data.problem_type=regression to fit them as numbers")


def checked_columns(ds: Dataset, where: str, cfg: DataConfig, problem: ProblemType) -> dict:
    """{text, text_pair (if data.text_pair_column): Arrow strings, label: Labels | Scores} of one source split,
    checked over whole columns; the first bad row is named.

    Labels are strings; with data.multi_label, each row's label is a sorted list of distinct strings."""
    wanted = {TEXT: "text_column", TEXT_PAIR: "text_pair_column", LABEL: "label_column"}
    wanted = {name: key for name, key in wanted.items() if getattr(cfg, key)}
    for key in wanted.values():
        if getattr(cfg, key) not in ds.column_names:
            raise DataError(f"{where}: no column {getattr(cfg, key)!r} (columns: {ds.column_names}); set data.{key}")
    out = {name: _texts(ds, where, getattr(cfg, wanted[name])) for name in (TEXT, TEXT_PAIR) if name in wanted}
    if problem.name == "regression":
        out[LABEL] = Scores(_numbers(ds, where, cfg.label_column, problem))
    elif cfg.multi_label:
        labels = _named(_decoded(ds, cfg.label_column), ds.features[cfg.label_column])
        out[LABEL] = Labels(sets=[_label_set(value, where, row, cfg) for row, value in enumerate(labels)])
    else:
        out[LABEL] = _class_labels(ds, where, cfg.label_column)
    return out


def _texts(ds: Dataset, where: str, name: str) -> pa.ChunkedArray:
    if _plain(ds, name):
        texts = column(ds, name)
        row = _first_bad_text(texts)
        text = None if row is None else texts[row].as_py()
    else:  # a feature that decodes (e.g. datasets' Json): check the decoded values
        values = _decoded(ds, name)
        row = next((row for row, text in enumerate(values) if not isinstance(text, str) or not text.strip()), None)
        text = None if row is None else values[row]
        texts = pa.chunked_array([pa.array(values if row is None else [], pa.string())])
    if row is not None:
        raise DataError(f"{where}: row {row}: column {name!r} is empty or not text: {text!r}")
    return texts


def _class_labels(ds: Dataset, where: str, name: str) -> Labels:
    """One class per row: a ClassLabel id becomes its name (-1, datasets' "no label", is empty); a whole-number
    float its integer ("1.0" -> "1"); anything else its text."""
    feature = ds.features[name]
    if isinstance(feature, ClassLabel):
        ids = column(ds, name)
        ids = pc.if_else(pc.less(ids, 0), pa.scalar(None, ids.type), ids)
        labels = pc.take(pa.array(feature.names, pa.string()), ids)
    elif not _plain(ds, name):
        labels = pa.chunked_array([pa.array([None if v is None else str(v) for v in _decoded(ds, name)], pa.string())])
    else:
        labels = column(ds, name)
        if pa.types.is_floating(labels.type):
            labels = _whole_numbers_as_text(labels)
    if labels.null_count:
        row = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {row}: column {name!r} is empty")
    row_codes, _ = codes(labels)
    return Labels([str(value) for value in pc.unique(labels).to_pylist()], row_codes)


def _whole_numbers_as_text(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Floats -> text, whole numbers without their ".0" (a class id written by pandas after a missing cell)."""
    numbers = values.to_numpy(zero_copy_only=False)
    whole = np.isfinite(numbers) & (numbers == np.round(numbers))
    text = [None if value is None else (str(int(value)) if ok else str(value))
            for value, ok in zip(values.to_pylist(), whole)]
    return pa.chunked_array([pa.array(text, pa.string())])


def _named(values: list, feature) -> list:
    """Multi-label values with a List(ClassLabel) feature: ids -> names."""
    inner = getattr(feature, "feature", None)
    if not isinstance(inner, ClassLabel):
        return values
    return [None if ids is None else [inner.int2str(i) for i in ids] for ids in values]


def _numbers(ds: Dataset, where: str, name: str, problem: ProblemType) -> np.ndarray:
    """A regression label column as float64. The first row that is empty, not a number or not finite stops the
    run, named (a NaN or infinite label would make every update non-finite)."""
    raw = column(ds, name).to_pandas() if _plain(ds, name) else pd.Series(_decoded(ds, name), dtype=object)
    if pd.api.types.is_bool_dtype(raw):
        raise DataError(f"{where}: column {name!r} holds true/false, not numbers ({problem.why})")
    numbers = pd.to_numeric(raw, errors="coerce").astype(np.float64).to_numpy()  # not a number -> NaN
    bad = ~np.isfinite(numbers)
    if bad.any():
        row = int(np.argmax(bad))
        value = raw.iloc[row]
        value = value.item() if isinstance(value, np.generic) else value  # 'inf', not np.float64(inf)
        what = "is empty (or a missing-value marker: NA, n/a, null, ...)" \
            if value is None or (isinstance(value, float) and math.isnan(value)) else \
            f"is not a finite number: {value!r}"
        raise DataError(f"{where}: row {row}: column {name!r} {what} ({problem.why}; as regression, every label "
                        "must be a finite number)")
    return numbers


def _plain(ds: Dataset, name: str) -> bool:
    """Whether a column's Arrow values are its values (a Value or ClassLabel feature, no decoding)."""
    return isinstance(ds.features[name], (Value, ClassLabel))


def _decoded(ds: Dataset, name: str) -> list:
    """A column's values as datasets decodes them, in one batch (for features such as Json)."""
    return ds.select_columns([name])[:][name]


def _first_bad_text(texts: pa.ChunkedArray) -> int | None:
    """The first row that is missing, empty or whitespace only, or not text; None if every row is text."""
    if len(texts) == 0:
        return None
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        return 0  # numbers, lists, ...: no row is text
    bad = pc.or_kleene(texts.is_null(), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0))
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
    return sorted(labels, key=label_sort_key)


def label_names_of(raw: dict[str, dict], train: Dataset, cfg: DataConfig) -> list[str]:
    """The class names in id order: a ClassLabel's own names and order (ids keep the dataset's meaning), else
    the training split's labels sorted (integers numerically). A label of another split that training never
    saw, or fewer than 2 names, stops the run."""
    feature = train.features[cfg.label_column]
    feature = getattr(feature, "feature", feature) if cfg.multi_label else feature
    names = list(feature.names) if isinstance(feature, ClassLabel) else \
        sorted(raw["train"][LABEL].names(), key=label_sort_key)
    for split, columns in raw.items():
        unknown = sorted(columns[LABEL].names() - set(names), key=label_sort_key)
        if unknown:
            raise DataError(f"{split} split: label value(s) {unknown} of column {cfg.label_column!r} "
                            f"do not occur in the training data (labels: {names})")
    if len(names) < 2:
        # Multi-label too: with one name transformers would take num_labels=1 for regression.
        kind = "a multi-label classifier needs at least 2 label names" if cfg.multi_label else \
            "a classifier needs at least 2"
        raise DataError(f"training data has {len(names)} label value(s) {names} in column "
                        f"{cfg.label_column!r}; {kind}")
    return names


def label_sort_key(label: str):
    # Integer labels sort numerically ("2" < "10"), so label ids keep their usual meaning. Only ASCII
    # digits: "①" and "²" are digits to str.isdigit() but not to int(); they sort as strings. The label
    # breaks ties ("01" and "1"), so the order never depends on the order labels were seen in.
    return (0, int(label), label) if _INTEGER.fullmatch(label) else (1, 0, label)


_INTEGER = re.compile(r"-?[0-9]+")
