"""train_step: one window in, one update out. The only code that changes parameters.

Collectives, in order: the out-of-memory vote (once per window; per micro-batch with sync_each_batch),
DDP's gradient all-reduce inside the window's last backward (accumulate() skips it before), the
all-reduce of the window's [loss sum, weight sum, real examples, stop votes], and the clip's norm (sharded
engines). Every rank runs the same sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import TrainingError


@dataclass(frozen=True)
class StepResult:
    loss_sum: float      # (weighted) loss over the window's real examples, all processes
    weight: float        # the normaliser: the window's sum of example weights (its real examples, unweighted)
    examples: int        # real examples in the window, all processes
    grad_norm: float     # before clipping (nan where the engine reports none)
    stop_votes: int      # ranks that had received a stop signal
    stepped: bool        # the optimizer step changed the parameters (and the schedule advanced)
    skipped: bool        # non-finite loss or gradient (or DeepSpeed's fp16 overflow): nothing changed

    @property
    def loss(self) -> float:
        return self.loss_sum / self.weight


@dataclass
class StepParts:
    """What a step needs, built once (build.build): the prepared objects and the variants chosen."""
    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    objective: Callable          # (model, batch) -> per-example losses; .weights(batch, losses): None or per-row weights
    engine: object               # engines.Engine: how losses are scaled and the update applied
    guard: object                # oom.MemoryGuard
    hooks: object                # Hooks (test instrumentation)
    max_grad_norm: float | None


def train_step(parts: StepParts, window, state, stop: bool) -> StepResult:
    """Forward/backward every micro-batch of `window`, then normalise, clip and step once."""
    acc, guard = parts.accelerator, parts.guard
    loss_sum, weight, examples = None, 0.0, 0
    with guard.window():  # an agreed out-of-memory error closes DDP's iteration and propagates
        for micro in window.micro_batches():
            with acc.accumulate(parts.model):  # no_sync until the window's last micro-batch
                if acc.sync_gradients != micro.last:
                    raise TrainingError(f"window {window.index} of epoch {window.epoch}: Accelerate's end of "
                                        f"accumulation (sync_gradients={acc.sync_gradients}) and the window's "
                                        f"(last micro-batch: {micro.last}) disagree")
                losses = guard.forward(parts.objective, micro, state)  # collective where it syncs (the vote)
                real_sum = losses[:micro.real].sum()  # Accelerate's repeats masked out
                weights = parts.objective.weights(micro.batch, losses)  # None: every row weighs 1
                guard.backward(parts.engine.loss_to_backward(real_sum, losses, window), micro, state)
            loss_sum = real_sum.detach() if loss_sum is None else loss_sum + real_sum.detach()
            examples += micro.real
            weight = weight + (micro.real if weights is None else weights[:micro.real].sum())
            parts.hooks.after_backward(parts.model, acc.sync_gradients)
    weight = weight.to(loss_sum.dtype) if torch.is_tensor(weight) else loss_sum.new_tensor(weight)
    totals = torch.stack([loss_sum, weight, loss_sum.new_tensor(float(examples)), loss_sum.new_tensor(float(stop))])
    totals = acc.reduce(totals, reduction="sum")  # collective: the one extra all-reduce per update
    result = parts.engine.apply_update(parts, window, totals)
    if result.examples != window.examples:
        raise TrainingError(f"update {state.updates + 1}: {result.examples} real examples, but the window holds "
                            f"{window.examples}; the data sharding is not the one windows.real_examples models")
    if window.weight is not None and not math.isclose(result.weight, window.weight, rel_tol=1e-5):
        raise TrainingError(f"update {state.updates + 1}: the window's real examples weigh {result.weight:.6g}, but "
                            f"its losses were pre-scaled by a sum of weights of {window.weight:.6g} (from the epoch's "
                            "order, windows.TrainBatches): the order is not the one the loader drew")
    return result
