"""trainer.baseline and model/README.md (issue 25): a TF-IDF + linear baseline on the run's own splits, scored
with the run's metric code, a warning exactly when the fine-tuned model does not beat it, and a model card that
huggingface_hub parses and that carries the run's figures."""

import json
import os
import random
import re
import signal
import sys
import time

import numpy as np
import pytest
from huggingface_hub import ModelCard
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MultiLabelBinarizer

from conftest import TINY, TRAIN, compose_cfg, launch, read_metrics, start_launch
from dist_gacc import baseline, card
from dist_gacc.config import DataConfig, load_config
from dist_gacc.data import load_splits
from dist_gacc.errors import ConfigError
from dist_gacc.resolvers import embedded_model
from dist_gacc.summary import summarize
from test_resume import children

# A real 3-class task, class-weighted: the baseline must use balanced weights too. Two updates of a tiny BERT
# from scratch: far below the baseline, so the run must warn.
DEBATES = [*(o for o in TINY if not o.startswith("data.max_train_samples")), "data=debates",
           "data.max_train_samples=200", "trainer.max_steps=2",
           "trainer.class_weights=balanced", "trainer.log_with=none"]


@pytest.fixture(scope="module")
def debates_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    proc = launch(run_dir, *DEBATES)
    return run_dir, proc.stdout + proc.stderr


def independent_scores(splits, class_weight):
    """scikit-learn alone, as the issue's ten lines: TF-IDF unigrams+bigrams, logistic regression."""
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          LogisticRegression(max_iter=1000, class_weight=class_weight, random_state=42))
    model.fit(list(splits["train"]["text"]), np.asarray(splits["train"]["label"]))
    out = {}
    for split in ("validation", "test"):
        predicted = model.predict(list(splits[split]["text"]))
        out[split] = (f1_score(splits[split]["label"], predicted, average="macro"),
                      accuracy_score(splits[split]["label"], predicted))
    return out


@pytest.mark.slow  # a real training run (debates_run)
def test_baseline_scores_equal_scikit_learn_on_the_same_splits(debates_run):
    run_dir, _ = debates_run
    m = read_metrics(run_dir)
    splits = load_splits(load_config(compose_cfg(*DEBATES, "output_dir=unused")).data, 42)
    assert m["baseline"]["validation"]["num_examples"] == len(splits["validation"]) == m["eval"]["num_examples"]
    for split, (f1, accuracy) in independent_scores(splits, "balanced").items():
        assert m["baseline"][split]["f1"] == pytest.approx(f1, abs=1e-12), split
        assert m["baseline"][split]["accuracy"] == pytest.approx(accuracy, abs=1e-12), split
        assert m["baseline"][split]["average"] == "macro"
        assert set(m["baseline"][split]["per_label"]) == {"Democratic", "Moderator", "Republican"}
    # Unweighted, the scores differ: the balanced weights were really used.
    assert independent_scores(splits, None)["validation"][0] != m["baseline"]["validation"]["f1"]
    settings = m["baseline"]["settings"]
    assert settings["class_weight"] == "balanced" and settings["vectorizer"]["analyzer"] == "word"
    assert settings["train_rows"] == len(splits["train"]) == 200 and m["baseline"]["seconds"] > 0


@pytest.mark.slow  # a real training run (debates_run)
def test_the_run_warns_with_the_gap_and_logs_both_scores(debates_run):
    run_dir, output = debates_run
    m, b = read_metrics(run_dir), read_metrics(run_dir)["baseline"]
    gap_val, gap_test = m["eval"]["f1"] - b["validation"]["f1"], m["test"]["f1"] - b["test"]["f1"]
    assert gap_val < 0 and gap_test < 0 and b["beaten"] is False
    assert b["model_minus_baseline"] == pytest.approx({"validation": gap_val, "test": gap_test})
    assert (f"does not beat the TF-IDF + linear baseline: validation F1 {m['eval']['f1']:.4f} vs baseline "
            f"{b['validation']['f1']:.4f} ({gap_val:+.4f}); test F1 {m['test']['f1']:.4f} vs baseline "
            f"{b['test']['f1']:.4f} ({gap_test:+.4f})") in output
    assert (f"validation f1 {m['eval']['f1']:.4f} (baseline {b['validation']['f1']:.4f}) accuracy "
            f"{m['eval']['accuracy']:.4f} | test f1 {m['test']['f1']:.4f} (baseline {b['test']['f1']:.4f})") in output


