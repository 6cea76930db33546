"""Regression and tuned multi-label thresholds (fast): the metric module against scipy and a hand-computed MSE,
the squared-error window normaliser, the problem type read from the label column, bad labels named before
training, trainer.metric refused where not reported, and the threshold rule against a brute-force search."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from dist_gacc.config import DataConfig, TrainerConfig
from dist_gacc.data import is_regression, label_names, load_splits, word_pleasantness_pool
from dist_gacc.errors import ConfigError, DataError
from dist_gacc.metrics import load_metric, score
from dist_gacc.objectives import SquaredError
from dist_gacc.tasks import build_task, tune_thresholds


class _Logits:
    def __init__(self, logits):
        self.table = logits

    def __call__(self, row, labels=None):
        return type("Out", (), {"logits": self.table[row]})()


def test_regression_metrics_equal_scipy_and_a_hand_computed_mse():
    predictions = np.array([1.0, 2.5, 2.0, 4.0, 3.5])
    references = np.array([1.5, 2.0, 2.0, 5.0, 3.0])
    out = score(load_metric(regression=True), predictions, references, "none")
    # squared errors .25 .25 0 1 .25 -> 1.75 / 5
    assert out["mse"] == pytest.approx(0.35, abs=1e-15)
    assert out["pearson"] == pytest.approx(pearsonr(references, predictions)[0], abs=1e-15)
    assert out["spearman"] == pytest.approx(spearmanr(references, predictions)[0], abs=1e-15)
    assert 0.8 < out["pearson"] < 0.95 and out["num_examples"] == 5
    constant = score(load_metric(regression=True), np.full(3, 2.0), np.array([1.0, 2.0, 3.0]), "none")
    assert np.isnan(constant["pearson"]) and constant["mse"] == pytest.approx(2 / 3)


def test_squared_error_window_mean_over_a_ragged_split_is_the_batch_mse():
    """Per-row squared errors summed over any split and divided once by the window's count equal torch's
    mse_loss over the whole window (transformers' regression loss); every row weighs 1."""
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 1, dtype=torch.float64), torch.randn(7, dtype=torch.float32)
    objective, model = SquaredError(), _Logits(logits)
    parts = [[0, 1, 2], [3, 4], [5, 6]]
    loss_sum = sum(objective(model, {"row": torch.tensor(p), "labels": labels[p]}).sum() for p in parts)
    expected = F.mse_loss(logits.squeeze(-1), labels.double())
    assert (loss_sum / 7).item() == pytest.approx(expected.item(), abs=1e-14)
    assert objective.reference_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-14)
    assert objective.weights({"labels": labels}, logits) is None
    assert (loss_sum / 3).item() != pytest.approx(expected.item(), abs=1e-3)  # the micro-batch count is wrong


