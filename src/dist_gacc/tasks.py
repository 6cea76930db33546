"""The task's shape, chosen once at build: single-label, multi-label or regression, unweighted or class-weighted.

Everything that differs between the shapes is decided here, so the loop and the step never ask:
the objective (objectives.py), how logits become predictions, the F1 average, the validation metric that
picks the best model (trainer.metric), and the model config's `problem_type` (transformers' pipeline applies a
softmax, a per-label sigmoid or nothing from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.preprocessing import MultiLabelBinarizer
from sklearn.utils.class_weight import compute_class_weight

from .config import LOWER_IS_BETTER, REPORTED_METRICS, headline_metrics
from .errors import ConfigError, DataError
from .objectives import BinaryCrossEntropy, CrossEntropy, SquaredError


@dataclass(frozen=True)
class Task:
    label_names: list[str]
    multi_label: bool
    class_weights: list[float] | None   # single-label: per class; multi-label: per-label positive weights
    class_weights_setting: str           # none | balanced | explicit
    threshold: float                     # multi-label decision threshold on sigmoid scores
    f1_average: str                      # resolved: binary | macro | micro | weighted (regression: none)
    regression: bool = False             # one output, squared error; label_names holds the score's name
    metric: str = "f1"                   # trainer.metric resolved: the validation key that picks the best model
    tune_thresholds: bool = False        # multi_label_threshold=tune: per-label thresholds after training

    @property
    def problem_type(self) -> str:
        if self.regression:
            return "regression"
        return "multi_label_classification" if self.multi_label else "single_label_classification"

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    @property
    def reported(self) -> tuple[str, ...]:
        """The validation figures each history entry keeps (and the log line shows), the chosen metric first."""
        return headline_metrics(self.metric, self.regression)

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best` (None: nothing yet). NaN (a constant prediction's correlation) never does."""
        if best is None:
            return True
        if math.isnan(value) or math.isnan(best):
            return not math.isnan(value)
        return value > best if self.higher_is_better else value < best

    def objective(self):
        if self.regression:
            return SquaredError()
        return (BinaryCrossEntropy if self.multi_label else CrossEntropy)(self.class_weights)

    @property
    def weighted_normaliser(self) -> bool:
        """The window's normaliser is a sum of weights, not a count (class-weighted single-label)."""
        return self.class_weights is not None and not self.multi_label

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids (single-label), multi-hot int rows: sigmoid score >= threshold (multi-label), or the
        predicted values (regression)."""
        if self.multi_label:
            return (torch.sigmoid(logits.float()) >= self.threshold).long()
        return self.scores(logits)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What evaluation gathers: class ids, per-label sigmoid probabilities (multi-label: thresholded after
        gathering, by `decide`, so tuned thresholds can be applied to the same scores), or predicted values."""
        if self.regression:
            return logits.float().squeeze(-1)
        if self.multi_label:
            return torch.sigmoid(logits.float())
        return logits.argmax(dim=-1)

    def references(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.float() if self.regression else labels.long()

    def decide(self, scores: np.ndarray, thresholds=None) -> np.ndarray:
        """Gathered `scores` -> predictions; multi-label: each label's score >= its threshold (`thresholds`: one
        per label, or None: the task's one threshold)."""
        if not self.multi_label:
            return scores
        cut = self.threshold if thresholds is None else np.asarray(thresholds, dtype=scores.dtype)
        return (scores >= cut).astype(np.int64)

    def describe_weights(self) -> dict | None:
        """The weights in effect by label name (printed at start, stored in metrics.json)."""
        if self.class_weights is None:
            return None
        return {name: round(w, 6) for name, w in zip(self.label_names, self.class_weights)}


def resolve_average(setting: str, num_labels: int, multi_label: bool = False) -> str:
    """`auto`: micro-F1 for multi-label, F1 of the positive class (label id 1) for two labels, else macro."""
    if setting != "auto":
        if setting == "binary" and (multi_label or num_labels != 2):
            raise ConfigError(f"trainer.f1_average=binary needs a single-label task with 2 labels; this task "
                              f"has {num_labels} labels{' (multi-label)' if multi_label else ''}: use macro or micro")
        return setting
    if multi_label:
        return "micro"
    return "binary" if num_labels == 2 else "macro"


def class_weights(setting, label_names: list[str], train_labels, multi_label: bool) -> tuple[list[float] | None, str]:
    """trainer.class_weights resolved against the training split: (weights in label order, or None; the kind).

    balanced, single-label: n_examples / (n_classes x count_c) (scikit-learn's "balanced"); multi-label: each
    label's positive weight negatives / positives (torch's BCEWithLogitsLoss pos_weight recipe)."""
    if setting is None or setting == "none":
        return None, "none"
    k = len(label_names)
    if setting == "balanced":
        if multi_label:
            y = MultiLabelBinarizer(classes=range(k)).fit_transform(train_labels)
            positives = y.sum(axis=0)
            _require_every_label(positives, label_names)
            return [float((len(y) - p) / p) for p in positives], "balanced"
        y = np.asarray(train_labels)
        _require_every_label(np.bincount(y, minlength=k), label_names)
        weights = compute_class_weight("balanced", classes=np.arange(k), y=y)
        return [float(w) for w in weights], "balanced"
    if isinstance(setting, dict):
        unknown = sorted(set(map(str, setting)) - set(label_names))
        missing = [name for name in label_names if name not in set(map(str, setting))]
        if unknown or missing:
            raise ConfigError(f"trainer.class_weights: {'unknown label(s) ' + str(unknown) if unknown else ''}"
                              f"{'; ' if unknown and missing else ''}"
                              f"{'no weight for label(s) ' + str(missing) if missing else ''} (labels: {label_names})")
        by_name = {str(key): float(value) for key, value in setting.items()}
        return [by_name[name] for name in label_names], "explicit"
    if len(setting) != k:
        raise ConfigError(f"trainer.class_weights has {len(setting)} weight(s) but the data has {k} labels "
                          f"{label_names} (in this order); or give a mapping label -> weight")
    return [float(w) for w in setting], "explicit"


def _require_every_label(counts, label_names: list[str]) -> None:
    """Balanced weights divide by each label's count in the training split. The label names come from the
    whole training data, so the split or data.max_train_samples can leave a label with no row: its weight
    would be infinite (multi-label: every update non-finite) or scikit-learn's ValueError."""
    missing = [name for name, count in zip(label_names, counts) if count == 0]
    if missing:
        raise DataError(f"trainer.class_weights=balanced: label(s) {missing} have no row in the training split "
                        "(after the validation/test split and data.max_train_samples), so no balanced weight "
                        "exists for them. Raise data.max_train_samples, add rows of those labels, or give "
                        "explicit weights (trainer.class_weights={label: weight}).")


def resolve_metric(setting: str, regression: bool) -> str:
    """trainer.metric: auto is f1 (classification) or pearson (regression); a key the task does not report is
    refused, naming it and what is reported."""
    kind = "regression" if regression else "classification"
    reported = REPORTED_METRICS[kind]
    if setting == "auto":
        return reported[0]
    if setting not in reported:
        raise ConfigError(f"trainer.metric={setting} is not reported for {kind} "
                          f"(reported validation metrics: {', '.join(reported)})")
    return setting


def build_task(trainer, label_names: list[str], multi_label: bool, train_labels, regression: bool = False) -> Task:
    """From the trainer slice of the config and the training split's labels (regression: label_names is the
    one output's name)."""
    tune = trainer.multi_label_threshold == "tune"
    if tune and not multi_label:
        raise ConfigError("trainer.multi_label_threshold=tune applies to multi-label tasks (data.multi_label=true); "
                          f"this task is {'regression' if regression else 'single-label'}")
    threshold = 0.5 if tune else float(trainer.multi_label_threshold)
    metric = resolve_metric(trainer.metric, regression)
    if regression:
        if trainer.class_weights not in (None, "none"):
            raise ConfigError(f"trainer.class_weights={trainer.class_weights!r} with a regression task: there are "
                              "no classes to weight (set trainer.class_weights=none)")
        if trainer.f1_average != "auto":
            raise ConfigError(f"trainer.f1_average={trainer.f1_average} with a regression task: no F1 is computed "
                              "(it reports pearson, spearman and mse)")
        return Task(label_names, False, None, "none", threshold, "none", regression=True, metric=metric)
    weights, kind = class_weights(trainer.class_weights, label_names, train_labels, multi_label)
    return Task(label_names, multi_label, weights, kind, threshold,
                resolve_average(trainer.f1_average, len(label_names), multi_label), metric=metric,
                tune_thresholds=tune)


def tune_thresholds(probabilities: np.ndarray, references: np.ndarray, default: float = 0.5) -> list[float]:
    """Per label, the threshold that maximises that label's F1 on these rows (trainer.multi_label_threshold=tune).

    Candidates: the label's sorted unique probabilities; a row is predicted positive where its probability is
    >= the threshold, so each candidate predicts a different set (and a grid could only repeat one of them).
    Ties: the highest threshold (the fewest positives). A label with no positive row keeps `default` (F1 is 0
    at every threshold). F1 is 2tp / (2tp + fp + fn) from exact counts, so ties are exact: scikit-learn's
    precision_recall_curve gives precision and recall as floats, whose F1 can break a tie by rounding."""
    thresholds = []
    for scores, truth in zip(np.asarray(probabilities, dtype=np.float64).T, np.asarray(references).T):
        positives = int(truth.sum())
        if positives == 0:
            thresholds.append(float(default))
            continue
        order = np.argsort(-scores, kind="stable")
        ranked, hits = scores[order], np.cumsum(truth[order])
        last = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]  # the last row of each distinct score
        tp, predicted = hits[last], last + 1
        f1 = 2 * tp / (predicted + positives)  # 2tp / (2tp + fp + fn): fp + tp = predicted, fn + tp = positives
        best = int(np.flatnonzero(f1 == f1.max())[0])  # descending scores: the first maximum is the highest threshold
        thresholds.append(float(ranked[last[best]]))
    return thresholds