@pytest.mark.slow  # a real training run (debates_run)
def test_the_model_card_parses_and_carries_the_run(debates_run):
    run_dir, _ = debates_run
    m, b = read_metrics(run_dir), read_metrics(run_dir)["baseline"]
    parsed = ModelCard.load(run_dir / "model" / "README.md")
    data = parsed.data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-classification")
    assert data.metrics == ["f1", "accuracy"] and data.base_model is None  # a tiny BERT from scratch
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("validation", "f1"): round(m["eval"]["f1"], 4),
                       ("validation", "accuracy"): round(m["eval"]["accuracy"], 4),
                       ("test", "f1"): round(m["test"]["f1"], 4), ("test", "accuracy"): round(m["test"]["accuracy"], 4)}
    text = parsed.text
    for fact in ("3 labels ['Democratic', 'Moderator', 'Republican']", "single_label_classification",
                 "rows: train 200, validation 37, test 37",
                 "1 process(es) x micro-batch 32 x accumulation 1 = 32", "precision that ran: no",
                 "engine: single", "2 updates (2 optimizer steps)", "machine: ", "class weights balanced",
                 (f"| validation | {m['eval']['f1']:.4f} | {b['validation']['f1']:.4f} | "
                  f"{b['model_minus_baseline']['validation']:+.4f} |"),
                 f"| test | {m['test']['f1']:.4f} | {b['test']['f1']:.4f} |",
                 "python scripts/train.py model=tiny model.dropout=0.0", "trainer.class_weights=balanced"):
        assert fact in text, fact


def test_warns_exactly_when_the_model_does_not_beat_the_baseline():
    base = {"validation": {"f1": 0.80}, "test": {"f1": 0.70}}
    assert baseline.not_beaten({"validation": {"f1": 0.81}, "test": {"f1": 0.71}}, base) is None
    below = baseline.not_beaten({"validation": {"f1": 0.81}, "test": {"f1": 0.65}}, base)
    assert "test F1 0.6500 vs baseline 0.7000 (-0.0500)" in below and "validation" not in below
    assert "validation F1 0.8000 vs baseline 0.8000 (+0.0000)" in baseline.not_beaten(
        {"validation": {"f1": 0.80}, "test": None}, base)  # a tie does not beat it; no test split: not compared


def test_on_mse_the_model_beats_the_baseline_with_a_lower_value():
    base = {"validation": {"mse": 0.20}, "test": {"mse": 0.30}}
    assert baseline.not_beaten({"validation": {"mse": 0.10}, "test": {"mse": 0.29}}, base, "mse") is None
    assert baseline.gaps({"validation": {"mse": 0.10}, "test": None}, base, "mse") == pytest.approx({"validation": -0.1})
    lost = baseline.not_beaten({"validation": {"mse": 0.25}, "test": {"mse": 0.29}}, base, "mse")
    assert "validation mse 0.2500 vs baseline 0.2000 (+0.0500) (lower is better)" in lost and "test" not in lost
    assert baseline.beats(-0.01, "mse") and not baseline.beats(-0.01, "pearson") and not baseline.beats(0.0, "mse")


