"""Data preparation at scale: texts stay in Arrow, the splits are pinned (and are datasets' own where no text
repeats), tokenization in several processes matches one, data.num_proc is checked, the data_scale bench."""

import hashlib
import json
import os
import sys

import pytest

from dist_gacc.config import DataConfig
from dist_gacc.data import load_splits


def _pin_files(tmp_path) -> dict[str, str]:
    """Small fixtures with duplicate rows, conflicting duplicates, pairs and label sets."""
    texts = [f"row {i % 90} {'x' * (i % 90 % 7)}" for i in range(400)]  # row i and i + 90: the same text
    labels = [["a", "b", "c"][i * 7 % 3] if i % 90 != 5 else "ab"[i % 2] for i in range(400)]  # 'row 5': conflicts
    csv = tmp_path / "pin.csv"
    csv.write_text("\n".join(["text,label"] + [f"{t},{y}" for t, y in zip(texts, labels)]) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"q": f"q {i % 50}", "a": f"a {i % 3}", "y": i % 50 % 2}) for i in range(300)))
    multi = tmp_path / "multi.jsonl"
    multi.write_text("\n".join(json.dumps({"text": f"m {i % 170}", "tags": [t for t, k in (("p", 2), ("q", 3), ("r", 5))
                                                                            if i % 170 % k == 0]}) for i in range(360)))
    return {"csv": str(csv), "pairs": str(pairs), "multi": str(multi)}


def _pinned_cases(files):
    return {
        "rotten_tomatoes/42": (DataConfig(name="rotten_tomatoes"), 42),
        "rotten_tomatoes/capped/3": (DataConfig(name="rotten_tomatoes", max_train_samples=500, max_eval_samples=50), 3),
        "debates/1": (DataConfig(name="debates", validation_fraction=0.15, test_fraction=0.15), 1),
        "review_pairs/0": (DataConfig(name="review_pairs"), 0),
        "chinese_reviews/0": (DataConfig(name="chinese_reviews"), 0),
        "csv/7": (DataConfig(name="csv", train_file=files["csv"], validation_fraction=0.2, test_fraction=0.1), 7),
        "csv/pairs/1": (DataConfig(name="csv", train_file=files["pairs"], text_column="q", text_pair_column="a",
                                   label_column="y", validation_fraction=0.2), 1),
        "csv/multi/2": (DataConfig(name="csv", train_file=files["multi"], label_column="tags", multi_label=True,
                                   validation_fraction=0.2, test_fraction=0.1), 2),
    }


def _digest(splits) -> str:
    digest = hashlib.sha256()
    for name in splits:
        ds = splits[name]
        digest.update(name.encode())
        digest.update(repr(ds.features).encode())
        for column in ds.column_names:
            digest.update(json.dumps(list(ds[column])).encode())
    return digest.hexdigest()[:16]


# Recorded with _digest above from the grouped split (every row kept, each repeated text in one split). review_pairs
# (no repeated text) holds the digest of the earlier list-based, deduplicating code.
PINNED = {
    "rotten_tomatoes/42": "95a8fb8bde93a8c2",
    "rotten_tomatoes/capped/3": "7c2ab9abbdc97417",
    "debates/1": "5151f1b954f83835",
    "review_pairs/0": "94c480c7f7ada41a",
    "chinese_reviews/0": "a6c11ec03322ebf9",
    "csv/7": "586b5b6eab382a31",
    "csv/pairs/1": "35d6ab907885f689",
    "csv/multi/2": "d5f77f73f637de8d",
}


def test_splits_are_pinned(tmp_path):
    """Every split of the embedded corpora and of csv/jsonl fixtures (repeated texts, conflicts, pairs, label
    sets) holds the rows it held when pinned, in the same order."""
    cases = _pinned_cases(_pin_files(tmp_path))
    got = {key: _digest(load_splits(cfg, seed)) for key, (cfg, seed) in cases.items()}
    assert got == PINNED


@pytest.mark.parametrize("name", ["review_pairs", "word_pleasantness"])
def test_without_repeated_texts_the_split_is_datasets_own(name):
    """Where no text repeats, each group is one row and the split is datasets' train_test_split, row for row:
    stratified by label (review_pairs) or a seeded permutation (word_pleasantness, regression)."""
    from dist_gacc.data.columns import build, from_python
    from dist_gacc.data.corpora import embedded_columns

    columns, names = embedded_columns(name)
    regression = name == "word_pleasantness"
    pool = build(from_python(columns, regression=regression), names, False)
    stratify = None if regression else "label"
    first = pool.train_test_split(test_size=0.1, seed=5, stratify_by_column=stratify)
    second = first["train"].train_test_split(test_size=0.1 / 0.9, seed=5, stratify_by_column=stratify)
    ours = load_splits(DataConfig(name=name, validation_fraction=0.1, test_fraction=0.1), seed=5)
    for split, theirs in (("train", second["train"]), ("validation", second["test"]), ("test", first["test"])):
        assert ours[split]["text"] == theirs["text"] and ours[split]["label"] == theirs["label"], split


