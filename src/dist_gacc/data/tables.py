"""Reading user files: .csv/.tsv/.json/.jsonl/.parquet (text formats optionally compressed), through datasets'
builders, with a UTF-8 check that names the bad line and the choice between the two .tsv dialects."""

from __future__ import annotations

import codecs
import csv
import importlib.util
import itertools
from collections.abc import Iterator

import datasets
import fsspec
from datasets import Dataset

from ..config import COMPRESSION_SUFFIXES, DATA_FILE_SUFFIXES, TSV_QUOTINGS, table_suffix
from ..errors import ConfigError, DataError


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