def make_presence_task(path, rows=240, seed=0):
    """Label 1 iff the one-letter word `a` occurs, 0 iff `b` does, among random two-letter noise words.
    scikit-learn's word tokenizer drops one-letter words, so the baseline sees noise alone; the tiny BERT's
    vocabulary (built from the training split) has `a` and `b`."""
    rng = random.Random(seed)
    noise = ["fo", "ba", "qu", "zi", "xe", "wu", "ko", "le"]
    lines = ["text,label"]
    for i in range(rows):
        words = rng.sample(noise, 4)
        words.insert(rng.randrange(5), "a" if i % 2 else "b")
        lines.append(f"{' '.join(words)},{i % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_no_warning_when_the_model_beats_the_baseline(tmp_path):
    data = make_presence_task(tmp_path / "presence.csv")
    proc = launch(tmp_path / "run", "model=tiny", "model.from_scratch.hidden_size=32",
                  "model.from_scratch.intermediate_size=64", "data=csv", f"data.train_file={data}",
                  "data.max_length=16", "trainer.micro_batch_size=16", "trainer.epochs=6", "optim.lr=3e-3",
                  "trainer.mixed_precision=no", "trainer.log_with=none")
    m = read_metrics(tmp_path / "run")
    assert m["eval"]["f1"] > m["baseline"]["validation"]["f1"] + 0.2 and m["baseline"]["beaten"] is True
    assert "does not beat" not in proc.stdout + proc.stderr


def test_pairs_are_joined_with_a_separator_and_say_so():
    splits = load_splits(DataConfig(name="review_pairs", max_train_samples=300, max_eval_samples=100), 42)
    fitted = baseline.fit_and_predict(splits, "single_label_classification", 2, False, 42)
    joined = [f"{a} [SEP] {b}" for a, b in zip(splits["train"]["text"], splits["train"]["text_pair"])]
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          LogisticRegression(max_iter=1000, random_state=42)).fit(joined, splits["train"]["label"])
    expected = model.predict([f"{a} [SEP] {b}" for a, b in zip(splits["test"]["text"], splits["test"]["text_pair"])])
    assert (fitted["predictions"]["test"] == expected).all()
    assert fitted["settings"]["text_pair"] == "text and text_pair joined with '[SEP]'"


def test_chinese_texts_get_character_ngrams():
    splits = load_splits(DataConfig(name="chinese_reviews", max_train_samples=300, max_eval_samples=50), 42)
    assert baseline.vectorizer_settings(baseline.texts(splits["train"]))["analyzer"] == "char"
    fitted = baseline.fit_and_predict(splits, "single_label_classification", 2, False, 42)
    assert fitted["settings"]["features"] == "TF-IDF char n-grams 1-2 (sublinear tf)"
    assert fitted["settings"]["vocabulary"] > 1000  # words would be whole clauses: far fewer, and unseen later


def test_multi_label_is_one_vs_rest_at_the_run_threshold(tmp_path):
    from datasets import Dataset, DatasetDict

    rng = random.Random(1)
    words = ["red", "green", "blue", "sky", "grass", "sea", "fire", "leaf"]

    def rows(n):
        texts = [" ".join(rng.sample(words, 3)) for _ in range(n)]
        labels = [[i for i, w in enumerate(("red", "green", "blue")) if w in t] for t in texts]
        return Dataset.from_dict({"text": texts, "label": labels})

    splits = DatasetDict(train=rows(120), validation=rows(40))
    fitted = baseline.fit_and_predict(splits, "multi_label_classification", 3, True, 42, threshold=0.3)
    y = MultiLabelBinarizer(classes=range(3)).fit_transform(splits["train"]["label"])
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          OneVsRestClassifier(LogisticRegression(max_iter=1000, class_weight="balanced",
                                                                 random_state=42))).fit(splits["train"]["text"], y)
    expected = (model.predict_proba(splits["validation"]["text"]) >= 0.3).astype(int)
    assert (fitted["predictions"]["validation"] == expected).all()
    assert fitted["references"]["validation"].shape == (40, 3)
    assert fitted["settings"]["model"].startswith("one-vs-rest LogisticRegression")


def test_auto_is_on_up_to_200k_training_rows_and_the_key_is_checked():
    assert baseline.wanted("auto", 200_000) and not baseline.wanted("auto", 200_001)
    assert baseline.wanted(True, 10**7) and not baseline.wanted(False, 10)
    with pytest.raises(ConfigError, match="trainer.baseline must be auto, true or false, got 'yes'"):
        load_config(compose_cfg("trainer.baseline=yes", "output_dir=unused"))


