"""Task shapes (fast): class weights resolved from the data, the weighted window normaliser, multi-label
losses, predictions and the per-label report, each against numbers worked out by hand or by torch."""

import pytest
import torch
import torch.nn.functional as F

from dist_gacc.config import TrainerConfig
from dist_gacc.errors import ConfigError, DataError
from dist_gacc.metrics import load_metric, score
from dist_gacc.objectives import BinaryCrossEntropy, CrossEntropy
from dist_gacc.tasks import build_task, class_weights, resolve_average


class _Logits:
    """A 'model' that returns fixed logits for the rows named by batch['row'] (no parameters needed)."""

    def __init__(self, logits):
        self.table = logits

    def __call__(self, row, labels=None):
        return type("Out", (), {"logits": self.table[row]})()


def test_balanced_weights_by_hand():
    # 6 rows: class 0 x3, class 1 x2, class 2 x1 -> n / (k * count) = 6/9, 6/6, 6/3
    weights, kind = class_weights("balanced", ["a", "b", "c"], [0, 0, 0, 1, 1, 2], multi_label=False)
    assert kind == "balanced" and weights == pytest.approx([2 / 3, 1.0, 2.0], abs=1e-12)
    # multi-label: 4 rows; label 0 positive in 1 row (3 negatives -> 3), label 1 in 2 (-> 1), label 2 in 4 (-> 0)
    weights, _ = class_weights("balanced", ["x", "y", "z"], [[0, 2], [1, 2], [1, 2], [2]], multi_label=True)
    assert weights == pytest.approx([3.0, 1.0, 0.0], abs=1e-12)


def test_balanced_weights_refuse_a_label_with_no_training_row():
    """After the split or data.max_train_samples a label can be left with no training row: its balanced weight
    would be infinite (multi-label: every update skipped) or scikit-learn's ValueError (single-label)."""
    with pytest.raises(DataError) as err:
        class_weights("balanced", ["a", "b", "c"], [0, 0, 1, 0], multi_label=False)
    assert "trainer.class_weights=balanced: label(s) ['c'] have no row in the training split" in str(err.value)
    assert "data.max_train_samples" in str(err.value)
    with pytest.raises(DataError, match=r"label\(s\) \['x', 'z'\] have no row in the training split"):
        class_weights("balanced", ["x", "y", "z"], [[1], [1], []], multi_label=True)
    # explicit weights need no count: still accepted
    assert class_weights([1.0, 2.0, 3.0], ["a", "b", "c"], [0, 0, 1], False) == ([1.0, 2.0, 3.0], "explicit")


def test_explicit_weights_by_list_or_name_and_their_errors():
    assert class_weights([1, 2.5], ["neg", "pos"], [0, 1], False) == ([1.0, 2.5], "explicit")
    assert class_weights({"pos": 4, "neg": 1}, ["neg", "pos"], [0, 1], False) == ([1.0, 4.0], "explicit")
    assert class_weights("none", ["neg", "pos"], [0, 1], False) == (None, "none")
    with pytest.raises(ConfigError, match=r"has 3 weight\(s\) but the data has 2 labels \['neg', 'pos'\]"):
        class_weights([1, 2, 3], ["neg", "pos"], [0, 1], False)
    with pytest.raises(ConfigError, match=r"unknown label\(s\) \['neutral'\].*no weight for label\(s\) \['pos'\]"):
        class_weights({"neg": 1, "neutral": 2}, ["neg", "pos"], [0, 1], False)
    for bad in ([0.0, 1.0], [1.0, -2.0], "inverse", []):
        with pytest.raises(ConfigError, match="trainer.class_weights"):
            TrainerConfig(class_weights=bad)
    with pytest.raises(ConfigError, match="trainer.multi_label_threshold"):
        TrainerConfig(multi_label_threshold=1.5)


def test_auto_average_per_task_shape():
    assert resolve_average("auto", 2) == "binary" and resolve_average("auto", 5) == "macro"
    assert resolve_average("auto", 2, multi_label=True) == "micro"
    with pytest.raises(ConfigError, match="f1_average=binary needs a single-label task with 2 labels"):
        resolve_average("binary", 3)


