"""Data preparation at scale: texts stay in Arrow, the splits are pinned to what the list-based code
produced, tokenization in several processes matches one, data.num_proc is checked, the data_scale bench."""

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


# Recorded from the list-based code (commit d1900d9, src/dist_gacc/data.py) with _digest above.
PINNED = {
    "rotten_tomatoes/42": "60ca1501d0b9c8c8",
    "rotten_tomatoes/capped/3": "8581776b84f264e6",
    "debates/1": "1f524edf9d2df9b2",
    "review_pairs/0": "94c480c7f7ada41a",
    "chinese_reviews/0": "31ff38545302cc79",
    "csv/7": "0c77fa2a9733d734",
    "csv/pairs/1": "213575cbb2fc34bf",
    "csv/multi/2": "a9cdd971ccd09cef",
}


def test_splits_are_pinned_to_the_list_based_code(tmp_path):
    """Every split of the embedded corpora and of csv/jsonl fixtures (duplicates, conflicts, pairs, label
    sets) holds the same rows in the same order as before the Arrow rewrite."""
    cases = _pinned_cases(_pin_files(tmp_path))
    got = {key: _digest(load_splits(cfg, seed)) for key, (cfg, seed) in cases.items()}
    assert got == PINNED


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
    from dist_gacc.data import _check_utf8
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
        for key in ("read_dedupe_split_s", "tokenize_s", "total_s", "peak_rss_mb_above_baseline",
                    "s_per_100k_rows", "mb_per_100k_rows", "tokens_per_row"):
            assert row[key] > 0, (key, row)
        assert row["total_s"] >= row["tokenize_s"] and row["kept_rows"] < row["rows"]  # duplicates were dropped
    assert markdown(rows).count("\n") == len(rows) + 1
