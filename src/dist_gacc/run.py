"""run(cfg): build the Job, resume, train, write outputs; main(cfg): exit codes for scripts/train.py.

    main ─ run ─┬─ build.build       config slices -> Accelerator, data, model, optimizer, the Job
                ├─ resume.resume     the checkpoint to continue from (or a fresh TrainState)
                ├─ build_loop        the components fit() drives (engine, OOM guard, evaluator, ...)
                ├─ loop.fit          the training loop
                ├─ outputs.finish    model/, test split; outputs.save_outputs: metrics.json, predictions
                └─ outputs.add_baseline, write_model_card   main process, after the group has ended: the
                                     TF-IDF baseline into metrics.json (a stop signal skips it), model/README.md
"""

from __future__ import annotations

import os
import sys
import time

from accelerate.logging import get_logger
from omegaconf import DictConfig

from . import checkpoint, engines, oom, teardown
from .build import Job, build, fingerprint
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_PREEMPTED,
    EXIT_TRAINING_FAILED,
    TrainingError,
    UserError,
    environment_cause,
)
from .evaluation import Evaluator
from .loop import Hooks, Loop, fit, standalone
from .outputs import (
    add_baseline,
    evaluate,
    finish,
    flat_hparams,
    run_name,
    save_model,
    save_outputs,
    write_model_card,
)
from .preemption import Preempted, StopSignals
from .resume import resume
from .state import TrainState
from .step import StepParts
from .telemetry import Telemetry
from .windows import TrainBatches

log = get_logger(__name__)


def build_loop(job: Job, state: TrainState, stop, evaluate_fn, keep_best: bool) -> Loop:
    acc, t = job.accelerator, job.rc.trainer
    telemetry = Telemetry(acc, job.total_updates, state.updates, t.log_every, trackers=bool(acc.log_with))
    best_model_dir = os.path.join(job.rc.output_dir, "model") if keep_best else None  # saved with each checkpoint
    checkpointer = checkpoint.Checkpointer(acc, job.rc.output_dir, t.checkpoint_every, t.keep_checkpoints,
                                           fingerprint(job), before_rename=job.hooks.before_checkpoint_rename,
                                           best_model_dir=best_model_dir)
    parts = StepParts(acc, job.model, job.optimizer, job.scheduler, job.task.objective(), job.engine,
                      oom.MemoryGuard(acc, job.model, job.oom_policy, job.hooks), job.hooks, t.max_grad_norm)
    evaluator = Evaluator(evaluate_fn, t.eval_every, t.early_stopping_patience,
                          (lambda: save_model(job)) if keep_best else None, telemetry, job.task)
    batches = TrainBatches(acc, job.make_loader, len(job.splits["train"]), job.order_weights())
    return Loop(parts, batches, evaluator, telemetry, job.oom_policy, t.max_bad_steps, checkpointer, stop)


def train_only(job: Job, engine: engines.Engine | None = None, state: TrainState | None = None) -> TrainState:
    """Train `job` from scratch (or on from a resumed `state`) with its engine (or `engine`): no evaluation,
    checkpoints or trackers."""
    loop, fresh = standalone(job.accelerator, job.model, job.optimizer, job.scheduler, job.make_loader,
                             len(job.splits["train"]), job.micro_batch_size, job.grad_accum_steps, job.total_updates,
                             max_grad_norm=job.rc.trainer.max_grad_norm, engine=engine or job.engine, hooks=job.hooks,
                             objective=job.task.objective(), order_weights=job.order_weights())
    return fit(loop, state or fresh)


def run(cfg: DictConfig, *, hooks: Hooks | None = None, kept_signals: list[int] | None = None) -> dict:
    """Train and evaluate as `cfg` says; returns the metrics written to metrics.json. `kept_signals`: stop signals
    that arrived before (scripts/train.py's, while its libraries loaded): the run stops as for one during set-up."""
    wall_start = time.perf_counter()
    with StopSignals(kept_signals) as stop:  # from the first moment: a signal during set-up or the final save is kept
        job = build(cfg, hooks)
        acc = job.accelerator
        average = job.task.f1_average
        state, resumed_from = resume(job)
        keep_best = job.keep_best
        if acc.log_with:  # the whole config becomes hyperparameters
            acc.init_trackers(run_name(job.rc), config=flat_hparams(cfg))
        loop = build_loop(job, state, stop, lambda: evaluate(job, "validation", average), keep_best)
        job.hooks.after_setup()
        seen_before, eval_before, loop_start = state.examples_seen, state.eval_seconds, time.perf_counter()
        try:
            fit(loop, state)
        except Preempted:  # every rank stops after the same checkpoint: end the process group in order
            teardown.shutdown(acc, models=[job.model])
            raise
        finally:
            loop.telemetry.close()
            # Flushed on every way out, a stop signal's included. Not accelerator.end_training(): it also
            # destroys the process group, which the final save still needs (teardown.shutdown ends it).
            for tracker in acc.trackers:
                tracker.finish()
        train_seconds = time.perf_counter() - loop_start - (state.eval_seconds - eval_before)  # this process
        result, scored = finish(job, state, loop.evaluator, keep_best, average)
        result.update(resumed_from=resumed_from, wall_seconds=time.perf_counter() - wall_start,
                      train_samples_per_second=(state.examples_seen - seen_before) / max(train_seconds, 1e-9))
        save_outputs(job, cfg, result, scored)  # ends with a barrier
        if stop():
            log.warning("a stop signal arrived after the last update; the run's outputs were completed first")
        teardown.shutdown(acc, models=[job.model])
        # Still under StopSignals: a signal from here on ends the run as finished (exit 0) with its card, the
        # baseline skipped if it had not been fitted, instead of killing the process (143) before the card.
        if acc.is_main_process:  # after the group has ended: the other ranks are not held in a barrier meanwhile
            add_baseline(job, result, stop)  # rewrites metrics.json with `baseline`
            write_model_card(job, result)
        log.info("done: %d updates | validation %s%s%s | %.1f samples/s | %.0f s | %s", state.optimizer_steps,
                 scores_line(result, "validation", job.task.reported),
                 f" | test {scores_line(result, 'test', job.task.reported)}" if result.get("test") else "",
                 tuned_summary(result),
                 result["train_samples_per_second"], result["wall_seconds"], job.rc.output_dir)
    return result


