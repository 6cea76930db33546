"""The task's shape, chosen once at build: single-label or multi-label, unweighted or class-weighted.

Everything that differs between the shapes is decided here, so the loop and the step never ask:
the objective (objectives.py), how logits become predictions, the F1 average, and the model config's
`problem_type` (transformers' pipeline applies a softmax or a per-label sigmoid from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.preprocessing import MultiLabelBinarizer
from sklearn.utils.class_weight import compute_class_weight

from .errors import ConfigError, DataError
from .objectives import BinaryCrossEntropy, CrossEntropy


@dataclass(frozen=True)
class Task:
    label_names: list[str]
    multi_label: bool
    class_weights: list[float] | None   # single-label: per class; multi-label: per-label positive weights
    class_weights_setting: str           # none | balanced | explicit
    threshold: float                     # multi-label decision threshold on sigmoid scores
    f1_average: str                      # resolved: binary | macro | micro | weighted

    @property
    def problem_type(self) -> str:
        return "multi_label_classification" if self.multi_label else "single_label_classification"

    def objective(self):
        return (BinaryCrossEntropy if self.multi_label else CrossEntropy)(self.class_weights)

    @property
    def weighted_normaliser(self) -> bool:
        """The window's normaliser is a sum of weights, not a count (class-weighted single-label)."""
        return self.class_weights is not None and not self.multi_label

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids (single-label), or multi-hot int rows: sigmoid score >= threshold (multi-label)."""
        if self.multi_label:
            return (torch.sigmoid(logits.float()) >= self.threshold).long()
        return logits.argmax(dim=-1)

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


def build_task(trainer, label_names: list[str], multi_label: bool, train_labels) -> Task:
    """From the trainer slice of the config and the training split's labels."""
    weights, kind = class_weights(trainer.class_weights, label_names, train_labels, multi_label)
    return Task(label_names, multi_label, weights, kind, trainer.multi_label_threshold,
                resolve_average(trainer.f1_average, len(label_names), multi_label))