def test_several_processes_tokenize_exactly_like_one(tmp_path):
    """data.num_proc=2 (forced on a small csv) stores the same rows, order, values and storage types as 1."""
    from dist_gacc.data import resolve_num_proc, tokenize, train_texts
    from test_data import _tiny_tokenizer

    path = tmp_path / "t.csv"
    path.write_text("text,b,label\n" + "".join(f"row {i} {'word ' * (i % 13)},pair {i % 5},{'xyz'[i % 3]}\n"
                                                for i in range(240)))
    splits = load_splits(DataConfig(name="csv", train_file=str(path), text_pair_column="b"), seed=0)
    tok = _tiny_tokenizer(train_texts(splits["train"]))
    one, two = tokenize(splits, tok, 16, num_proc=1), tokenize(splits, tok, 16, num_proc=2)
    for split in one:
        assert one[split].features == two[split].features
        assert one[split].data.table.equals(two[split].data.table)
    train = one["train"]
    assert train.features["input_ids"].feature.dtype == "int32"  # small storage; batches are int64 tensors
    assert train.features["attention_mask"].feature.dtype == "int8"
    # Straight from the Rust tokenizer, yet exactly what the tokenizer call returns (pairs, truncation).
    expected = tok(list(splits["train"]["text"]), list(splits["train"]["text_pair"]), truncation="longest_first",
                   max_length=16)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert list(train[key]) == expected[key]
    assert resolve_num_proc(3, 2) == 2  # never more processes than rows
    assert [resolve_num_proc("auto", rows, cores) for rows, cores in ((100, 8), (60_000, 2), (60_000, 3),
                                                                         (60_000, 16))] == [1, 1, 3, 4]


def test_batches_are_int64_from_small_storage(tmp_path):
    import torch

    from dist_gacc.data import eval_loaders, tokenize
    from test_data import _tiny_tokenized_inputs

    splits, tok = _tiny_tokenized_inputs(40)
    encoded = tokenize(splits, tok, 32)
    batch = next(iter(eval_loaders(encoded, tok, 8, 0, pin_memory=False, seed=0)["validation"]))
    assert {batch[k].dtype for k in ("input_ids", "attention_mask", "token_type_ids", "labels")} == {torch.int64}


def test_train_texts_reads_the_arrow_columns():
    from dist_gacc.data import as_dataset, train_texts

    ds = as_dataset([f"t{i}" for i in range(25)], ["a", "b"] * 12 + ["a"], ["a", "b"])
    texts = train_texts(ds)
    assert len(texts) == 25 and list(texts) == list(texts) == [f"t{i}" for i in range(25)]  # re-iterable


def test_bad_num_proc_is_named():
    from conftest import compose_cfg
    from dist_gacc.config import load_config
    from dist_gacc.errors import ConfigError

    for bad in (0, -2, "many", True, 1.5):
        with pytest.raises(ConfigError, match=r"data.num_proc must be auto or an integer >= 1, got"):
            DataConfig(name="rotten_tomatoes", num_proc=bad)
    assert DataConfig(num_proc=3).num_proc == 3 and DataConfig().num_proc == "auto"
    assert load_config(compose_cfg("data.num_proc=2", "output_dir=/tmp/x")).data.num_proc == 2
    with pytest.raises(ConfigError, match=r"data.num_proc must be auto or an integer >= 1, got 0"):
        load_config(compose_cfg("data.num_proc=0", "output_dir=/tmp/x"))


def test_utf8_check_streams_and_names_the_line(tmp_path):
    from dist_gacc.data.tables import _check_utf8
    from dist_gacc.errors import DataError

    path = tmp_path / "t.csv"
    body = ("text,label\n" + "caf\u00e9 ok,1\n" * 5).encode()  # 2-byte characters cut across chunk edges
    path.write_bytes(body + b"bad \xff,0\n")
    for chunk in (1, 3, 7, 1 << 20):
        with pytest.raises(DataError, match=rf"not UTF-8 text: line 7, byte {len(body) + 4} \(b'\\xff'\)"):
            _check_utf8(str(path), chunk_bytes=chunk)
    path.write_bytes(body)
    _check_utf8(str(path), chunk_bytes=3)


@pytest.mark.slow
def test_data_scale_section_quick_mode(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from bench_data_scale import QUICK_ROWS, markdown, section_data_scale

    rows = section_data_scale([10**9], tmp_path, quick=True)  # quick: QUICK_ROWS, not the sizes given
    assert [row["rows"] for row in rows] == QUICK_ROWS
    for row in rows:
        for key in ("read_split_s", "tokenize_s", "total_s", "peak_rss_mb_above_baseline",
                    "s_per_100k_rows", "mb_per_100k_rows", "tokens_per_row"):
            assert row[key] > 0, (key, row)
        assert row["total_s"] >= row["tokenize_s"] and row["kept_rows"] == row["rows"]  # every row kept
    assert markdown(rows).count("\n") == len(rows) + 1
