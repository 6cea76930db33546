"""Out of memory: every rank agrees, closes DDP's pending iteration, halves the micro-batch, doubles N.

The only writer of the split (micro-batch size and N) once training has started: `resplit`.

Agreement needs a point where every rank calls the same collective. Under DDP (broadcast_buffers=
False) forward passes hold no collective and, inside a window, neither do backward passes (no_sync),
so a rank that runs out of memory joins a one-flag all-reduce at once while the others join it
after the forward pass of the window's last micro-batch: exactly one vote per window. With
`trainer.sync_each_batch` every backward exchanges gradients, so the vote is held after every
forward pass instead. Under FSDP the forward passes themselves all-gather parameters: a rank that
failed could not meet the others, so the fallback is refused there (`policy`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate.logging import get_logger
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from . import packing
from .errors import ConfigError, UserError

log = get_logger(__name__)


class WindowOutOfMemory(Exception):
    """Some rank ran out of memory in the current window; every rank knows it."""


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or should_reduce_batch_size(err)


def smaller_micro_batch(micro_batch_size: int) -> int:
    """The largest divisor of the micro-batch that is at most half of it (keeps micro x N fixed)."""
    return max(d for d in range(1, micro_batch_size // 2 + 1) if micro_batch_size % d == 0)


@dataclass(frozen=True)
class Policy:
    engine: str
    fall_back: bool          # redo the window with a smaller micro-batch (else: stop, naming the size)
    agree: bool              # ranks can meet in a vote (no collective inside forward passes)
    vote_every_micro_batch: bool  # sync_each_batch: gradients are exchanged after every micro-batch


def policy(engine: str, setting: str | bool, sync_each_batch: bool, auto_micro: bool) -> Policy:
    """What happens on out of memory under `engine`, chosen once at build; refuses unsafe settings.

    `setting` is trainer.oom_fallback: auto (on where it is safe), true or false."""
    unsafe = {
        "fsdp": "FSDP's forward passes all-gather parameters, so a rank that runs out of memory cannot "
                "meet the others to agree on a smaller micro-batch (they would wait in the all-gather "
                "until trainer.dist_timeout_s)",
        "deepspeed": "DeepSpeed fixes train_micro_batch_size_per_gpu and gradient_accumulation_steps "
                     "when it starts",
    }
    if engine in unsafe and setting is True:
        raise ConfigError(f"trainer.oom_fallback=true is not supported under {engine}: {unsafe[engine]}. Set "
                          "trainer.oom_fallback=auto or false (an out-of-memory error then stops the run and "
                          "names the micro-batch to restart with), or train with DDP.")
    if engine == "fsdp" and auto_micro:
        raise ConfigError(f"trainer.micro_batch_size=auto is not supported under fsdp: {unsafe['fsdp']}. "
                          "Give a number.")
    return Policy(engine, fall_back=setting is not False and engine not in unsafe, agree=engine != "fsdp",
                  vote_every_micro_batch=sync_each_batch)


def restart_advice(micro_batch_size: int) -> str:
    return (f"Restart with trainer.micro_batch_size={smaller_micro_batch(micro_batch_size)} and "
            "trainer.effective_batch_size set to the same effective batch (resume=auto keeps every update).")


class MemoryGuard:
    """Wraps each micro-batch's forward and backward: out-of-memory errors become one agreed
    `WindowOutOfMemory` on every rank (or a UserError where the window cannot be redone)."""

    def __init__(self, accelerator, model, policy: Policy, hooks):
        self.accelerator, self.model, self.policy, self.hooks = accelerator, model, policy, hooks
        self.armed = None  # the losses of a synchronising forward: DDP now expects their backward
        self.batch = None  # the micro-batch in flight (a one-row slice of it closes DDP's iteration)

    def forward(self, objective, micro, state) -> torch.Tensor:
        """Per-example losses of the micro-batch. Collective (the vote) where gradients will sync."""
        self.batch, losses, failed = micro.batch, None, False
        syncs = micro.last or self.policy.vote_every_micro_batch
        try:
            self.hooks.before_forward(state.micro_batch_size, state.updates)
            losses = self.hooks.after_forward(objective(self.model, micro.batch), state.updates)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            failed = True
            self._stop_unless_voting(err, state)
        if syncs:
            self.armed = losses
        self.vote(failed, syncs)  # collective when `syncs` (all ranks) or `failed`
        return losses

    def backward(self, loss: torch.Tensor, micro, state) -> None:
        syncs = micro.last or self.policy.vote_every_micro_batch
        try:
            self.accelerator.backward(loss)  # collective at a sync: DDP's gradient all-reduce
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            if self.accelerator.num_processes > 1 and syncs:
                raise UserError(
                    f"out of memory in a synchronising backward pass on rank {self.accelerator.process_index} at "
                    f"micro-batch {state.micro_batch_size}: the other ranks are already exchanging gradients, so the "
                    f"window cannot be redone. {restart_advice(state.micro_batch_size)}") from err
            self._stop_unless_voting(err, state)
            self.vote(True, syncs)
        self.armed = None

    def vote(self, failed: bool, syncs: bool) -> None:
        """All ranks learn whether any ran out of memory, before gradients are exchanged."""
        acc = self.accelerator
        if acc.num_processes > 1 and (failed or syncs):
            flag = torch.tensor(float(failed), device=acc.device)
            failed = acc.reduce(flag, reduction="sum").item() > 0  # collective
        if failed:
            raise WindowOutOfMemory()

    def _stop_unless_voting(self, err: BaseException, state) -> None:
        if not self.policy.agree:
            raise UserError(f"out of memory at trainer.micro_batch_size={state.micro_batch_size} under FSDP, where "
                            f"the ranks cannot agree on a redo (trainer.oom_fallback). "
                            f"{restart_advice(state.micro_batch_size)}") from err

    @contextlib.contextmanager
    def window(self):
        """Around a window's micro-batches: on an agreed out-of-memory error, close DDP's iteration on
        every rank (outside accumulate()'s no_sync, so every rank's backward all-reduces) and re-raise."""
        try:
            yield
        except WindowOutOfMemory:
            if self.policy.engine != "deepspeed":  # fall_back refuses; no extra backward into DeepSpeed
                self._finish_ddp_iteration()
            raise

    def _finish_ddp_iteration(self) -> None:
        """A rank whose last forward synchronised has DDP waiting for its backward (the next forward
        would fail); the ranks that ran out of memory have none. Each runs one backward of a zero loss
        (the pending graph, or a one-row forward), so all join the same gradient all-reduce; the
        gradients are discarded by the fallback."""
        if self.accelerator.num_processes == 1:
            return
        if self.armed is not None:
            zero = self.armed.sum() * 0
        else:
            clear_device_cache(garbage_collection=True)
            row = {k: v[:1] for k, v in self.batch.items() if k != "labels"}
            zero = self.model(**row).logits.float().sum() * 0
        zero.backward()  # collective: DDP's gradient all-reduce
        self.armed = None


def update_out_of_memory(phase: str, window, model) -> UserError:
    """Out of memory after a window's backward passes (clipping, the optimizer step): its activations are freed,
    so no smaller micro-batch helps and there is nothing to redo. What has to fit is the parameters, their
    gradients and AdamW's state (two fp32 tensors per trainable parameter, allocated at the first step)."""
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return UserError(
        f"out of memory {phase} in window {window.index} of epoch {window.epoch}, after the backward passes (a "
        f"smaller trainer.micro_batch_size does not help here): the parameters, gradients and AdamW state of "
        f"{trainable_parameters:,} trainable parameters do not fit. Train fewer parameters with peft=lora (the "
        "adapters and the head only), or a smaller model (model.name_or_path).")


