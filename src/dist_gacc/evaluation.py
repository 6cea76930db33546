"""Evaluation during training: when it is due, the history entry, the best model, early stopping."""

from __future__ import annotations

import time
from typing import Callable

from accelerate.logging import get_logger

log = get_logger(__name__)


class Evaluator:
    """`evaluate_fn()` returns validation metrics (collective: every rank predicts its shard and gets the
    same numbers). `on_new_best()` (collective) saves the model when a new best arrives. `task` says which
    figures an entry keeps (`task.reported`) and which one is better how (`task.metric`, `task.better`):
    F1 by default, Pearson's r for regression, trainer.metric where set."""

    def __init__(self, evaluate_fn: Callable[[], dict], every: int | None, patience: int | None,
                 on_new_best: Callable[[], None] | None, telemetry, task):
        self.evaluate_fn, self.every, self.patience = evaluate_fn, every, patience
        self.on_new_best, self.telemetry, self.task = on_new_best, telemetry, task
        self.latest: dict | None = None  # metrics of the newest evaluation, predictions included

    def due(self, state, window) -> bool:
        """Every `every` updates (null: at each epoch's end), and always after the last update."""
        if self.evaluate_fn is None:
            return False
        if state.updates >= state.total_updates:
            return True
        return state.updates % self.every == 0 if self.every else window.ends_epoch

    def run(self, state) -> dict:
        """Collective. Append the history entry, track the best value of the task's metric and patience."""
        started = time.perf_counter()
        metrics = self.evaluate_fn()
        self.latest = metrics
        previous = state.history[-1]["update"] if state.history else 0
        entry = {"update": state.updates, "optimizer_step": state.optimizer_steps, "epoch": state.epoch,
                 "train_loss": state.train_loss_since(previous), **{k: metrics[k] for k in self.task.reported}}
        state.history.append(entry)
        log.info("update %d: train loss %.4f | validation %s", entry["update"], entry["train_loss"],
                 " ".join(f"{k} {entry[k]:.4f}" for k in self.task.reported))
        key = self.task.metric
        if self.task.better(entry[key], None if state.best is None else state.best[key]):
            state.best, state.evals_since_best = entry, 0
            if self.on_new_best is not None:
                self.on_new_best()  # collective
        else:
            state.evals_since_best += 1
            if self.patience and state.evals_since_best >= self.patience:
                state.stopped_early = True
                log.info("early stopping: no validation %s gain in %d evaluations (best %.4f at update %d)", key,
                         state.evals_since_best, state.best[key], state.best["update"])
        seconds = time.perf_counter() - started
        state.eval_seconds += seconds
        self.telemetry.evaluated(entry, seconds)
        return entry
