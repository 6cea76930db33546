"""Per-example losses and weights. An update is the weighted mean of these over the window's real examples:
each objective returns one (weighted) loss per row, and `weights(batch, losses)` the weight each row adds to
the window's normaliser, in the losses' dtype (None: every row weighs 1, and the normaliser is the window's
count of real rows).

Chosen once at build (tasks.Task.objective):
- `CrossEntropy`: single-label; with class weights w, row i's loss is w[y_i] * CE_i and its weight w[y_i], so
  the window's update is sum(w[y_i] CE_i) / sum(w[y_i]) over its real rows: what torch's weighted
  `cross_entropy(reduction="mean")` computes per batch, here over the whole window, whatever its split.
- `BinaryCrossEntropy`: multi-label; per row the mean over labels of the binary cross-entropy with logits
  (per-label positive weights optional). Positive weights scale terms, not the normaliser (as in torch's
  BCEWithLogitsLoss), so every row weighs 1.
- `SquaredError`: regression (one output); per row (prediction - label)^2, every row weighs 1, so the window's
  update is the mean squared error over its real rows: torch's `mse_loss(reduction="mean")` over the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _float_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 at least, whatever the autocast (fp64 stays fp64: verify_equivalence runs in float64)."""
    return torch.promote_types(logits.dtype, torch.float32)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unweighted cross-entropy of each row."""
    return F.cross_entropy(logits.to(_float_dtype(logits)), labels, reduction="none")


def logits_of(model, batch: dict) -> torch.Tensor:
    """The labels are not passed to the model, which would compute a (mean) loss of its own for nothing."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


class _Weighted:
    """Holds a per-label weight vector (None: unweighted), moved once per device and dtype."""

    def __init__(self, label_weights: list[float] | None):
        self.label_weights = label_weights
        self._cache: dict = {}

    def _weights_like(self, like: torch.Tensor) -> torch.Tensor | None:
        """The weights on `like`'s device, in its dtype."""
        if self.label_weights is None:
            return None
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.label_weights, dtype=key[1], device=key[0])
        return self._cache[key]


class CrossEntropy(_Weighted):
    """Single-label classification, optionally class-weighted."""

    def __call__(self, model, batch: dict) -> torch.Tensor:
        logits = logits_of(model, batch)
        logits = logits.to(_float_dtype(logits))
        return F.cross_entropy(logits, batch["labels"], weight=self._weights_like(logits), reduction="none")

    def weights(self, batch: dict, losses: torch.Tensor) -> torch.Tensor | None:
        """Each row's class weight, its share of the window's normaliser, in the losses' dtype and device (the
        weight tensor the loss itself used). Not float64: Apple's MPS has none."""
        weights = self._weights_like(losses)
        return None if weights is None else weights[batch["labels"]]

    def reference_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """torch's own weighted mean of one batch (verify_equivalence's definition of an update)."""
        logits = logits.to(_float_dtype(logits))
        return F.cross_entropy(logits, labels, weight=self._weights_like(logits))


class BinaryCrossEntropy(_Weighted):
    """Multi-label classification: labels are multi-hot float rows; optional per-label positive weights."""

    def __call__(self, model, batch: dict) -> torch.Tensor:
        logits = logits_of(model, batch)
        logits = logits.to(_float_dtype(logits))
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype),
                                                  pos_weight=self._weights_like(logits), reduction="none").mean(dim=1)

    def weights(self, batch: dict, losses: torch.Tensor) -> None:
        return None

    def reference_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.to(_float_dtype(logits))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                  pos_weight=self._weights_like(logits))


class SquaredError:
    """Regression: the model's one output against a float label; no weights (class weights are refused)."""

    def __call__(self, model, batch: dict) -> torch.Tensor:
        logits = logits_of(model, batch)
        return self.reference_loss(logits, batch["labels"], reduction="none")

    def weights(self, batch: dict, losses: torch.Tensor) -> None:
        return None

    def reference_loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """transformers' regression loss (MSELoss on the squeezed output), per row or as one batch's mean."""
        predictions = logits.to(_float_dtype(logits)).squeeze(-1)
        return F.mse_loss(predictions, labels.to(predictions.dtype), reduction=reduction)


def cross_entropy(model, batch: dict) -> torch.Tensor:
    """Unweighted single-label loss as a plain function (tests and the bench's hand-written loop)."""
    return per_example_loss(logits_of(model, batch), batch["labels"])