class EvalForward:
    """Evaluation logits that survive out of memory: a batch that does not fit at trainer.eval_batch_size is
    run in slices, halved until they fit; the slice size then stays for the rest of the run.

    Local to the rank, no vote: an evaluation forward pass holds no collective (no gradient, so DDP does not
    synchronise; DeepSpeed ZeRO-1/2 keeps whole parameters), and every rank still returns one row of logits per
    row of its batch for gather_for_metrics. A row's logits depend on its own tokens and mask only, so the
    slicing changes no prediction. Under FSDP the forward pass all-gathers parameters, so a rank that failed
    could not rejoin the others mid-pass: the run stops, naming trainer.eval_batch_size."""

    def __init__(self, policy: Policy, eval_batch_size: int, repack=None):
        self.policy, self.configured, self.rows = policy, eval_batch_size, eval_batch_size
        self.repack = repack  # the packed collator: a packed batch is sliced by texts and packed again

    def __call__(self, model, batch: dict) -> torch.Tensor:
        while True:
            try:
                return self._logits(model, batch)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                self._fall_back(err, examples(batch))

    def _logits(self, model, batch: dict) -> torch.Tensor:
        n = examples(batch)
        if n <= self.rows:
            return model(**batch).logits
        return torch.cat([self._logits(model, part) for part in self._slices(batch, n)])

    def _slices(self, batch: dict, n: int) -> list[dict]:
        if not packing.is_packed(batch):
            return [{k: v[i:i + self.rows] for k, v in batch.items()} for i in range(0, n, self.rows)]
        features, device = packing.unpack(batch), batch["input_ids"].device
        return [{k: v.to(device) for k, v in self.repack(features[i:i + self.rows]).items()}
                for i in range(0, n, self.rows)]

    def _fall_back(self, err: BaseException, batch_rows: int) -> None:
        if not self.policy.agree:
            raise UserError(f"out of memory evaluating at trainer.eval_batch_size={self.configured} under FSDP, "
                            "where a rank cannot redo a forward pass alone. Restart with a smaller "
                            "trainer.eval_batch_size (resume=auto keeps every update).") from err
        if min(self.rows, batch_rows) == 1:
            raise UserError("out of memory evaluating 1 example at a time: the model does not fit for inference; "
                            "try trainer.mixed_precision=bf16, a shorter data.max_length or a smaller model") from err
        failed = min(self.rows, batch_rows)
        self.rows = failed // 2
        clear_device_cache(garbage_collection=True)
        log.warning("out of memory in evaluation at %d rows per forward pass (trainer.eval_batch_size=%d): "
                    "evaluating %d rows at a time from here on", failed, self.configured, self.rows)


