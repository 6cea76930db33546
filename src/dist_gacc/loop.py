"""The training loop. It receives plain objects and numbers, never the config tree."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate.logging import get_logger
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from tqdm.auto import tqdm

from .accumulation import finish_window, per_example_loss, real_examples, window_examples
from .errors import TrainingError, UserError

log = get_logger(__name__)


@dataclass
class LoopSettings:
    micro_batch_size: int
    grad_accum_steps: int
    total_updates: int
    max_grad_norm: float | None
    eval_every: int | None  # updates; None = at the end of each epoch
    log_every: int
    exact: bool = True      # False: Accelerate's plain loss/N, kept only to show what it gets wrong
    evaluate: bool = True   # False: no evaluation at all (scripts/verify_equivalence.py)
    max_bad_steps: int = 5  # consecutive non-finite updates before giving up
    fp16: bool = False      # the GradScaler handles inf gradients itself
    patience: int | None = None  # early stopping: evaluations without a validation-F1 gain
    # exact, with the window's count known in advance: scale each micro-batch's loss sum by N*W/count
    # before backward instead of rescaling the gradients after it (the same update; DeepSpeed needs it)
    prescale: bool = False
    deepspeed: bool = False  # DeepSpeed clips and steps inside the window's last backward


@dataclass
class LoopHooks:
    """Instrumentation points (tests use them to inspect gradients and to inject faults)."""
    before_forward: Callable[[int, int], None] | None = None  # (micro_batch_size, updates done)
    after_forward: Callable[[torch.Tensor, int], torch.Tensor] | None = None  # (per-example losses, updates)
    after_backward: Callable[[torch.nn.Module, bool], None] | None = None  # (model, sync_gradients)
    before_checkpoint_rename: Callable[[str], None] | None = None  # (temporary folder)


@dataclass
class LoopState:
    """Everything the loop counts; saved in every checkpoint, so a resumed run continues it."""
    micro_batch_size: int
    grad_accum_steps: int
    updates: int = 0             # windows done, including skipped ones: the loop's clock
    optimizer_steps: int = 0     # updates that changed the parameters
    skipped_updates: int = 0     # non-finite loss or gradient
    bad_in_row: int = 0
    epoch: int = 0
    examples_seen: int = 0       # real training examples, all processes
    eval_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)      # mean loss of each update's window
    lrs: list[float] = field(default_factory=list)         # LR in effect after each update
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    history: list[dict] = field(default_factory=list)      # one entry per evaluation
    batch_size_changes: list[dict] = field(default_factory=list)  # out-of-memory fallbacks
    best: dict | None = None     # the evaluation with the highest validation F1 so far
    evals_since_best: int = 0
    stopped_early: bool = False


class WindowOutOfMemory(Exception):
    """Some rank ran out of memory in window `window` of the current epoch; all ranks know it."""

    def __init__(self, window: int):
        super().__init__(f"out of memory in window {window}")
        self.window = window


class Preempted(Exception):
    """A stop signal arrived; the checkpoint at `path` holds the last finished update."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def smaller_micro_batch(micro_batch_size: int) -> int:
    """The largest divisor of the micro-batch that is at most half of it (keeps micro x N fixed)."""
    return max(d for d in range(1, micro_batch_size // 2 + 1) if micro_batch_size % d == 0)


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or should_reduce_batch_size(err)


def train(**kwargs) -> LoopState:
    """Run updates until `settings.total_updates`; see `Loop` for the arguments."""
    return Loop(**kwargs).run()


@dataclass
class Loop:
    """`make_loader(micro_batch_size)` returns a prepared training DataLoader (called again with a
    smaller size after an out-of-memory error); `evaluate_fn()` returns validation metrics, the
    same on every rank. `state` and `position` ({"epoch", "window"}) continue a resumed run;
    `checkpointer` saves at window boundaries; `stop_requested()` is true once a stop signal came."""
    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    make_loader: Callable[[int], object]
    train_examples: int
    settings: LoopSettings
    evaluate_fn: Callable[[], dict] | None
    hooks: LoopHooks | None = None
    state: LoopState | None = None
    position: dict | None = None
    checkpointer: object | None = None
    stop_requested: Callable[[], bool] = lambda: False
    on_new_best: Callable[[], None] | None = None       # collective: e.g. save the model
    log_fn: Callable[[dict, int], None] | None = None   # trackers: (values, update)

    def __post_init__(self):
        self.hooks = self.hooks or LoopHooks()
        s = self.settings
        self.state = self.state or LoopState(s.micro_batch_size, s.grad_accum_steps)
        self.accelerator.gradient_accumulation_steps = self.state.grad_accum_steps
        self.last_update_time = time.perf_counter()

    def done(self) -> bool:
        return self.state.updates >= self.settings.total_updates or self.state.stopped_early

    def run(self) -> LoopState:
        s, state = self.settings, self.state
        self.bar = tqdm(total=s.total_updates, initial=state.updates, desc="updates",
                        disable=not self.accelerator.is_main_process)
        loader = self.make_loader(state.micro_batch_size)
        start_window = (self.position or {}).get("window", 0)
        self.model.train()
        while not self.done():
            try:
                self.epoch(loader, start_window)
            except WindowOutOfMemory as oom:
                loader, start_window = self.fall_back(loader), oom.window  # redo that window, smaller
                continue
            if self.done() and self.window_in_epoch < self.windows_per_epoch:
                break  # stopped mid-epoch (last update, or early stopping)
            state.epoch, start_window = state.epoch + 1, 0
            if s.evaluate and not s.eval_every:
                self.record_eval()
            self.save_checkpoint(window=0, reason="epoch end")
        if s.evaluate and not s.eval_every and (not state.history or state.history[-1]["update"] != state.updates):
            self.record_eval()
        self.bar.close()
        return state

    def epoch(self, loader, start_window: int) -> None:
        """Train epoch `state.epoch` from window `start_window` to its end or to the last update."""
        acc, state = self.accelerator, self.state
        n, batches_per_rank = state.grad_accum_steps, len(loader)
        self.windows_per_epoch = math.ceil(batches_per_rank / n)
        self.window_in_epoch = start_window
        loader.set_epoch(state.epoch)  # one seeded permutation per epoch, the same on all ranks
        if start_window:  # resume, or redo after out-of-memory: skip the windows already done
            loader = acc.skip_first_batches(loader, start_window * n)
            loader.set_epoch(state.epoch)
        self.window_loss, self.window_count = 0, 0  # the loss sum becomes a tensor at the first add
        for batch_index, batch in enumerate(loader, start=start_window * n):
            if self.settings.prescale and batch_index % n == 0:  # a window starts: its count, up front
                self.expected_count = window_examples(self.train_examples, state.micro_batch_size,
                                                      batch_index // n, n, batches_per_rank, acc.num_processes)
            real = real_examples(self.train_examples, state.micro_batch_size, batch_index,
                                 acc.num_processes, acc.process_index)
            last_of_window = batch_index % n == n - 1 or batch_index == batches_per_rank - 1
            try:
                # accumulate() skips DDP's all-reduce except on the window's last micro-batch (or the
                # epoch's last, so a short final window still ends) and sets sync_gradients there.
                with acc.accumulate(self.model):
                    self.micro_step(batch, real, last_of_window)
                    if acc.sync_gradients:
                        numbers = self.update()
            except WindowOutOfMemory:
                if not self.settings.deepspeed:  # fall_back refuses; no extra backward into DeepSpeed
                    self.finish_ddp_iteration(batch)
                loader.end()  # abandoning this pass over the data
                raise WindowOutOfMemory(batch_index // n) from None
            if acc.sync_gradients:
                self.window_in_epoch = batch_index // n + 1
                self.after_update(numbers)
                if self.done():
                    loader.end()
                    return

    def micro_step(self, batch, real: int, last_of_window: bool) -> None:
        acc, hooks = self.accelerator, self.hooks
        labels = batch.pop("labels")
        oom, self.armed = False, None
        try:
            if hooks.before_forward is not None:
                hooks.before_forward(self.state.micro_batch_size, self.state.updates)
            losses = per_example_loss(self.model(**batch).logits, labels)
            if hooks.after_forward is not None:
                losses = hooks.after_forward(losses, self.state.updates)
            if last_of_window:
                self.armed = losses  # a synchronising forward: DDP now expects this backward
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            oom = True
        self.agree_on_memory(oom, last_of_window)
        real_sum = losses[:real].sum()
        try:
            acc.backward(self.loss_to_backpropagate(real_sum, losses))
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            if acc.num_processes > 1 and last_of_window:
                raise UserError(
                    f"out of memory in the synchronising backward pass on rank {acc.process_index} at "
                    f"micro-batch {self.state.micro_batch_size}: the other ranks are already exchanging "
                    "gradients, so the window cannot be redone. Restart with trainer.micro_batch_size="
                    f"{smaller_micro_batch(self.state.micro_batch_size)} (same effective batch)."
                ) from err
            self.agree_on_memory(True, last_of_window)
        self.armed = None
        self.window_loss = self.window_loss + real_sum.detach()
        self.window_count += real
        if hooks.after_backward is not None:
            hooks.after_backward(self.model, acc.sync_gradients)

    def loss_to_backpropagate(self, real_sum: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """exact: the sum of real per-example losses, normalised once per window in update(), or, with
        prescale, already here by N*W/count (Accelerate or DeepSpeed then divide by N, the all-reduce by W);
        naive: the micro-batch mean (repeats included), which Accelerate then divides by N."""
        s = self.settings
        if not s.exact:
            return losses.mean()
        if s.prescale:
            return real_sum * (self.state.grad_accum_steps * self.accelerator.num_processes / self.expected_count)
        return real_sum

    def agree_on_memory(self, oom: bool, last_of_window: bool) -> None:
        """All ranks learn whether any ran out of memory in this window, before gradients are exchanged.

        A rank that runs out of memory comes here at once; the others come after the forward pass
        of the window's last micro-batch, before its backward (forward passes hold no collective:
        broadcast_buffers=False). So every rank joins exactly one such all-reduce per window.
        """
        if self.accelerator.num_processes > 1 and (oom or last_of_window):
            flag = torch.tensor(float(oom), device=self.accelerator.device)
            oom = self.accelerator.reduce(flag, reduction="sum").item() > 0
        if oom:
            raise WindowOutOfMemory(-1)

    def finish_ddp_iteration(self, batch) -> None:
        """Close DDP's iteration on every rank before the window is redone.

        A rank whose last forward pass synchronised has DDP waiting for its backward (the next
        forward would fail); the ranks that ran out of memory have none. Each rank runs one backward
        of a zero loss (the pending graph, or a one-row forward), so all join the same gradient
        all-reduce; the gradients are discarded afterwards.
        """
        if self.accelerator.num_processes == 1:
            return
        if self.armed is not None:
            zero = self.armed.sum() * 0
        else:
            clear_device_cache(garbage_collection=True)
            zero = self.model(**{k: v[:1] for k, v in batch.items()}).logits.float().sum() * 0
        zero.backward()
        self.armed = None

    def update(self) -> list[float]:
        """Normalise, check, clip and step. Returns [loss sum, examples, stop votes, grad norm]."""
        acc, s, state = self.accelerator, self.settings, self.state
        if s.deepspeed:
            return self.update_deepspeed()
        totals = finish_window(acc, self.model, self.window_loss, self.window_count, state.grad_accum_steps,
                               rescale=s.exact and not s.prescale, stop=self.stop_requested())
        # The norm of the all-reduced gradients: every rank sees the same number.
        norm = acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm or math.inf)
        numbers = torch.cat([totals.float(), norm.reshape(1).float().to(totals.device)]).tolist()  # the one host read
        loss_ok, grad_ok = math.isfinite(numbers[0]), math.isfinite(numbers[3])
        if loss_ok and (grad_ok or s.fp16):  # fp16: the GradScaler skips inf gradients itself
            self.optimizer.step()
            if not acc.optimizer_step_was_skipped:  # a skipped fp16 step does not advance the schedule
                self.scheduler.step()
                state.optimizer_steps += 1
            state.bad_in_row = 0
        else:
            state.skipped_updates += 1
            state.bad_in_row += 1
            log.warning("update %d skipped on every rank: non-finite %s (%d in a row)", state.updates + 1,
                        "loss" if not loss_ok else "gradient", state.bad_in_row)
        # Not optimizer.zero_grad(): Accelerate makes that a no-op off a sync step (see fall_back).
        self.model.zero_grad(set_to_none=True)
        self.window_loss, self.window_count = 0, 0
        return numbers

    def update_deepspeed(self) -> list[float]:
        """DeepSpeed has already clipped (its gradient_clipping), stepped and zeroed the gradients inside
        the window's last backward; count the update, step our schedule, read its gradient norm."""
        acc, state = self.accelerator, self.state
        totals = finish_window(acc, self.model, self.window_loss, self.window_count, state.grad_accum_steps,
                               rescale=False, stop=self.stop_requested())
        norm = acc.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)  # DeepSpeed's norm
        numbers = [*totals.float().tolist(), math.nan if norm is None else float(norm)]
        if acc.optimizer_step_was_skipped:  # fp16 overflow: DeepSpeed skipped the step itself
            state.skipped_updates += 1
            state.bad_in_row += 1
            log.warning("update %d skipped by DeepSpeed (fp16 overflow; %d in a row)", state.updates + 1,
                        state.bad_in_row)
        elif not math.isfinite(numbers[0]):
            raise TrainingError(f"non-finite loss in update {state.updates + 1} under DeepSpeed, which steps inside "
                                "backward: the update was applied and cannot be skipped. Resume from the newest "
                                "checkpoint with a lower optim.lr.")
        else:
            self.scheduler.step()
            state.optimizer_steps += 1
            state.bad_in_row = 0
        self.window_loss, self.window_count = 0, 0
        return numbers

    def after_update(self, numbers: list[float]) -> None:
        state, s = self.state, self.settings
        loss_sum, count, stop_votes, norm = numbers
        if s.prescale and int(count) != self.expected_count:  # the losses were scaled by the wrong count
            raise TrainingError(f"update {state.updates + 1}: {int(count)} real examples, but the loss was "
                                f"pre-scaled for {self.expected_count}; the data sharding is not the one "
                                "accumulation.real_examples models")
        state.updates += 1
        state.examples_seen += int(count)
        state.losses.append(loss_sum / count)
        state.grad_norms.append(norm)
        state.lrs.append(self.scheduler.get_last_lr()[0])
        now = time.perf_counter()
        if self.log_fn is not None:
            self.log_fn({"train/loss": state.losses[-1], "train/lr": state.lrs[-1], "train/grad_norm": norm,
                         "train/samples_per_second": count / max(now - self.last_update_time, 1e-9),
                         "train/micro_batch_size": state.micro_batch_size}, state.updates)
        self.last_update_time = now
        if state.bad_in_row >= s.max_bad_steps:
            raise TrainingError(f"{state.bad_in_row} updates in a row had a non-finite loss or gradient "
                                f"(trainer.max_bad_steps={s.max_bad_steps}); last good parameters are in the "
                                "newest checkpoint. Lower optim.lr or check the data.")
        self.bar.update(1)
        if state.updates % s.log_every == 0 or state.updates == s.total_updates:
            self.bar.set_postfix(loss=f"{state.losses[-1]:.4f}", lr=f"{state.lrs[-1]:.3g}")
        if s.evaluate and s.eval_every and (state.updates % s.eval_every == 0 or state.updates == s.total_updates):
            self.record_eval()
        if stop_votes > 0:  # a stop signal reached some rank: save here and leave
            path = self.save_checkpoint(self.window_in_epoch, reason="stop signal", force=True)
            raise Preempted(path)
        every = self.checkpointer.every if self.checkpointer else None
        if every and state.updates % every == 0 and self.window_in_epoch < self.windows_per_epoch:
            self.save_checkpoint(self.window_in_epoch, reason="checkpoint_every")

    def save_checkpoint(self, window: int, reason: str, force: bool = False) -> str | None:
        if self.checkpointer is None or (not force and self.done()):
            return None  # the final model is saved by the caller
        position = {"epoch": self.state.epoch, "window": window, "reason": reason}
        return self.checkpointer.save(self.state, position)

    def fall_back(self, loader):
        """Drop the window's partial gradients; halve the micro-batch and double N (same effective batch)."""
        acc, state = self.accelerator, self.state
        if self.settings.deepspeed:
            raise UserError(
                f"out of memory at trainer.micro_batch_size={state.micro_batch_size} under DeepSpeed, which fixes "
                "train_micro_batch_size_per_gpu and gradient_accumulation_steps when it starts, so the trainer "
                f"cannot halve the micro-batch mid-run. Restart with trainer.micro_batch_size="
                f"{smaller_micro_batch(state.micro_batch_size)} and trainer.effective_batch_size set to the same "
                "effective batch.")
        if state.micro_batch_size == 1:
            raise UserError("out of memory at trainer.micro_batch_size=1: the model does not fit; "
                            "try trainer.mixed_precision=bf16, a shorter data.max_length or a smaller model")
        # Not optimizer.zero_grad(): Accelerate makes that a no-op off a sync step, and a rank can
        # run out of memory mid-window.
        self.model.zero_grad(set_to_none=True)
        clear_device_cache(garbage_collection=True)
        micro = smaller_micro_batch(state.micro_batch_size)
        change = {"update": state.updates, "epoch": state.epoch,
                  "from": [state.micro_batch_size, state.grad_accum_steps],
                  "to": [micro, state.grad_accum_steps * state.micro_batch_size // micro]}
        state.micro_batch_size, state.grad_accum_steps = change["to"]
        state.batch_size_changes.append(change)
        acc.gradient_accumulation_steps = state.grad_accum_steps
        acc.step = 0  # accumulate()'s micro-batch counter: the redone window starts afresh
        log.warning("out of memory at update %d: micro-batch %d x N %d -> %d x %d (effective batch "
                    "unchanged); redoing the window", state.updates + 1, *change["from"], *change["to"])
        return self.make_loader(state.micro_batch_size)

    def record_eval(self) -> None:
        state = self.state
        started = time.perf_counter()
        metrics = self.evaluate_fn()
        previous = state.history[-1]["update"] if state.history else 0
        since = [x for x in state.losses[previous:] if math.isfinite(x)]
        entry = {"update": state.updates, "optimizer_step": state.optimizer_steps, "epoch": state.epoch,
                 "train_loss": sum(since) / max(len(since), 1), "f1": metrics["f1"],
                 "accuracy": metrics["accuracy"]}
        state.history.append(entry)
        log.info("update %d: train loss %.4f | validation f1 %.4f accuracy %.4f", entry["update"],
                 entry["train_loss"], entry["f1"], entry["accuracy"])
        if self.log_fn is not None:
            self.log_fn({"eval/f1": entry["f1"], "eval/accuracy": entry["accuracy"]}, state.updates)
        if state.best is None or entry["f1"] > state.best["f1"]:
            state.best, state.evals_since_best = entry, 0
            if self.on_new_best is not None:
                self.on_new_best()
        else:
            state.evals_since_best += 1
            if self.settings.patience and state.evals_since_best >= self.settings.patience:
                state.stopped_early = True
                log.info("early stopping: no validation F1 gain in %d evaluations (best %.4f at update %d)",
                         state.evals_since_best, state.best["f1"], state.best["update"])
        state.eval_seconds += time.perf_counter() - started
        self.last_update_time += time.perf_counter() - started  # samples/s counts training time only
