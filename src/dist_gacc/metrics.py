"""Evaluation: gather predictions from every rank, score F1, accuracy and the per-label report (regression:
Pearson, Spearman, MSE) through `evaluate`, and draw the report (confusion matrix, per-label F1 or a scatter)."""

from __future__ import annotations

from pathlib import Path

import evaluate
import numpy as np
import torch

# Our own evaluate module: `evaluate.load("f1")` downloads its script from the Hub and fails offline.
METRIC_DIR = Path(__file__).parent / "metric" / "f1_accuracy"
REGRESSION_METRIC_DIR = Path(__file__).parent / "metric" / "regression"


def load_metric(multi_label: bool = False, regression: bool = False) -> evaluate.EvaluationModule:
    # keep_in_memory: no cache files, so ranks that each compute the metric never share a lock file.
    if regression:
        return evaluate.load(str(REGRESSION_METRIC_DIR), keep_in_memory=True)
    return evaluate.load(str(METRIC_DIR), "multilabel" if multi_label else None, keep_in_memory=True)


@torch.no_grad()
def predict(model, loader, accelerator, task, forward=None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of the whole split, in dataset order, on every rank: class ids, per-label sigmoid
    probabilities for a multi-label task (`task.decide` thresholds them), or predicted values (`task.scores`).
    `forward(model, batch)` gives the logits (oom.EvalForward:
    sliced on out of memory); None: one forward pass per batch.

    `gather_for_metrics` drops the samples Accelerate repeats to give every rank equal batches, so an
    odd-sized split yields exactly its own number of predictions.
    """
    was_training = model.training
    model.eval()
    predictions, references = [], []
    for batch in loader:
        labels = batch.pop("labels")
        logits = forward(model, batch) if forward is not None else model(**batch).logits
        preds, labels = accelerator.gather_for_metrics((task.scores(logits), task.references(labels)))
        predictions.append(preds.cpu())
        references.append(labels.cpu())
    model.train(was_training)
    return torch.cat(predictions).numpy(), torch.cat(references).numpy()


def score(metric, predictions: np.ndarray, references: np.ndarray, average: str,
          label_names: list[str] | None = None) -> dict:
    """F1 by `average`, macro and micro F1, accuracy, and `per_label` keyed by label name; regression
    (`average` none): pearson, spearman, mse."""
    if average == "none":
        return metric.compute(predictions=predictions.tolist(), references=references.tolist())
    labels = list(range(len(label_names))) if label_names else None
    out = metric.compute(predictions=predictions.tolist(), references=references.tolist(), average=average,
                         pos_label=1, labels=labels)
    if label_names:
        out["per_label"] = {label_names[i]: report for i, report in out["per_label"].items()}
    return out


def plot_report(path: str, task, predictions: np.ndarray, references: np.ndarray, per_label: dict,
                title: str) -> None:
    """confusion_matrix.png (single-label: rows true, columns predicted, counts), per_label_f1.png
    (multi-label: each label's F1 with its support) or predictions.png (regression: predicted vs true)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    names = task.label_names
    if task.regression:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(references, predictions, s=6, alpha=0.5)
        low, high = float(min(references.min(), predictions.min())), float(max(references.max(), predictions.max()))
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8)  # perfect predictions
        ax.set_xlabel(f"true {names[0]}")
        ax.set_ylabel(f"predicted {names[0]}")
    elif task.multi_label:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.5))
        f1s = [per_label[n]["f1"] for n in names]
        bars = ax.bar(range(len(names)), f1s, color="tab:blue")
        for bar, name in zip(bars, names):
            ax.annotate(f"n={per_label[name]['support']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("F1")
    else:
        fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(names) + 2),) * 2)
        ConfusionMatrixDisplay.from_predictions(references, predictions, labels=list(range(len(names))),
                                                display_labels=names, cmap="Blues", colorbar=False, ax=ax,
                                                xticks_rotation=30)
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
