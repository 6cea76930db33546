"""Evaluation: gather predictions from every rank, score F1 and accuracy through `evaluate`."""

from __future__ import annotations

from pathlib import Path

import evaluate
import numpy as np
import torch

# Our own evaluate module: `evaluate.load("f1")` downloads its script from the Hub and fails offline.
METRIC_DIR = Path(__file__).parent / "metric" / "f1_accuracy"


def load_metric() -> evaluate.EvaluationModule:
    # keep_in_memory: no cache files, so ranks that each compute the metric never share a lock file.
    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def resolve_average(setting: str, num_labels: int) -> str:
    """`auto`: F1 of the positive class (label id 1) for two labels, macro F1 otherwise."""
    if setting == "auto":
        return "binary" if num_labels == 2 else "macro"
    return setting


@torch.no_grad()
def predict(model, loader, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels of the whole split, in dataset order, on every rank.

    `gather_for_metrics` drops the samples Accelerate repeats to give every rank equal batches, so an
    odd-sized split yields exactly its own number of predictions.
    """
    was_training = model.training
    model.eval()
    predictions, references = [], []
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**batch).logits
        preds, labels = accelerator.gather_for_metrics((logits.argmax(dim=-1), labels))
        predictions.append(preds.cpu())
        references.append(labels.cpu())
    model.train(was_training)
    return torch.cat(predictions).numpy(), torch.cat(references).numpy()


def score(metric, predictions: np.ndarray, references: np.ndarray, average: str) -> dict:
    return metric.compute(predictions=predictions, references=references, average=average, pos_label=1)