def examples(batch: dict) -> int:
    """The batch's examples: its rows, or its texts when packed."""
    return len(batch["pool_index"]) if packing.is_packed(batch) else len(next(iter(batch.values())))


def resplit(state, accelerator, micro_batch_size: int, reason: str, grad_accum_steps: int | None = None) -> None:
    """Change the micro-batch (and N), keeping the effective batch fixed; logged in the state.

    `grad_accum_steps`: the new N when the world size changed too (a resume on another process count, where
    micro x N per process changes); by default micro x N per process is kept."""
    if grad_accum_steps is None:
        effective_per_rank = state.micro_batch_size * state.grad_accum_steps
        if effective_per_rank % micro_batch_size:
            raise ConfigError(f"trainer.micro_batch_size={micro_batch_size} does not divide the {effective_per_rank} "
                              "examples per process of each update; choose a divisor to keep the effective batch")
        grad_accum_steps = effective_per_rank // micro_batch_size
    if (micro_batch_size, grad_accum_steps) == (state.micro_batch_size, state.grad_accum_steps):
        return
    change = {"update": state.updates, "epoch": state.epoch, "reason": reason,
              "from": [state.micro_batch_size, state.grad_accum_steps], "to": [micro_batch_size, grad_accum_steps]}
    state.micro_batch_size, state.grad_accum_steps = change["to"]
    state.batch_size_changes.append(change)
    accelerator.gradient_accumulation_steps = state.grad_accum_steps
    accelerator.step = 0  # accumulate()'s micro-batch counter: the next window starts afresh
    log.warning("%s at update %d: micro-batch %d x N %d -> %d x %d (effective batch unchanged)", reason,
                state.updates, *change["from"], *change["to"])


def fall_back(policy: Policy, accelerator, model, state) -> None:
    """Drop the window's partial gradients; halve the micro-batch and double N (same effective batch)."""
    if not policy.fall_back:
        raise UserError(f"out of memory at trainer.micro_batch_size={state.micro_batch_size} under {policy.engine}, "
                        f"where the trainer cannot halve the micro-batch mid-run (trainer.oom_fallback). "
                        f"{restart_advice(state.micro_batch_size)}")
    if state.micro_batch_size == 1:
        raise UserError("out of memory at trainer.micro_batch_size=1: the model does not fit; "
                        "try trainer.mixed_precision=bf16, a shorter data.max_length or a smaller model")
    # Not optimizer.zero_grad(): Accelerate makes that a no-op off a sync step, and a rank can
    # run out of memory mid-window.
    model.zero_grad(set_to_none=True)
    clear_device_cache(garbage_collection=True)
    resplit(state, accelerator, smaller_micro_batch(state.micro_batch_size), "out of memory")


def probe_micro_batch_size(accelerator, model, cap: int, max_length: int, vocab_size: int, hooks,
                           collate=None) -> int:
    """The largest micro-batch (from `cap`, dividing down) whose worst case fits on every rank.

    Worst case: every row at max_length tokens, forward and backward. Accelerate's
    find_executable_batch_size retries a whole function per size on one process; here all ranks
    must agree on one size, so each try ends in an all-reduce of the failure flag. `collate`: the packed
    collator, which lays the worst case out as training will (rows of packing_max_tokens).
    """
    model.to(accelerator.device).train()
    micro = cap
    while True:
        failed = 0.0
        try:
            hooks.before_forward(micro, 0)
            ids = torch.randint(0, vocab_size, (micro, max_length), device=accelerator.device)
            batch = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)} if collate is None else
                     {k: v.to(accelerator.device) for k, v in collate([{"input_ids": row} for row in ids.tolist()]).items()})
            with accelerator.autocast():
                logits = model(**batch).logits
            logits.float().sum().backward()
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            failed = 1.0
        model.zero_grad(set_to_none=True)
        failed = accelerator.reduce(torch.tensor(failed, device=accelerator.device), reduction="sum").item()  # collective
        if not failed:
            log.info("trainer.micro_batch_size=auto: %d fits (cap %d)", micro, cap)
            return micro
        if micro == 1:
            raise UserError("trainer.micro_batch_size=auto: even 1 example does not fit in memory")
        micro = smaller_micro_batch(micro)
