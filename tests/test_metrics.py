"""The shipped evaluate module gives the right F1 and accuracy (worked out by hand) and loads with no network."""

import math

import pytest

from dist_gacc.metrics import load_metric
from dist_gacc.tasks import resolve_average

# Binary: 10 examples, class 1 is positive.
#   refs  1 1 1 1 0 0 0 0 0 1
#   preds 1 1 1 0 0 0 1 0 0 0
#   TP = 3 (0, 1, 2), FN = 2 (3, 9), FP = 1 (6), TN = 4 (4, 5, 7, 8)
#   F1(class 1) = 2TP / (2TP + FP + FN) = 6 / 9 = 2/3   (precision 3/4, recall 3/5)
#   (F1 of class 0 would be 2*4 / (8 + 2 + 1) = 8/11: pos_label matters)
#   accuracy = (TP + TN) / 10 = 7/10
BINARY_REFS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
BINARY_PREDS = [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]

# Three classes, 6 examples:
#   refs  0 0 0 1 1 2
#   preds 0 0 1 1 2 2
#   class 0: TP 2, FP 0, FN 1 -> F1 = 4/5      (support 3)
#   class 1: TP 1, FP 1, FN 1 -> F1 = 2/4 = 1/2 (support 2)
#   class 2: TP 1, FP 1, FN 0 -> F1 = 2/3      (support 1)
#   macro    = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 90 = 59/90
#   weighted = (3 * 4/5 + 2 * 1/2 + 1 * 2/3) / 6 = (36 + 15 + 10) / 90 = 61/90
#   micro    = 2 * 4 / (2 * 4 + 2 + 2) = 8/12 = 2/3 (all TP 4, all FP 2, all FN 2)
#   accuracy = 4/6 = 2/3
MULTI_REFS = [0, 0, 0, 1, 1, 2]
MULTI_PREDS = [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("refs, preds, average, f1, accuracy", [
    (BINARY_REFS, BINARY_PREDS, "binary", 2 / 3, 7 / 10),
    (MULTI_REFS, MULTI_PREDS, "macro", 59 / 90, 2 / 3),
    (MULTI_REFS, MULTI_PREDS, "weighted", 61 / 90, 2 / 3),
    (MULTI_REFS, MULTI_PREDS, "micro", 2 / 3, 2 / 3),
])
def test_f1_and_accuracy_by_hand(refs, preds, average, f1, accuracy):
    out = load_metric().compute(predictions=preds, references=refs, average=average, pos_label=1)
    assert out["f1"] == pytest.approx(f1, abs=1e-12)
    assert out["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert out["num_examples"] == len(refs)


def test_zero_division_gives_zero_not_nan():
    metric = load_metric()
    # No positive reference and no positive prediction: TP + FP + FN = 0, F1 = 0/0, reported as 0.
    out = metric.compute(predictions=[0, 0, 0], references=[0, 0, 0], average="binary", pos_label=1)
    assert out["f1"] == 0.0 and out["accuracy"] == 1.0
    # Class 2 is never predicted: its precision is 0/0 (taken as 0), its F1 0 / (0 + 0 + 1) = 0.
    #   class 0: F1 1; class 1: TP 1, FP 1, FN 0 -> 2/3; macro = (1 + 2/3 + 0) / 3 = 5/9
    out = metric.compute(predictions=[0, 1, 1], references=[0, 1, 2], average="macro", pos_label=1)
    assert not math.isnan(out["f1"]) and out["f1"] == pytest.approx(5 / 9, abs=1e-12)
    assert out["accuracy"] == pytest.approx(2 / 3, abs=1e-12)


def test_batches_accumulate_like_one_call():
    metric = load_metric()
    metric.add_batch(predictions=[1, 0, 1], references=[1, 1, 1])
    metric.add_batch(predictions=[0, 0], references=[0, 1])
    # refs 1 1 1 0 1, preds 1 0 1 0 0: TP 2, FN 2, FP 0 -> F1 = 4 / (4 + 0 + 2) = 2/3; accuracy 3/5
    out = metric.compute(average="binary")
    assert out["f1"] == pytest.approx(2 / 3, abs=1e-12)
    assert out["accuracy"] == pytest.approx(3 / 5, abs=1e-12) and out["num_examples"] == 5


def test_auto_average():
    assert resolve_average("auto", 2) == "binary"
    assert resolve_average("auto", 5) == "macro"
    assert resolve_average("weighted", 2) == "weighted"
