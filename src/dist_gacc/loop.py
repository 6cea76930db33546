"""fit(): the training loop. A fixed sequence of named calls; each component decides whether it is due.

    for each window of the epoch (lazy; windows.TrainBatches):
        train_step          forward/backward of its micro-batches, normalise, clip, step  (collectives)
        state.record        counters, position, logged loss
        telemetry.update    progress bar, trackers
        evaluator           when due: validation F1, best model, early stopping            (collective)
        stop signal         any rank's vote rode in the window's all-reduce: checkpoint, stop (collective)
        checkpointer        when due: save                                                 (collective)
    out of memory in a window: oom.fall_back halves the micro-batch, doubles N, and the window is redone

The loop receives built objects and numbers, never the config tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate.logging import get_logger

from . import oom
from .errors import TrainingError
from .evaluation import Evaluator
from .preemption import Preempted
from .state import TrainState
from .step import StepParts, train_step
from .telemetry import Telemetry
from .windows import TrainBatches

log = get_logger(__name__)


def _no_op(*args) -> None:
    return None


def _identity(losses: torch.Tensor, updates: int) -> torch.Tensor:
    return losses


@dataclass
class Hooks:
    """Instrumentation points (tests use them to inspect gradients and to inject faults)."""
    before_forward: Callable[[int, int], None] = _no_op      # (micro_batch_size, updates done)
    after_forward: Callable[[torch.Tensor, int], torch.Tensor] = _identity  # (per-example losses, updates)
    after_backward: Callable[[torch.nn.Module, bool], None] = _no_op        # (model, sync_gradients)
    before_checkpoint_rename: Callable[[str], None] | None = None           # (temporary folder)
    after_setup: Callable[[], None] = _no_op                 # built, before the first update
    before_clip: Callable[[], None] = _no_op                 # after the window's backward passes


@dataclass
class Loop:
    """Everything fit() drives, built once (run.build_loop)."""
    parts: StepParts
    batches: TrainBatches
    evaluator: Evaluator
    telemetry: Telemetry
    oom_policy: oom.Policy
    max_bad_steps: int
    checkpointer: object | None = None   # checkpoint.Checkpointer; None: no checkpoints
    stop_requested: Callable[[], bool] = field(default=lambda: False)


def fit(loop: Loop, state: TrainState) -> TrainState:
    """Train until `state.done()`. Raises Preempted (checkpoint saved) when a stop signal arrives."""
    loop.parts.model.train()
    while not state.done():
        try:
            for window in loop.batches.windows(state):
                result = train_step(loop.parts, window, state, stop=loop.stop_requested())  # collectives
                state.record(result, window, loop.parts.scheduler.get_last_lr()[0])
                check_divergence(state, loop.max_bad_steps)
                loop.telemetry.update(state, result)
                if loop.evaluator.due(state, window):
                    loop.evaluator.run(state)                                # collective
                if result.stop_votes and not state.done():  # some rank got a stop signal
                    raise Preempted(save(loop, state, "stop signal"))        # collective
                if loop.checkpointer is not None and loop.checkpointer.due(state, window):
                    save(loop, state, "epoch end" if window.ends_epoch else "checkpoint_every")  # collective
                if state.done():
                    break
        except oom.WindowOutOfMemory:  # every rank: redo the window with half the micro-batch
            oom.fall_back(loop.oom_policy, loop.parts.accelerator, loop.parts.model, state)
    if loop.evaluator.evaluate_fn is not None and (not state.history or state.history[-1]["update"] != state.updates):
        loop.evaluator.run(state)  # collective; only when resumed at the very end
    return state


def save(loop: Loop, state: TrainState, reason: str) -> str | None:
    return loop.checkpointer.save(state, reason) if loop.checkpointer is not None else None


def check_divergence(state: TrainState, max_bad_steps: int) -> None:
    if state.bad_in_row:
        log.warning("update %d skipped on every rank: non-finite loss or gradient (%d in a row)", state.updates,
                    state.bad_in_row)
    if state.bad_in_row >= max_bad_steps:
        raise TrainingError(f"{state.bad_in_row} updates in a row had a non-finite loss or gradient "
                            f"(trainer.max_bad_steps={max_bad_steps}); last good parameters are in the "
                            "newest checkpoint. Lower optim.lr or check the data.")


def standalone(accelerator, model, optimizer, scheduler, make_loader: Callable[[int], object], dataset_len: int,
               micro_batch_size: int, grad_accum_steps: int, total_updates: int, *, max_grad_norm: float | None,
               engine=None, telemetry=None, hooks: Hooks | None = None, objective=None,
               order_weights=None) -> tuple[Loop, TrainState]:
    """A loop over prepared objects with no evaluation, checkpoints or trackers, and its fresh state
    (scripts/verify_equivalence.py, the benchmark, tests). `engine`: engines.Engine, exact by default;
    `order_weights`: as windows.TrainBatches (build.Job.order_weights)."""
    from . import engines, objectives

    hooks = hooks or Hooks()
    engine = engine or engines.build_engine("single", "exact", fp16=False)
    sync_each_batch = accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
    policy = oom.policy(engines.engine_name(accelerator), "auto", sync_each_batch and accelerator.num_processes > 1,
                        False)
    telemetry = telemetry or Telemetry(accelerator, total_updates, 0, log_every=10**9, trackers=False)
    accelerator.gradient_accumulation_steps = grad_accum_steps
    parts = StepParts(accelerator, model, optimizer, scheduler, objective or objectives.CrossEntropy(None), engine,
                      oom.MemoryGuard(accelerator, model, policy, hooks), hooks, max_grad_norm)
    evaluator = Evaluator(None, None, None, None, telemetry, None)  # never due: no evaluation
    loop = Loop(parts, TrainBatches(accelerator, make_loader, dataset_len, order_weights), evaluator, telemetry,
                policy, max_bad_steps=10**9)
    return loop, TrainState(micro_batch_size, grad_accum_steps, total_updates=total_updates)
