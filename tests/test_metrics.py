"""The shipped evaluate module agrees with scikit-learn and loads with no network."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from dist_gacc.metrics import load_metric, resolve_average


@pytest.mark.parametrize("num_labels, average", [(2, "binary"), (3, "macro"), (3, "micro"), (4, "weighted")])
def test_f1_equals_sklearn(num_labels, average):
    rng = np.random.default_rng(num_labels)
    refs = rng.integers(0, num_labels, size=301)
    preds = np.where(rng.random(301) < 0.7, refs, rng.integers(0, num_labels, size=301))
    out = load_metric().compute(predictions=preds, references=refs, average=average, pos_label=1)
    assert out["f1"] == pytest.approx(f1_score(refs, preds, average=average, pos_label=1), abs=1e-12)
    assert out["accuracy"] == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
    assert out["num_examples"] == 301


def test_batches_accumulate_like_one_call():
    metric = load_metric()
    metric.add_batch(predictions=[1, 0, 1], references=[1, 1, 1])
    metric.add_batch(predictions=[0, 0], references=[0, 1])
    assert metric.compute(average="binary")["f1"] == pytest.approx(f1_score([1, 1, 1, 0, 1], [1, 0, 1, 0, 0]))


def test_auto_average():
    assert resolve_average("auto", 2) == "binary"
    assert resolve_average("auto", 5) == "macro"
    assert resolve_average("weighted", 2) == "weighted"