def scores_line(result: dict, split: str, reported: tuple[str, ...]) -> str:
    """'f1 0.8609 (baseline 0.8074) accuracy 0.8440': the split's reported figures, the chosen metric first and
    the baseline's score beside it (when one was fitted and scored that figure)."""
    scores = result["eval"] if split == "validation" else result[split]
    base = (result.get("baseline") or {}).get(split) or {}
    main = reported[0]
    return " ".join(f"{k} {scores[k]:.4f}" + (f" (baseline {base[k]:.4f})" if k == main and k in base else "")
                    for k in reported if k in scores)


def tuned_summary(result: dict) -> str:
    """The final line's multi-label F1 at the configured threshold and at the tuned ones (test, else validation)."""
    tuned = result.get("tuned_thresholds")
    if not tuned:
        return ""
    split = "test" if tuned["test"] else "validation"
    fixed = result["test"] if tuned["test"] else result["eval"]
    return (f" | {split} f1 {fixed['f1']:.4f} at threshold {0.5:g}, {tuned[split]['f1']:.4f} at tuned thresholds "
            f"{tuned['thresholds']}")


# --- the command line ---------------------------------------------------------------------------------

def check_multirun() -> None:
    """Multirun inside `accelerate launch` would run every job on every rank: refuse at once.
    Multirun in one process (Hydra's basic launcher) resets Accelerate's singleton state per job,
    so jobs may differ in mixed precision."""
    from accelerate.state import AcceleratorState
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank says it, as main() does for other expected failures: the launcher ends the others as soon
        # as one exits (measured: rank 0 ended before it printed when only it did).
        print("error: -m (multirun) inside `accelerate launch` would run every job on every rank. Run the "
              "sweep with one accelerate launch per job instead:\n  python scripts/train.py -m "
              "hydra/launcher=accelerate hydra.launcher.num_processes=N ...", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    AcceleratorState._reset_state(reset_partial_state=True)


def exit_code(err: BaseException) -> tuple[int, str] | None:
    """The documented exit code and message for an expected failure; None for a bug (traceback)."""
    cause = environment_cause(err)
    if cause is not None:
        return EXIT_ENVIRONMENT, f"error: the environment, not the input: {cause}\n({type(err).__name__}: {err})"
    if isinstance(err, UserError):
        return EXIT_BAD_INPUT, f"error: {err}"
    if isinstance(err, TrainingError):
        return EXIT_TRAINING_FAILED, f"error: {err}"
    if isinstance(err, Preempted):
        where = f"checkpoint {err.path}" if err.path else "no checkpoint was due"
        return EXIT_PREEMPTED, (f"stopped by a signal after a finished update; {where}. "
                                "Rerun with resume=auto (same hydra.run.dir) to continue.")
    return None


def main(cfg: DictConfig, kept_signals: list[int] | None = None) -> float:
    """Entry point for scripts/train.py: expected failures end with a message and a documented code.
    `kept_signals`: the stop signals its first line kept while the libraries loaded (StopSignals).

    Returns the objective for Hydra sweepers: the validation trainer.metric (F1; regression: Pearson's r; mse is
    lower-is-better: set the sweeper's direction) of the model in model/ (`eval`, outputs.finish):
    the best model with save_best or early stopping, else the final one. Not the best evaluation's F1 when
    model/ is the final model: a sweep would then pick settings by a model it never saved.
    """
    check_multirun()
    try:
        result = run(cfg, kept_signals=kept_signals)
        return result["eval"][result["metric"]]
    except Exception as err:
        known = exit_code(err)
        if known is None:
            raise
        code, message = known
        if code != EXIT_PREEMPTED or int(os.environ.get("RANK", "0")) == 0:
            print(message, file=sys.stderr)
        teardown.end_after_failure()  # (a preempted run has already ended its group in order)
        sys.exit(code)
