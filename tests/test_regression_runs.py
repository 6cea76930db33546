"""Regression and tuned multi-label thresholds end to end (real runs, real processes): verify_equivalence in
float64 on 2 ranks, 2 ranks equal one process on a ragged set with the best model picked by trainer.metric=mse,
predict.py printing the value, a bad label stopping before training; tuned thresholds equal to an independent
search over the run's validation probabilities, reported next to 0.5, and used by predict.py."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from conftest import ROOT, TINY, launch, load_params, max_abs_diff, read_metrics, run_script
from test_tasks_runs import COLORS, _filler, write_csv

pytestmark = pytest.mark.slow


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))
VERIFY = ROOT / "scripts" / "verify_equivalence.py"
PREDICT = ROOT / "scripts" / "predict.py"
# Real data (Whissell's word pleasantness ratings), 37 training rows: windows of 24 and 13 at effective batch 24.
REGRESSION = [*TINY, "data=word_pleasantness", "data.max_train_samples=37", "data.max_length=16"]


def test_verify_equivalence_regression_on_two_ranks(tmp_path):
    """Against torch's mse_loss over each whole window (float64); Accelerate's divide-by-N fails it."""
    proc = launch(tmp_path / "v", *REGRESSION, "trainer.micro_batch_size=4", "trainer.grad_accum_steps=3",
                  "verify.updates=2", processes=2, script=VERIFY)
    assert "windows of 24, 13 examples" in proc.stdout and "task regression; packed micro-batches; float64" in proc.stdout
    assert proc.stdout.strip().endswith("PASS")
    naive = launch(tmp_path / "n", *REGRESSION, "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
                   "trainer.loss_normalisation=naive", script=VERIFY, check=False)
    assert naive.returncode == 1 and naive.stdout.strip().endswith("FAIL")


@pytest.fixture(scope="module")
def regression_runs(tmp_path_factory):
    """The same job on 2 ranks (micro 4 x N 3) and on one process (micro 24 x N 1): 2 epochs, 4 updates, an
    evaluation after each; model/ keeps the lowest validation MSE (trainer.metric=mse)."""
    runs = {}
    for name, processes, micro, n in (("2x4x3", 2, 4, 3), ("1x24x1", 1, 24, 1)):
        runs[name] = tmp_path_factory.mktemp(f"regression-{name}") / "run"
        runs[name, "proc"] = launch(runs[name], *REGRESSION, f"trainer.micro_batch_size={micro}",
                                    f"trainer.grad_accum_steps={n}", "trainer.epochs=2", "trainer.eval_every=1",
                                    "trainer.save_best=true", "trainer.metric=mse", "optim.lr=3e-3",
                                    processes=processes)
    return runs


def test_regression_two_ranks_equal_one_process_and_keep_the_lowest_mse(regression_runs):
    a, b = read_metrics(regression_runs["2x4x3"]), read_metrics(regression_runs["1x24x1"])
    assert a["problem_type"] == "regression" and a["label_names"] == ["pleasantness"] and a["metric"] == "mse"
    assert a["train_window_examples"] == [24, 13, 24, 13] and a["world_size"] == 2
    assert a["train_losses"] == pytest.approx(b["train_losses"], abs=1e-5)
    assert max_abs_diff(load_params(regression_runs["2x4x3"]), load_params(regression_runs["1x24x1"])) <= 1e-5
    history = a["history"]
    assert [h["update"] for h in history] == [1, 2, 3, 4] and set(history[0]) >= {"pearson", "spearman", "mse"}
    best = min(history, key=lambda h: h["mse"])
    assert a["best"] == best and a["model"] == "best"
    assert a["eval"]["mse"] == pytest.approx(best["mse"], abs=1e-9)  # model/ is the best model, rescored
    assert set(a["eval"]) == {"pearson", "spearman", "mse", "num_examples"} and a["test"]["num_examples"] == 37
    # the validation figures recomputed from the predictions file
    rows = _rows(regression_runs["2x4x3"] / "validation_predictions.csv")
    truth, predicted = (np.array([float(r[k]) for r in rows]) for k in ("label", "prediction"))
    assert a["eval"]["mse"] == pytest.approx(float(np.mean((truth - predicted) ** 2)), rel=1e-6)
    assert a["eval"]["pearson"] == pytest.approx(float(np.corrcoef(truth, predicted)[0, 1]), abs=1e-6)
    assert "validation mse" in regression_runs["2x4x3", "proc"].stdout
    config = json.loads((regression_runs["2x4x3"] / "model" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "pleasantness"}


def test_predict_and_the_pipeline_print_the_predicted_value(regression_runs):
    run = regression_runs["1x24x1"]
    rows = _rows(run / "validation_predictions.csv")[:5]
    proc = run_script(PREDICT, f"model={run / 'model'}", *[r["text"] for r in rows])
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["pleasantness"] * 5
    assert [line[2] for line in lines] == [r["text"] for r in rows]
    # the raw output (no sigmoid: values outside (0, 1) are possible), as evaluation predicted it
    assert [float(line[1]) for line in lines] == pytest.approx([float(r["prediction"]) for r in rows], abs=1e-4)
    from transformers import pipeline

    out = pipeline("text-classification", model=str(run / "model"), function_to_apply="none")(rows[0]["text"])
    assert out[0]["score"] == pytest.approx(float(rows[0]["prediction"]), abs=1e-5)


def test_a_non_numeric_regression_label_stops_before_training(tmp_path):
    import random

    rows = [{"text": f"{_filler(random.Random(i))} {i}", "score": i / 8} for i in range(30)]
    rows[11]["score"] = "seven"
    train = write_csv(tmp_path / "train.csv", rows)
    run = tmp_path / "run"
    proc = launch(run, *TINY, "data=csv", f"data.train_file={train}", "data.label_column=score",
                  "data.problem_type=regression", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {train}: row 11: column 'score' is not a finite number: 'seven'" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.joinpath("metrics.json").exists()


# --- multi-label thresholds tuned on validation ------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """A multi-label job (each row names some of red/green/blue) trained part-way (validation F1 ~0.8 at 0.5),
    thresholds tuned."""
    import random

    rng, folder = random.Random(2), tmp_path_factory.mktemp("tuned")
    rows = []
    for _ in range(500):
        colors = [c for c in COLORS if rng.random() < 0.4]
        rows.append({"text": f"{_filler(rng, 4)} {' '.join(colors)} {_filler(rng, 3)}", "tags": "|".join(colors)})
    files = {split: write_csv(folder / f"{split}.csv", part)
             for split, part in (("train", rows[:300]), ("validation", rows[300:400]), ("test", rows[400:]))}
    run = folder / "run"
    proc = launch(run, *TINY, "data=csv", *[f"data.{split}_file={path}" for split, path in files.items()],
                  "data.label_column=tags", "data.multi_label=true", "data.label_separator='|'",
                  "data.max_train_samples=300", "data.max_eval_samples=100", "trainer.micro_batch_size=16",
                  "model.from_scratch.hidden_size=64", "model.from_scratch.intermediate_size=128", "optim.lr=3e-3",
                  "optim.warmup_ratio=0.1", "trainer.epochs=3", "trainer.multi_label_threshold=tune")
    return run, proc


def _independent_thresholds(rows, names):
    """Per label: over the sorted unique validation probabilities, the threshold with the best F1 (scikit-learn's
    f1_score of p >= t), ties to the highest; no positive: 0.5."""
    out = {}
    for name in names:
        p = np.array([float(r[f"probability_{name}"]) for r in rows])
        y = np.array([name in r["label"].split("|") for r in rows])
        out[name] = 0.5 if not y.any() else max(np.unique(p), key=lambda t: (f1_score(y, p >= t, zero_division=0), t))
    return out


def test_tuned_thresholds_equal_an_independent_search_and_are_reported_next_to_half(tuned_run):
    run, proc = tuned_run
    m = read_metrics(run)
    names = ["blue", "green", "red"]
    rows = _rows(run / "validation_predictions.csv")
    saved = json.loads((run / "model" / "thresholds.json").read_text())
    assert saved == _independent_thresholds(rows, names)  # exact: the csv holds the float32 probabilities exactly
    assert m["multi_label_threshold"] == "tune" and m["tuned_thresholds"]["thresholds"] == saved
    assert any(abs(t - 0.5) > 0.01 for t in saved.values())
    # validation micro-F1 at the tuned thresholds, by hand from the same probabilities
    y = np.array([[name in r["label"].split("|") for name in names] for r in rows])
    p = np.array([[float(r[f"probability_{name}"]) for name in names] for r in rows])
    tuned_f1 = f1_score(y, p >= np.array([saved[n] for n in names]), average="micro", zero_division=0)
    assert m["tuned_thresholds"]["validation"]["f1"] == pytest.approx(tuned_f1, abs=1e-12)
    assert m["tuned_thresholds"]["validation"]["f1"] >= m["eval"]["f1"]  # tuned on it: never worse at 0.5
    # test F1: at 0.5 (`test`) and at the tuned thresholds, both reported, and on the final line
    test_half, test_tuned = m["test"]["f1"], m["tuned_thresholds"]["test"]["f1"]
    assert m["test"]["num_examples"] == m["tuned_thresholds"]["test"]["num_examples"] == 100
    assert f"test f1 {test_half:.4f} at threshold 0.5, {test_tuned:.4f} at tuned thresholds" in proc.stdout


def test_predict_uses_the_tuned_thresholds(tuned_run):
    """A validation row whose probability lies between a label's tuned threshold and 0.5 flips: predict.py
    decides it by the tuned threshold (model/thresholds.json) unless threshold=0.5 is given."""
    run, _ = tuned_run
    saved = json.loads((run / "model" / "thresholds.json").read_text())
    rows = _rows(run / "validation_predictions.csv")
    between = [(r, name) for r in rows for name, t in saved.items()
               if min(t, 0.5) + 1e-4 < float(r[f"probability_{name}"]) < max(t, 0.5) - 1e-4]
    assert between, "no validation probability between a tuned threshold and 0.5"
    row, name = between[0]

    def chosen(*extra):
        out = run_script(PREDICT, f"model={run / 'model'}", *extra, row["text"]).stdout
        return set(filter(None, out.split("\t")[0].split(",")))

    tuned, half = chosen(), chosen("threshold=0.5")
    probability = float(row[f"probability_{name}"])
    assert (name in tuned) == (probability >= saved[name]) and (name in half) == (probability >= 0.5)
    assert (name in tuned) != (name in half)
    assert half == set(filter(None, row["prediction"].split("|")))  # validation predictions are at 0.5


def test_the_baseline_of_a_tuned_run_is_one_vs_rest_at_half_beside_the_model_at_half(tuned_run):
    """multi_label_threshold=tune: the baseline predicts at 0.5 (no thresholds are tuned for it) and is compared
    with the model's `eval`/`test`, which are at 0.5 too; the tuned figures stay reported beside them."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MultiLabelBinarizer

    run, proc = tuned_run
    m, names = read_metrics(run), ["blue", "green", "red"]
    b = m["baseline"]
    split_rows = {s: _rows(run.parent / f"{s}.csv") for s in ("train", "validation", "test")}
    encode = MultiLabelBinarizer(classes=names).fit([])

    def labels(rows):
        return encode.transform([[t for t in r["tags"].split("|") if t] for r in rows])

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          OneVsRestClassifier(LogisticRegression(max_iter=1000, random_state=42)))
    model.fit([r["text"] for r in split_rows["train"]], labels(split_rows["train"]))
    for split in ("validation", "test"):
        predicted = (model.predict_proba([r["text"] for r in split_rows[split]]) >= 0.5).astype(int)
        expected = f1_score(labels(split_rows[split]), predicted, average=m["eval"]["average"], zero_division=0)
        assert b[split]["f1"] == pytest.approx(expected, abs=1e-12), split
    assert b["settings"]["model"].startswith("one-vs-rest LogisticRegression") and b["metric"] == "f1"
    assert b["model_minus_baseline"] == pytest.approx(
        {"validation": m["eval"]["f1"] - b["validation"]["f1"], "test": m["test"]["f1"] - b["test"]["f1"]})
    assert f"validation f1 {m['eval']['f1']:.4f} (baseline {b['validation']['f1']:.4f})" in proc.stdout