def _csv(path, rows, header="text,score"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def test_a_float_label_column_picks_regression_and_integers_stay_classes(tmp_path):
    rows = [f"text number {i},{i / 4}" for i in range(20)]  # 0.0, 0.25, ...: floats
    splits = load_splits(DataConfig(name="csv", train_file=_csv(tmp_path / "f.csv", rows), label_column="score",
                                    validation_fraction=0.2, test_fraction=0.0), seed=0)
    assert is_regression(splits) and label_names(splits) == []
    assert splits["train"].features["label"].dtype == "float64"
    assert sorted([*splits["train"]["label"], *splits["validation"]["label"]]) == [i / 4 for i in range(20)]
    ints = [f"text number {i},{i % 3}" for i in range(20)]
    classes = load_splits(DataConfig(name="csv", train_file=_csv(tmp_path / "i.csv", ints), label_column="score",
                                     validation_fraction=0.3, test_fraction=0.0), seed=0)
    assert not is_regression(classes) and label_names(classes) == ["0", "1", "2"]
    # ... unless asked: integer ratings as numbers
    forced = load_splits(DataConfig(name="csv", train_file=_csv(tmp_path / "i.csv", ints), label_column="score",
                                    validation_fraction=0.3, test_fraction=0.0, problem_type="regression"), seed=0)
    assert is_regression(forced) and set(forced["train"]["label"]) <= {0.0, 1.0, 2.0}


def test_a_non_numeric_regression_label_is_named_by_file_row_and_column(tmp_path):
    rows = [f"text number {i},{i / 4}" for i in range(10)]
    rows[6] = "text number 6,seven"
    path = _csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(name="csv", train_file=path, label_column="score", problem_type="regression"), seed=0)
    assert str(err.value).startswith(f"{path}: row 6: column 'score' is not a finite number: 'seven'")
    rows[6] = "text number 6,inf"
    with pytest.raises(DataError, match=r"row 6: column 'score' is not a finite number: inf"):
        load_splits(DataConfig(name="csv", train_file=_csv(tmp_path / "inf.csv", rows), label_column="score"), seed=0)
    rows[6] = "text number 6,n/a"  # pandas reads n/a, NA, an empty cell as missing
    with pytest.raises(DataError, match=r"row 6: column 'score' is empty \(or a missing-value marker"):
        load_splits(DataConfig(name="csv", train_file=_csv(tmp_path / "na.csv", rows), label_column="score"), seed=0)
    with pytest.raises(ConfigError, match="data.problem_type=regression and data.multi_label=true"):
        DataConfig(name="csv", train_file=path, problem_type="regression", multi_label=True)


def test_word_pleasantness_is_real_and_a_regression_task():
    words, ratings = word_pleasantness_pool()
    assert len(words) == 8743 and words[:3] == ["a", "abandon", "abandoned"]
    assert ratings[:3] == [2.0, 1.0, 1.1429] and min(ratings) == 0.0 and max(ratings) == 3.0
    splits = load_splits(DataConfig(name="word_pleasantness", max_length=16), seed=0)
    assert is_regression(splits) and {k: len(v) for k, v in splits.items()} == {
        "train": 6993, "validation": 875, "test": 875}  # 8,743: no word repeats
    with pytest.raises(ConfigError, match="data=word_pleasantness is a regression task"):
        load_splits(DataConfig(name="word_pleasantness", problem_type="classification"), seed=0)
    with pytest.raises(ConfigError, match="data=rotten_tomatoes is a classification task"):
        load_splits(DataConfig(name="rotten_tomatoes", problem_type="regression"), seed=0)


def test_regression_task_refuses_class_weights_and_f1_settings_and_picks_pearson():
    task = build_task(TrainerConfig(), ["score"], False, [0.5, 1.5], regression=True)
    assert (task.problem_type, task.metric, task.higher_is_better) == ("regression", "pearson", True)
    assert task.reported == ("pearson", "spearman", "mse")
    assert task.predictions(torch.tensor([[0.25], [1.5]])).tolist() == [0.25, 1.5]
    for weights in ("balanced", [1.0, 2.0]):
        with pytest.raises(ConfigError, match=r"trainer.class_weights=.* with a regression task: there are no "
                                              "classes to weight"):
            build_task(TrainerConfig(class_weights=weights), ["score"], False, [0.5], regression=True)
    with pytest.raises(ConfigError, match="trainer.f1_average=macro with a regression task"):
        build_task(TrainerConfig(f1_average="macro"), ["score"], False, [0.5], regression=True)


