"""resume(job): the state to continue from -- the newest good checkpoint (auto) or the one named, checked
against this run's fingerprint and world size -- or a fresh TrainState. Resuming also settles the run folder
to that checkpoint: newer checkpoints are moved aside, model/ (best model) becomes the checkpoint's."""

from __future__ import annotations

import os

from accelerate.logging import get_logger

from . import checkpoint, elastic, engines, oom
from .build import Job, fingerprint
from .state import TrainState

log = get_logger(__name__)


def resume(job: Job) -> tuple[TrainState, str | None]:
    """The newest good checkpoint (auto) or the one named, with its state; else a fresh state.

    The configured split wins over the checkpoint's: the same effective batch (the fingerprint checks it) on
    this run's world size, with the configured micro-batch and the N derived for it. The state is resplit to
    it (logged in `batch_size_changes`); the epoch continues at the same window."""
    acc, rc = job.accelerator, job.rc
    path, record = checkpoint.choose(acc, rc.output_dir, rc.resume)
    if path is None:
        return TrainState(job.micro_batch_size, job.grad_accum_steps, total_updates=job.total_updates), None
    checkpoint.check_fingerprint(record["fingerprint"], fingerprint(job), path, rc.resume_force)
    saved_world, world = checkpoint.saved_world_size(record), acc.num_processes
    engine = engines.engine_name(acc)
    elastic.check_world_change(engine, saved_world, world, path,
                               acc.state.fsdp_plugin.fsdp_version if engine == "fsdp" else None)
    acc.load_state(path)  # model, optimizer, scheduler, scaler, the RNG of every rank that has a saved state
    state = TrainState(**{**record["state"], "epoch": record["position"]["epoch"],
                          "window": record["position"]["window"], "total_updates": job.total_updates})
    elastic.restore_rng(acc, saved_world, rc.seed, state.updates)
    if acc.is_main_process:  # only after every check passed: a refused resume changes nothing
        checkpoint.retire_newer(rc.output_dir, state.updates)
        if job.keep_best:
            checkpoint.restore_best_model(path, record, os.path.join(rc.output_dir, "model"))
    acc.wait_for_everyone()
    acc.gradient_accumulation_steps = state.grad_accum_steps
    saved_split = (state.micro_batch_size, state.grad_accum_steps)
    reason = (f"resume on {world} process(es) (checkpoint: {saved_world})" if world != saved_world
              else f"resume with trainer.micro_batch_size={job.micro_batch_size}")
    oom.resplit(state, acc, job.micro_batch_size, reason, grad_accum_steps=job.grad_accum_steps)
    log.info("resumed from %s: update %d, epoch %d, window %d | world size %d -> %d, micro-batch %d -> %d, N %d -> %d "
             "(effective batch %d)", path, state.updates, state.epoch, state.window, saved_world, world,
             saved_split[0], state.micro_batch_size, saved_split[1], state.grad_accum_steps, job.effective_batch_size)
    return state, path