def test_weighted_window_normaliser_is_the_sum_of_weights_for_any_split():
    """Summed (weighted) losses and weights of any split of a batch, divided once by the summed weights,
    equal torch's weighted mean over the whole batch; dividing by the count instead does not."""
    torch.manual_seed(0)
    logits = torch.randn(7, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    objective = CrossEntropy([0.5, 2.0, 3.0])
    model = _Logits(logits)
    parts = [[0, 1, 2], [3, 4], [5, 6]]  # a ragged split of the window
    loss_sum = sum(objective(model, {"row": torch.tensor(p), "labels": labels[p]}).sum() for p in parts)
    weight_sum = sum(objective.weights({"labels": labels[p]}, logits[p]).sum() for p in parts)
    expected = F.cross_entropy(logits, labels, weight=torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64))
    assert (loss_sum / weight_sum).item() == pytest.approx(expected.item(), abs=1e-14)
    assert weight_sum.item() == pytest.approx(4 * 0.5 + 2.0 + 2 * 3.0)
    assert abs((loss_sum / 7).item() - expected.item()) > 1e-3  # the count is the wrong normaliser
    assert CrossEntropy(None).weights({"labels": labels}, logits) is None


def test_multi_label_loss_is_bce_mean_over_labels_with_positive_weights():
    torch.manual_seed(1)
    logits = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    pos_weight = [3.0, 1.0, 0.5]
    per_row = BinaryCrossEntropy(pos_weight)(_Logits(logits), {"row": torch.arange(4), "labels": labels})
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float64))(
        logits, labels.double())
    assert per_row.shape == (4,) and per_row.mean().item() == pytest.approx(expected.item(), abs=1e-14)
    assert BinaryCrossEntropy(pos_weight).weights({"labels": labels}, logits) is None  # each row weighs 1


def test_multi_label_predictions_threshold_and_report_by_hand():
    task = build_task(TrainerConfig(multi_label_threshold=0.7), ["a", "b", "c"], True, [[0], [1], [2]])
    assert task.problem_type == "multi_label_classification" and task.f1_average == "micro"
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.9, 0.8, 3.0]])  # sigmoid: .88 .5 .27 / .71 .69 .95
    preds = task.predictions(logits)
    assert preds.tolist() == [[1, 0, 0], [1, 0, 1]]
    refs = torch.tensor([[1, 1, 0], [0, 0, 1]])
    # a: TP 1 FP 1 FN 0 -> P 1/2 R 1 F1 2/3; b: TP 0 FN 1 -> 0; c: TP 1 -> 1
    # micro: TP 2, FP 1, FN 1 -> 4/6; macro (2/3 + 0 + 1)/3 = 5/9; exact-set accuracy 0/2
    out = score(load_metric(multi_label=True), preds.numpy(), refs.numpy(), "micro", task.label_names)
    assert out["f1"] == pytest.approx(2 / 3) and out["f1_macro"] == pytest.approx(5 / 9)
    assert out["accuracy"] == 0.0
    assert out["per_label"]["a"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert out["per_label"]["b"]["f1"] == 0.0 and out["per_label"]["b"]["support"] == 1
    assert out["per_label"]["c"]["f1"] == 1.0


def test_single_label_report_names_every_label():
    # refs 0 0 0 1 1 2, preds 0 0 1 1 2 2 (test_metrics.py works these out): class 1 P 1/2 R 1/2
    task = build_task(TrainerConfig(), ["neg", "neu", "pos"], False, [0, 1, 2])
    out = score(load_metric(), torch.tensor([0, 0, 1, 1, 2, 2]).numpy(), torch.tensor([0, 0, 0, 1, 1, 2]).numpy(),
                task.f1_average, task.label_names)
    assert task.f1_average == "macro" and out["f1"] == pytest.approx(59 / 90)
    assert out["per_label"]["neu"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert list(out["per_label"]) == ["neg", "neu", "pos"]


def test_class_weights_overrides_compose_as_list_mapping_or_name():
    from conftest import compose_cfg
    from dist_gacc.config import load_config

    for override, expected in [("trainer.class_weights=[1.0,4.0]", [1.0, 4.0]),
                               ("trainer.class_weights={rotten: 1.0, fresh: 4.0}", {"rotten": 1.0, "fresh": 4.0}),
                               ("trainer.class_weights=balanced", "balanced")]:
        assert load_config(compose_cfg(override, "output_dir=/tmp/x")).trainer.class_weights == expected