def test_base_model_names_the_hub_id_of_the_embedded_minilm(tmp_path):
    assert card.base_model(embedded_model("all-MiniLM-L6-v2")) == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.base_model("bert-base-uncased") == "bert-base-uncased"
    assert card.base_model(str(tmp_path)) is None and card.base_model(None) is None
    assert card.reproduce_command(["data=debates", "trainer.epochs=3"], 2, "cpu").startswith(
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2")


@pytest.mark.slow  # a real training run (debates_run)
def test_the_sweep_summary_carries_the_baseline_columns(tmp_path, debates_run):
    run_dir, _ = debates_run
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    for name in ("metrics.json", "config.yaml"):
        (job / name).write_bytes((run_dir / name).read_bytes())
    table = summarize(tmp_path / "sweep")
    b = json.loads((run_dir / "metrics.json").read_text())["baseline"]
    row = table.iloc[0]
    assert row["baseline_val_f1"] == b["validation"]["f1"] and row["baseline_test_f1"] == b["test"]["f1"]
    header = re.sub(r" +", " ", (tmp_path / "sweep" / "summary.md").read_text().splitlines()[0])
    assert "| final_val_f1 | baseline_val_f1 | test_f1 | baseline_test_f1 |" in header


# A real regression task (issue 23): two updates of a tiny BERT, best model by mse (lower is better). The baseline
# is a ridge on the same TF-IDF features, scored with the regression metric module; the gap is on mse.
PLEASANTNESS = [*(o for o in TINY if not o.startswith("data.max_")), "data=word_pleasantness",
                "data.max_train_samples=300", "data.max_eval_samples=60", "data.max_length=16",
                "trainer.max_steps=2", "trainer.metric=mse", "trainer.log_with=none"]


@pytest.fixture(scope="module")
def pleasantness_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline_regression") / "run"
    proc = launch(run_dir, *PLEASANTNESS)
    return run_dir, proc.stdout + proc.stderr


@pytest.mark.slow  # a real training run (pleasantness_run)
def test_regression_baseline_equals_scikit_learn_ridge_and_compares_on_mse(pleasantness_run):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_squared_error

    run_dir, output = pleasantness_run
    m = read_metrics(run_dir)
    b = m["baseline"]
    splits = load_splits(load_config(compose_cfg(*PLEASANTNESS, "output_dir=unused")).data, 42)
    # Single words: no spaces between words, so the baseline uses character unigrams+bigrams (word n-grams of an
    # unseen word would be an empty row and a constant prediction).
    model = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True),
                          Ridge(random_state=42))
    model.fit(list(splits["train"]["text"]), np.asarray(splits["train"]["label"]))
    for split in ("validation", "test"):
        truth, predicted = np.asarray(splits[split]["label"]), model.predict(list(splits[split]["text"]))
        assert b[split]["num_examples"] == len(truth) == m["eval" if split == "validation" else split]["num_examples"]
        assert b[split]["pearson"] == pytest.approx(pearsonr(truth, predicted)[0], abs=1e-9), split
        assert b[split]["spearman"] == pytest.approx(spearmanr(truth, predicted)[0], abs=1e-9), split
        assert b[split]["mse"] == pytest.approx(mean_squared_error(truth, predicted), abs=1e-12), split
        assert "f1" not in b[split]
    assert b["settings"]["model"].startswith("Ridge(") and b["settings"]["class_weight"] is None
    assert b["settings"]["vectorizer"]["analyzer"] == "char" and b["settings"]["train_rows"] == 300
    # The gap is on the run's metric, mse: lower is better, so the model beats the baseline when the gap is < 0.
    gaps = {s: m["eval" if s == "validation" else s]["mse"] - b[s]["mse"] for s in ("validation", "test")}
    assert b["metric"] == "mse" and b["model_minus_baseline"] == pytest.approx(gaps)
    assert b["beaten"] is all(g < 0 for g in gaps.values())
    assert (f"validation mse {m['eval']['mse']:.4f} (baseline {b['validation']['mse']:.4f}) pearson "
            f"{m['eval']['pearson']:.4f} spearman {m['eval']['spearman']:.4f} | test mse {m['test']['mse']:.4f} "
            f"(baseline {b['test']['mse']:.4f})") in output
    assert f"validation mse {b['validation']['mse']:.4f} test mse {b['test']['mse']:.4f}" in output
    lost = [s for s, g in gaps.items() if g >= 0]
    assert ("does not beat the TF-IDF + linear baseline" in output) is bool(lost)
    for s in lost:
        assert f"{s} mse {m['eval' if s == 'validation' else s]['mse']:.4f} vs baseline {b[s]['mse']:.4f}" in output