def test_trainer_metric_must_be_reported_for_the_problem_type():
    with pytest.raises(ConfigError, match=r"trainer.metric=mse is not reported for classification "
                                          r"\(reported validation metrics: f1, accuracy, f1_macro, f1_micro\)"):
        build_task(TrainerConfig(metric="mse"), ["a", "b"], False, [0, 1])
    with pytest.raises(ConfigError, match=r"trainer.metric=f1 is not reported for regression "
                                          r"\(reported validation metrics: pearson, spearman, mse\)"):
        build_task(TrainerConfig(metric="f1"), ["score"], False, [0.5], regression=True)
    with pytest.raises(ConfigError, match="trainer.metric must be one of auto|"):
        TrainerConfig(metric="auc")
    mse = build_task(TrainerConfig(metric="mse"), ["score"], False, [0.5], regression=True)
    assert mse.reported == ("mse", "pearson", "spearman") and not mse.higher_is_better
    assert mse.better(0.2, 0.3) and not mse.better(0.3, 0.2) and mse.better(0.3, None)
    pearson = build_task(TrainerConfig(), ["score"], False, [0.5], regression=True)
    assert pearson.better(0.3, 0.2) and pearson.better(0.1, float("nan")) and not pearson.better(float("nan"), 0.1)
    assert build_task(TrainerConfig(metric="accuracy"), ["a", "b"], False, [0, 1]).reported == ("accuracy", "f1")


def test_multi_label_threshold_accepts_a_float_or_tune_and_tune_needs_multi_label():
    assert build_task(TrainerConfig(multi_label_threshold="tune"), ["a", "b"], True, [[0], [1]]).tune_thresholds
    assert build_task(TrainerConfig(multi_label_threshold=0.3), ["a", "b"], True, [[0], [1]]).threshold == 0.3
    with pytest.raises(ConfigError, match=r"trainer.multi_label_threshold must be a number > 0.0 and <= 1.0, "
                                          r"got 'best' \(or tune\)"):
        TrainerConfig(multi_label_threshold="best")
    with pytest.raises(ConfigError, match="multi_label_threshold=tune applies to multi-label tasks"):
        build_task(TrainerConfig(multi_label_threshold="tune"), ["a", "b"], False, [0, 1])


def _brute_force(probabilities, references):
    """Every candidate threshold (the label's unique probabilities) scored with scikit-learn's f1_score;
    the best F1, ties to the highest threshold; no positive row: 0.5."""
    from sklearn.metrics import f1_score

    out = []
    for j in range(probabilities.shape[1]):
        p, y = probabilities[:, j], references[:, j]
        if y.sum() == 0:
            out.append(0.5)
            continue
        out.append(max(np.unique(p), key=lambda t: (f1_score(y, p >= t, zero_division=0), t)))
    return out


def test_tuned_thresholds_maximise_each_labels_f1_like_a_brute_force_search():
    # by hand: label 0 probabilities .9 .8 .7 .4 .2 with truth 1 0 1 1 0 -> thresholds .9: F1 2/4; .8: 2/5;
    # .7: 4/6; .4: 6/8 (best); .2: 6/9. Label 1: no positive -> 0.5.
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.4], [0.2, 0.5]])
    y = np.array([[1, 0], [0, 0], [1, 0], [1, 0], [0, 0]])
    assert tune_thresholds(p, y) == [0.4, 0.5]
    # a tie (truth 1 0 0 1: threshold .9 gives F1 2/3, .8 2/4, .7 2/5, .1 4/6 = 2/3) goes to the highest threshold
    assert tune_thresholds(np.array([[0.9], [0.8], [0.7], [0.1]]), np.array([[1], [0], [0], [1]])) == [0.9]
    rng = np.random.default_rng(0)
    for _ in range(20):
        probs = rng.random((60, 4)).astype(np.float32).round(2)  # rounded: repeated values, ties in F1
        truth = (rng.random((60, 4)) < [0.05, 0.3, 0.6, 0.0]).astype(np.int64)
        assert tune_thresholds(probs, truth) == _brute_force(probs.astype(np.float64), truth)


def test_problem_type_auto_leaves_the_resume_fingerprint_as_before():
    """Checkpoints written before data.problem_type existed have no such key: auto must not add one (a resume
    would be refused as a changed setting); an explicit choice is recorded."""
    from dist_gacc.build import data_fingerprint

    assert "problem_type" not in data_fingerprint(DataConfig())
    assert data_fingerprint(DataConfig(problem_type="regression"))["problem_type"] == "regression"
