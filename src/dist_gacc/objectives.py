"""Per-example losses. An update is the mean of these over the window's real examples, so every
objective returns one loss per row; the window's normaliser is its count of real rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row, in fp32 at least whatever the autocast (fp64 stays fp64)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                           reduction="none")


def cross_entropy(model, batch: dict) -> torch.Tensor:
    """Single-label classification. The labels are not passed to the model, which would compute a
    (mean) loss of its own for nothing."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return per_example_loss(logits, batch["labels"])
