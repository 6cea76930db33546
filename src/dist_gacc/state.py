"""What a run counts. Saved in every checkpoint (as a dict), so a resumed run continues it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TrainState:
    micro_batch_size: int        # the split in effect (written only by oom.resplit)
    grad_accum_steps: int
    total_updates: int = 0       # the run's length in updates (the schedule's length)
    updates: int = 0             # windows done, including skipped ones: the loop's clock
    optimizer_steps: int = 0     # updates that changed the parameters
    skipped_updates: int = 0     # non-finite loss or gradient
    bad_in_row: int = 0
    epoch: int = 0               # position: the next window to train is `window` of `epoch`
    window: int = 0
    examples_seen: int = 0       # real training examples, all processes
    eval_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)      # mean loss of each update's window
    window_sizes: list[int] = field(default_factory=list)  # real examples of each update's window
    lrs: list[float] = field(default_factory=list)         # LR in effect after each update
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    history: list[dict] = field(default_factory=list)      # one entry per evaluation
    batch_size_changes: list[dict] = field(default_factory=list)  # out-of-memory fallbacks, resumes
    best: dict | None = None     # the evaluation with the highest validation F1 so far
    evals_since_best: int = 0
    stopped_early: bool = False

    def done(self) -> bool:
        return self.updates >= self.total_updates or self.stopped_early

    def position(self, reason: str) -> dict:
        return {"epoch": self.epoch, "window": self.window, "reason": reason}

    def record(self, result, window, lr: float) -> None:
        """Count one finished window (`step.StepResult`) and move the position past it."""
        self.updates += 1
        self.examples_seen += result.examples
        self.losses.append(result.loss)
        self.window_sizes.append(result.examples)
        self.grad_norms.append(result.grad_norm)
        self.lrs.append(lr)
        if result.stepped:
            self.optimizer_steps += 1
        if result.skipped:
            self.skipped_updates += 1
            self.bad_in_row += 1
        else:
            self.bad_in_row = 0
        self.epoch, self.window = (window.epoch + 1, 0) if window.ends_epoch else (window.epoch, window.index + 1)

    def train_loss_since(self, update: int) -> float:
        """Example-weighted mean loss of the finite windows after update `update` (not a mean of means:
        a window of 1 example weighs 1/12 of a window of 12)."""
        pairs = [(loss, n) for loss, n in zip(self.losses[update:], self.window_sizes[update:]) if math.isfinite(loss)]
        examples = sum(n for _, n in pairs)
        return sum(loss * n for loss, n in pairs) / examples if examples else math.nan
