"""Tokenization: every split once, before training, through the tokenizer's own encoding (no padding: the
collator pads each batch), kept in a content-keyed cache so a rerun, a resumed run or a sweep job loads it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import datasets
import pyarrow as pa
from datasets import DatasetDict, Features, List, Value

from .columns import LABEL, TEXT, TEXT_PAIR, is_multi_label, is_regression, label_names


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

    def encode(batch):
        out = tokenizer(*(batch[name] for name in texts), truncation="longest_first", max_length=max_length)
        out = {name: pa.array(out[name], type=features[name].pa_type) for name in sample}
        if multi:  # BCE targets: float, not int
            out["labels"] = pa.array([_multi_hot(ids, num_labels) for ids in batch[LABEL]], pa.list_(pa.float32()))
        else:  # a returned table is the whole row: the label goes along
            out[LABEL] = pa.array(batch[LABEL], pa.float32() if regression else pa.int64())
        return pa.table(out)

    # datasets would fingerprint `encode` by pickling the tokenizer (seconds, per split): a key of its spec instead
    spec = f"{tokenizer_spec(tokenizer)}|{max_length}|{texts}|{multi}|{regression}"
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
    """A content key: the tokenizer (`tokenizer_spec`), max_length, and each split's rows as Arrow IPC bytes
    (selected rows only, no Python strings; the schema tells single- from multi-label)."""
    digest = hashlib.sha256(f"{type(tokenizer).__name__}|{max_length}|{tokenizer_spec(tokenizer)}".encode())
    for name in sorted(splits):
        columns = [c for c in (TEXT, TEXT_PAIR, LABEL) if c in splits[name].column_names]
        table = splits[name].select_columns(columns).with_format("arrow")[:]
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(name.encode())
        digest.update(memoryview(sink.getvalue()))
    return digest.hexdigest()[:24]


def tokenizer_spec(tokenizer) -> str:
    """What decides a tokenizer's output, as text: a fast tokenizer's Rust spec (minus the truncation/padding
    state that encoding leaves in it); for a slow-only one (ByT5, CANINE: no Rust backend), its class and a digest
    of the files save_pretrained writes (its vocabulary and configuration)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for state in ("truncation", "padding"):
            spec.pop(state, None)
        return json.dumps(spec, sort_keys=True)
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for name in sorted(os.listdir(folder)):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()
