"""The training loop. It receives plain objects and numbers, never the config tree."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .accumulation import finish_window, real_examples, summed_loss

log = get_logger(__name__)


@dataclass
class LoopSettings:
    micro_batch_size: int
    grad_accum_steps: int
    total_updates: int
    max_grad_norm: float | None
    eval_every: int | None  # updates; None = at the end of each epoch
    log_every: int


@dataclass
class LoopState:
    optimizer_steps: int = 0
    epoch: int = 0
    examples_seen: int = 0       # real training examples, all processes
    eval_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss of each update's window
    lrs: list[float] = field(default_factory=list)     # LR in effect after each update
    history: list[dict] = field(default_factory=list)  # one entry per evaluation


def updates_per_epoch(batches_per_rank: int, grad_accum_steps: int) -> int:
    # The last window of an epoch may be short; it is still an update.
    return math.ceil(batches_per_rank / grad_accum_steps)


def train(*, accelerator, model, optimizer, scheduler, train_loader, train_examples: int,
          settings: LoopSettings, evaluate_fn: Callable[[], dict],
          after_backward: Callable | None = None) -> LoopState:
    """Run optimizer updates until `settings.total_updates`, evaluating on schedule.

    `evaluate_fn()` returns validation metrics (the same on every rank). `after_backward(model, sync)`
    is a hook for tests and instrumentation, called after each micro-batch's backward.
    """
    s, state = settings, LoopState()
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(total=s.total_updates, desc="updates", disable=not accelerator.is_main_process)
    model.train()
    while state.optimizer_steps < s.total_updates:
        train_loader.set_epoch(state.epoch)  # one seeded permutation per epoch, the same on all ranks
        window_loss, window_count = torch.zeros((), device=accelerator.device), 0
        for batch_index, batch in enumerate(train_loader):
            real = real_examples(train_examples, s.micro_batch_size, batch_index, world, rank)
            # accumulate() skips DDP's all-reduce except on the window's last micro-batch (or the
            # epoch's last batch, so a short final window still ends) and sets sync_gradients there.
            with accelerator.accumulate(model):
                labels = batch.pop("labels")
                loss_sum = summed_loss(model(**batch).logits, labels, real)
                accelerator.backward(loss_sum)
                window_loss += loss_sum.detach()
                window_count += real
                if after_backward is not None:
                    after_backward(model, accelerator.sync_gradients)
                if accelerator.sync_gradients:
                    totals = finish_window(accelerator, model, window_loss, window_count, s.grad_accum_steps)
                    if s.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, no LR step
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                _after_update(state, totals.tolist(), bar, scheduler, s)  # the one host read per update
                window_loss, window_count = torch.zeros((), device=accelerator.device), 0
                if s.eval_every and (state.optimizer_steps % s.eval_every == 0
                                     or state.optimizer_steps == s.total_updates):
                    _record_eval(state, evaluate_fn)
                if state.optimizer_steps >= s.total_updates:
                    break
        state.epoch += 1
        if not s.eval_every:
            _record_eval(state, evaluate_fn)
    bar.close()
    return state


def _after_update(state: LoopState, totals: list[float], bar, scheduler, s: LoopSettings) -> None:
    loss_sum, count = totals
    state.optimizer_steps += 1
    state.examples_seen += int(count)
    state.losses.append(loss_sum / count)
    state.lrs.append(scheduler.get_last_lr()[0])
    bar.update(1)
    if state.optimizer_steps % s.log_every == 0 or state.optimizer_steps == s.total_updates:
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}", lr=f"{state.lrs[-1]:.3g}")


def _record_eval(state: LoopState, evaluate_fn) -> None:
    started = time.perf_counter()
    metrics = evaluate_fn()
    state.eval_seconds += time.perf_counter() - started
    done = [h["optimizer_step"] for h in state.history]
    since = state.losses[(done[-1] if done else 0):]
    entry = {"optimizer_step": state.optimizer_steps, "epoch": state.epoch,
             "train_loss": sum(since) / max(len(since), 1), "f1": metrics["f1"],
             "accuracy": metrics["accuracy"]}
    state.history.append(entry)
    log.info("update %d: train loss %.4f | validation f1 %.4f accuracy %.4f", entry["optimizer_step"],
             entry["train_loss"], entry["f1"], entry["accuracy"])