@pytest.mark.slow  # a real training run (pleasantness_run)
def test_regression_model_card_names_the_regression_metrics(pleasantness_run):
    run_dir, _ = pleasantness_run
    m = read_metrics(run_dir)
    b = m["baseline"]
    parsed = ModelCard.load(run_dir / "model" / "README.md")
    data = parsed.data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-classification")
    assert data.metrics == ["mse", "pearson", "spearman"]
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {(split, k): round(m[key][k], 4) for split, key in (("validation", "eval"), ("test", "test"))
                       for k in ("mse", "pearson", "spearman")}
    text = parsed.text
    for fact in ("task: regression, one output 'pleasantness' (squared error); validation metric mse",
                 "| split | model mse | baseline mse | model − baseline | model pearson | baseline pearson |",
                 (f"| validation | {m['eval']['mse']:.4f} | {b['validation']['mse']:.4f} | "
                  f"{b['model_minus_baseline']['validation']:+.4f} | {m['eval']['pearson']:.4f} | "
                  f"{b['validation']['pearson']:.4f} |"), "Ridge("):
        assert fact in text, fact


@pytest.mark.slow  # a real training run (pleasantness_run)
def test_a_regression_sweep_summarizes_its_metric_and_the_baseline_on_it(tmp_path, pleasantness_run):
    run_dir, _ = pleasantness_run
    m = read_metrics(run_dir)
    for i in (0, 1):
        job = tmp_path / "sweep" / str(i)
        job.mkdir(parents=True)
        for name in ("metrics.json", "config.yaml"):
            (job / name).write_bytes((run_dir / name).read_bytes())
    table = summarize(tmp_path / "sweep")
    row = table.iloc[0]
    assert row["metric"] == "mse" and row["final_val_mse"] == m["eval"]["mse"]
    assert row["best_val_mse"] == m["best"]["mse"] and row["test_mse"] == m["test"]["mse"]
    assert row["baseline_val_mse"] == m["baseline"]["validation"]["mse"]
    assert row["baseline_test_mse"] == m["baseline"]["test"]["mse"]
    header = re.sub(r" +", " ", (tmp_path / "sweep" / "summary.md").read_text().splitlines()[0])
    assert "| metric | best_val_mse | final_val_mse | baseline_val_mse | test_mse | baseline_test_mse |" in header
    assert (tmp_path / "sweep" / "val_f1.png").stat().st_size > 0


@pytest.mark.slow  # a real training run (debates_run)
def test_bench_time_to_f1_reads_the_evaluator_line_not_the_done_line_with_the_baseline(debates_run):
    """scripts/bench.py's time_to_f1 times the evaluator's `update N: ... validation f1 X accuracy Y` line; the final
    `done:` line now carries `f1 X (baseline Y) accuracy Z` and must not be what it reads."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_script", Path(__file__).parents[1] / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_dir, output = debates_run
    m = read_metrics(run_dir)
    matches = [bench.OURS_F1.search(line) for line in output.splitlines()]
    found = [x.groups() for x in matches if x]
    assert [(int(u), float(f)) for _, _, u, f in found] == [(h["update"], round(h["f1"], 4)) for h in m["history"]]
    done = [line for line in output.splitlines() if "] done: " in line]
    assert len(done) == 1 and "(baseline " in done[0] and not bench.OURS_F1.search(done[0])


@pytest.mark.slow  # a forked run, signalled
def test_sigterm_during_the_baseline_fit_skips_it_and_the_run_ends_finished_with_its_card(tmp_path):
    """After training the stop handler stays: SIGTERM while the baseline is fitted (on all 10,200 training rows
    of Rotten Tomatoes: a few seconds, so the signal lands in it) abandons the fit; metrics.json says so, the
    card is written, and the run exits 0 (it was killed: 143, no card)."""
    run_dir, log = tmp_path / "run", tmp_path / "output.log"
    overrides = [o for o in TINY if not o.startswith("data.max_train_samples")]
    cmd = [sys.executable, str(TRAIN), *overrides, "trainer.max_steps=1", "trainer.log_with=none",
           f"hydra.run.dir={run_dir}"]
    proc = start_launch(cmd, {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, TRAIN, str(log))
    deadline = time.monotonic() + 240
    while "baseline: fitting TF-IDF + a linear model on 10200 training rows" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    for rank in children(proc.pid):  # the run: the forked job's one rank
        os.kill(rank, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "SIGTERM after training: the TF-IDF baseline is skipped" in output
    skipped = ("a stop signal (SIGTERM) arrived after training; the fit was abandoned so that the run ends "
               "promptly")
    m = read_metrics(run_dir)
    assert m["baseline"] == {"skipped": skipped} and m["updates"] == 1
    assert f"Baseline: {skipped}." in (run_dir / "model" / "README.md").read_text()
    assert (run_dir / "model" / "model.safetensors").is_file()
