"""run(cfg): validate, build everything from its slice of the config, train, write outputs (rank 0).

    main ─ run ─┬─ build            config slices -> Accelerator, data, model, optimizer, the Job
                ├─ resume           the checkpoint to continue from (or a fresh TrainState)
                ├─ build_loop       the components fit() drives (engine, OOM guard, evaluator, ...)
                ├─ loop.fit         the training loop
                └─ finish           model/, test split, metrics.json, predictions
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
import transformers
from accelerate import (Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs,
                        InitProcessGroupKwargs, PartialState)
from accelerate.logging import get_logger
from accelerate.utils import (GradientAccumulationPlugin, ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list,
                              parse_flag_from_env, set_seed)
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, data, elastic, engines, metrics, models, oom, optim, precision, teardown
from .batchnorm import apply_batchnorm_policy
from .config import DataConfig, RunConfig, batch_plan, check_machine, load_config, scaled_lr
from .errors import (EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_PREEMPTED, EXIT_TRAINING_FAILED, ConfigError,
                     TrainingError, UserError, environment_cause)
from .evaluation import Evaluator
from .loop import Hooks, Loop, fit, standalone
from .preemption import Preempted, StopSignals
from .state import TrainState
from .step import StepParts
from .tasks import Task, build_task
from .telemetry import Telemetry
from .windows import TrainBatches

log = get_logger(__name__)


# --- build --------------------------------------------------------------------------------------------

def trackers(log_with) -> list[str] | None:
    names = [log_with] if isinstance(log_with, str) else list(log_with or [])
    names = [n for n in names if n != "none"]
    return names or None


def choose_precision(rc: RunConfig) -> precision.PrecisionChoice:
    """trainer.mixed_precision resolved for this machine (`auto`: measured; precision.py). The process group
    starts here, before the Accelerator that needs the answer: the main process decides (it alone may probe
    and write the probe's cache) and every rank takes its answer."""
    # The same arguments AcceleratorState would pass; the Accelerator then reuses this PartialState.
    state = PartialState(parse_flag_from_env("ACCELERATE_USE_CPU"),
                         **InitProcessGroupKwargs(timeout=timedelta(seconds=rc.trainer.dist_timeout_s)).to_kwargs())
    choice = [precision.resolve(rc.trainer.mixed_precision, state.device.type) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(choice, from_process=0)  # collective: one small object, once per run
    return choice[0]


def build_accelerator(rc: RunConfig) -> Accelerator:
    """The Accelerator for rc, whose trainer.mixed_precision is already resolved (no | bf16 | fp16)."""
    t = rc.trainer
    return Accelerator(
        mixed_precision=t.mixed_precision,
        log_with=trackers(t.log_with),
        # Accelerate's prepared scheduler steps once per process per update unless told otherwise;
        # the engine steps it itself, once per real optimizer update.
        step_scheduler_with_optimizer=False,
        # N is set once the micro-batch is known (build); sync_each_batch exchanges gradients after every
        # micro-batch instead of skipping the all-reduce (DDP) / reduce-scatter (FSDP) inside a window.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_each_batch=t.sync_each_batch),
        # One seeded permutation per epoch, sharded by batch: 1 and 2 processes see the same windows.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=rc.seed),
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s)),
            # No collective in forward passes, so a rank that runs out of memory mid-window can still
            # meet the others at the window's agreement point (oom.MemoryGuard.vote). Buffers of
            # the supported encoders are constants; BatchNorm statistics stay per rank (rank 0 saved).
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
        # Trackers write under <run>/tensorboard/<run name>.
        project_config=ProjectConfiguration(project_dir=rc.output_dir,
                                            logging_dir=os.path.join(rc.output_dir, "tensorboard")),
        # The model is compiled in prepare(); dynamic=None lets dynamo mark the padded length dynamic
        # after its first recompile instead of compiling once per batch length.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if t.compile else None,
    )


@dataclass
class Job:
    """Everything built from the config, ready for the loop."""
    rc: RunConfig
    accelerator: Accelerator
    splits: datasets.DatasetDict
    encoded: datasets.DatasetDict
    tokenizer: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    eval_loaders: dict
    metric: object
    task: Task                 # single/multi-label, class weights, F1 average: picked once here
    micro_batch_size: int      # as configured (probed for auto)
    grad_accum_steps: int
    effective_batch_size: int
    total_updates: int
    lr: float
    engine: engines.Engine
    oom_policy: oom.Policy
    hooks: Hooks
    trainable_parameters: int = 0   # counted before prepare (LoRA: adapters and head)
    total_parameters: int = 0
    precision: precision.PrecisionChoice | None = None   # requested/resolved/reason (auto: measured)

    def make_loader(self, micro_batch_size: int):
        t = self.rc.trainer
        loader = data.train_loader(self.encoded["train"], self.tokenizer, micro_batch_size, t.num_workers,
                                   pin_memory=self.accelerator.device.type == "cuda", seed=self.rc.seed,
                                   group_by_length=t.group_by_length, group_size=self.effective_batch_size)
        return self.accelerator.prepare(loader)


def build(cfg: DictConfig, hooks: Hooks | None = None, dtype=None) -> Job:
    """Validate the config and build data, model, optimizer and schedule. Raises UserError on bad input.

    `dtype` casts the model's parameters: a torch dtype, or a function of the resolved precision
    (scripts/verify_equivalence.py checks fp32 runs in float64).
    """
    hooks = hooks or Hooks()
    rc = load_config(cfg)  # every value checked before any work
    check_machine(rc.trainer)
    choice = choose_precision(rc)
    if choice.warning:
        log.warning(choice.warning, main_process_only=True)
    # From here on trainer.mixed_precision is what runs (no | bf16 | fp16); the request stays in job.precision.
    rc = dataclasses.replace(rc, trainer=dataclasses.replace(rc.trainer, mixed_precision=choice.resolved))
    dtype = dtype(choice.resolved) if callable(dtype) else dtype
    accelerator = build_accelerator(rc)
    engine_name = engines.engine_name(accelerator)
    engines.check_launch(accelerator)
    engines.check_supported(accelerator, rc.trainer, rc.peft)
    if rc.peft.name == "lora":
        models.require_peft()  # before any data is loaded
    t, world = rc.trainer, accelerator.num_processes
    oom_policy = oom.policy(engine_name, t.oom_fallback, t.sync_each_batch and world > 1, t.micro_batch_size == "auto")
    if not accelerator.is_main_process:  # only the main process prints
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    if cfg.get("num_processes") not in (None, world):
        raise ConfigError(f"num_processes={cfg.num_processes} but this run has {world} process(es): launch it with "
                          f"accelerate launch --num_processes {cfg.num_processes}, or through hydra/launcher=accelerate")
    set_seed(rc.seed)
    splits, tokenizer, model, encoded, metric, task = build_data_and_model(rc, accelerator, dtype)
    trainable_parameters, total_parameters = models.parameter_counts(model)  # before prepare (FSDP shards)
    if engine_name == "deepspeed" and task.weighted_normaliser:
        raise ConfigError("trainer.class_weights under DeepSpeed: the update divides by the window's sum of weights, "
                          "known only after its last backward, and DeepSpeed steps inside that backward. Use DDP "
                          "(or FSDP), or class_weights=none.")

    # Batch arithmetic: micro-batch (probed if auto), then N from the effective batch.
    micro = t.micro_batch_size
    if micro == "auto":
        micro = oom.probe_micro_batch_size(accelerator, model, t.auto_micro_batch_cap, rc.data.max_length,
                                           len(tokenizer), hooks)
    grad_accum_steps, effective = batch_plan(t, world, micro)
    accelerator.gradient_accumulation_steps = grad_accum_steps
    if engine_name == "deepspeed":
        ds_values = engines.configure_deepspeed(accelerator, t, micro, grad_accum_steps)
        log.info("DeepSpeed ZeRO-%d: %s; the loop pre-scales each micro-batch loss and does not clip",
                 accelerator.state.deepspeed_plugin.zero_stage, ds_values)
    apply_batchnorm_policy(model, t.batchnorm, micro, grad_accum_steps, effective,
                           lambda msg: log.warning(msg, main_process_only=True))
    lr = scaled_lr(rc.optim, effective)
    # The schedule counts optimizer updates. A window covers `effective` examples of the epoch's
    # permutation whatever the split, so an epoch is ceil(examples / effective) updates.
    total_updates = t.max_steps or t.epochs * math.ceil(len(splits["train"]) / effective)
    # Fused AdamW measured faster on CUDA and on CPU (docs/benchmarks.md); other devices keep foreach.
    fused = accelerator.device.type in ("cuda", "cpu") if t.fused_adamw == "auto" else t.fused_adamw
    optimizer = optim.build_optimizer(model, rc.optim, lr, fused=fused)
    scheduler = optim.build_scheduler(optimizer, rc.optim, total_updates)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in data.eval_loaders(
        encoded, tokenizer, t.eval_batch_size, t.num_workers, accelerator.device.type == "cuda", rc.seed).items()}
    engine = engines.build_engine(engine_name, t.loss_normalisation, fp16=t.mixed_precision == "fp16",
                                  weighted=task.weighted_normaliser)
    job = Job(rc, accelerator, splits, encoded, tokenizer, model, optimizer, scheduler, eval_loaders, metric, task,
              micro, grad_accum_steps, effective, total_updates, lr, engine, oom_policy, hooks,
              trainable_parameters, total_parameters, choice)
    log_plan(job, engine_name)
    return job


def build_data_and_model(rc: RunConfig, accelerator, dtype):
    """Splits, tokenizer, model, tokenized splits, metric, task. Every rank builds the same tokenizer and the
    same initial weights; the main process tokenizes first (and fills the cache), the others load it."""
    splits = data.load_splits(rc.data, rc.seed)
    train = splits["train"]
    task = build_task(rc.trainer, data.label_names(train), data.is_multi_label(train), train["label"])
    tokenizer = models.build_tokenizer(rc.model, data.train_texts(train), rc.data.max_length)
    model = models.build_model(rc.model, task.label_names, tokenizer, task.problem_type)
    # LoRA and gradient checkpointing, before accelerator.prepare; the optimizer then keeps the
    # parameters that require grad (LoRA: the adapters and the classification head).
    model = models.apply_memory_levers(model, rc.model, rc.peft)
    if dtype is not None:
        model = model.to(dtype)
    with accelerator.main_process_first():
        cache = (os.path.join(datasets.config.HF_DATASETS_CACHE, "dist_gacc_tokenized")
                 if rc.trainer.cache_tokenized else None)
        encoded = data.tokenize(splits, tokenizer, rc.data.max_length, cache_dir=cache, num_proc=rc.data.num_proc)
        metric = metrics.load_metric(task.multi_label)
    return splits, tokenizer, model, encoded, metric, task


def log_plan(job: Job, engine_name: str) -> None:
    rc, t, world = job.rc, job.rc.trainer, job.accelerator.num_processes
    log.info("world size %d | micro-batch %d x accumulation %d x world %d = effective batch %d | engine %s%s",
             world, job.micro_batch_size, job.grad_accum_steps, world, job.effective_batch_size, engine_name,
             " | gradients exchanged every micro-batch (sync_each_batch)" if t.sync_each_batch and world > 1 else "")
    scaling = (f"; {rc.optim.lr_scaling} scaling of {rc.optim.lr:.3g} from reference batch "
               f"{rc.optim.reference_batch_size}" if rc.optim.lr_scaling != "none" else "")
    log.info("lr in effect %.3g%s (schedule %s, warmup %d of %d updates; starts at %.3g) | precision %s | "
             "device %s | train/validation examples %d/%d", job.lr, scaling, rc.optim.scheduler,
             optim.warmup_updates(rc.optim, job.total_updates), job.total_updates, job.scheduler.get_last_lr()[0],
             describe_precision(job.precision, t.mixed_precision), job.accelerator.device, len(job.splits["train"]),
             len(job.splits["validation"]))
    task = job.task
    log.info("task %s, %d labels %s%s | F1 average %s | class weights %s%s", task.problem_type, len(task.label_names),
             task.label_names, " | text pairs" if "text_pair" in job.splits["train"].column_names else "",
             task.f1_average, task.class_weights_setting,
             f" {task.describe_weights()}" + (" (positive weights per label)" if task.multi_label else
                                               "; an update divides by its window's sum of weights")
             if task.class_weights else "")
    p = rc.peft
    log.info("parameters: %d trainable of %d (%.2f%%)%s | gradient checkpointing %s", job.trainable_parameters,
             job.total_parameters, 100 * job.trainable_parameters / max(job.total_parameters, 1),
             f" | LoRA r={p.r} alpha={p.alpha:g} dropout={p.dropout:g} on "
             f"{models.lora_targets(job.accelerator.unwrap_model(job.model).get_base_model(), p)}"
             if p.name == "lora" else "", "on" if rc.model.gradient_checkpointing else "off")


def describe_precision(choice: precision.PrecisionChoice | None, resolved: str) -> str:
    if choice is None or choice.requested != "auto" and choice.probe is None:
        return resolved
    return f"{choice.requested} -> {choice.resolved} ({choice.reason})"


def fingerprint(job: Job) -> dict:
    """The settings that define the sequence of updates; a resume must not change them silently.
    (Not the micro-batch, N or the world size: any split of the effective batch over any number of processes
    gives the same updates; elastic.py.)"""
    rc, engine = job.rc, engines.engine_name(job.accelerator)
    record = {
        "effective_batch_size": job.effective_batch_size, "lr": job.lr, "total_updates": job.total_updates,
        "seed": rc.seed, "mixed_precision": rc.trainer.mixed_precision,
        "loss_normalisation": rc.trainer.loss_normalisation, "max_grad_norm": rc.trainer.max_grad_norm,
        "class_weights": job.task.class_weights,
        "optim": dataclasses.asdict(rc.optim),
        # Gradient checkpointing changes memory, not the updates: a resume may switch it.
        "model": {k: v for k, v in dataclasses.asdict(rc.model).items() if k != "gradient_checkpointing"},
        "data": data_fingerprint(rc.data),
        # One process and DDP are the same math (a resume may move between them); FSDP and DeepSpeed are not.
        "engine": "ddp" if engine == "single" else engine,
    }
    if rc.peft.name != "none":  # absent without peft: checkpoints written before the peft group still resume
        record["peft"] = dataclasses.asdict(rc.peft)
    return json.loads(json.dumps(record))  # the form it takes in trainer_state.json


def data_fingerprint(cfg: DataConfig) -> dict:
    """The data slice of `fingerprint`; data.tsv_quoting only where set (not auto), so checkpoints written
    before the key existed still resume."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if (k, v) != ("tsv_quoting", "auto")}


# --- resume -------------------------------------------------------------------------------------------

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
    elastic.check_world_change(engines.engine_name(acc), saved_world, world, path)
    acc.load_state(path)  # model, optimizer, scheduler, scaler, the RNG of every rank that has a saved state
    state = TrainState(**{**record["state"], "epoch": record["position"]["epoch"],
                          "window": record["position"]["window"], "total_updates": job.total_updates})
    elastic.restore_rng(acc, saved_world, rc.seed, state.updates)
    acc.gradient_accumulation_steps = state.grad_accum_steps
    saved_split = (state.micro_batch_size, state.grad_accum_steps)
    reason = (f"resume on {world} process(es) (checkpoint: {saved_world})" if world != saved_world
              else f"resume with trainer.micro_batch_size={job.micro_batch_size}")
    oom.resplit(state, acc, job.micro_batch_size, reason, grad_accum_steps=job.grad_accum_steps)
    log.info("resumed from %s: update %d, epoch %d, window %d | world size %d -> %d, micro-batch %d -> %d, N %d -> %d "
             "(effective batch %d)", path, state.updates, state.epoch, state.window, saved_world, world,
             saved_split[0], state.micro_batch_size, saved_split[1], state.grad_accum_steps, job.effective_batch_size)
    return state, path


# --- the run ------------------------------------------------------------------------------------------

def build_loop(job: Job, state: TrainState, stop, evaluate_fn, keep_best: bool) -> Loop:
    acc, t = job.accelerator, job.rc.trainer
    telemetry = Telemetry(acc, job.total_updates, state.updates, t.log_every, trackers=bool(acc.log_with))
    checkpointer = checkpoint.Checkpointer(acc, job.rc.output_dir, t.checkpoint_every, t.keep_checkpoints,
                                           fingerprint(job), before_rename=job.hooks.before_checkpoint_rename)
    parts = StepParts(acc, job.model, job.optimizer, job.scheduler, job.task.objective(), job.engine,
                      oom.MemoryGuard(acc, job.model, job.oom_policy, job.hooks), job.hooks, t.max_grad_norm)
    evaluator = Evaluator(evaluate_fn, t.eval_every, t.early_stopping_patience,
                          (lambda: save_model(job)) if keep_best else None, telemetry)
    return Loop(parts, TrainBatches(acc, job.make_loader, len(job.splits["train"])), evaluator, telemetry,
                job.oom_policy, t.max_bad_steps, checkpointer, stop)


def train_only(job: Job, engine: engines.Engine | None = None) -> TrainState:
    """Train `job` from scratch with its engine (or `engine`): no evaluation, checkpoints or trackers."""
    loop, state = standalone(job.accelerator, job.model, job.optimizer, job.scheduler, job.make_loader,
                             len(job.splits["train"]), job.micro_batch_size, job.grad_accum_steps, job.total_updates,
                             max_grad_norm=job.rc.trainer.max_grad_norm, engine=engine or job.engine, hooks=job.hooks,
                             objective=job.task.objective())
    return fit(loop, state)


def run(cfg: DictConfig, *, hooks: Hooks | None = None) -> dict:
    """Train and evaluate as `cfg` says; returns the metrics written to metrics.json."""
    wall_start = time.perf_counter()
    with StopSignals() as stop:  # from the first moment: a signal during set-up or the final save is kept
        job = build(cfg, hooks)
        acc, t = job.accelerator, job.rc.trainer
        average = job.task.f1_average
        state, resumed_from = resume(job)
        keep_best = t.save_best or t.early_stopping_patience is not None
        if acc.log_with:  # the whole config becomes hyperparameters
            acc.init_trackers(run_name(job.rc), config=flat_hparams(cfg))
        loop = build_loop(job, state, stop, lambda: evaluate(job, "validation", average), keep_best)
        job.hooks.after_setup()
        seen_before, eval_before, loop_start = state.examples_seen, state.eval_seconds, time.perf_counter()
        try:
            fit(loop, state)
        except Preempted:  # every rank stops after the same checkpoint: end the process group in order
            teardown.shutdown(acc)
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
    teardown.shutdown(acc)
    log.info("done: %d updates | validation f1 %.4f accuracy %.4f | %.1f samples/s | %.0f s | %s",
             state.optimizer_steps, result["eval"]["f1"], result["eval"]["accuracy"],
             result["train_samples_per_second"], result["wall_seconds"], job.rc.output_dir)
    return result


def evaluate(job: Job, split: str, average: str) -> dict:
    """Collective. Metrics of `split` on every rank, with the predictions in dataset order."""
    preds, refs = metrics.predict(job.model, job.eval_loaders[split], job.accelerator, job.task)
    return {**metrics.score(job.metric, preds, refs, average, job.task.label_names), "predictions": preds,
            "references": refs}


def finish(job: Job, state: TrainState, evaluator: Evaluator, keep_best: bool, average: str) -> tuple[dict, dict]:
    """Collective. model/ settles (the best model reloaded, or the final one saved); `eval` is the score
    of the model in model/, `history` keeps every evaluation (the final model's included)."""
    if keep_best:
        load_saved_model(job)  # model/ already holds the best model: score that one, not the final one
        scored = evaluate(job, "validation", average)
    else:
        save_model(job)
        scored = evaluator.latest  # the final model's: the loop always evaluates after its last update
    test = evaluate(job, "test", average) if "test" in job.eval_loaders else None
    acc, t = job.accelerator, job.rc.trainer
    return {
        "eval": report(scored, average),
        "best": state.best,
        "stopped_early": state.stopped_early,
        "model": "best" if keep_best else "final",
        "test": report(test, average) if test else None,
        "history": state.history,
        "train_losses": state.losses,
        "train_window_examples": state.window_sizes,
        "lr_after_update": state.lrs,
        "optimizer_steps": state.optimizer_steps,
        "updates": state.updates,
        "skipped_updates": state.skipped_updates,
        "grad_norms": state.grad_norms,
        "epochs": state.epoch,
        "world_size": acc.num_processes,
        "micro_batch_size": job.micro_batch_size,
        "grad_accum_steps": job.grad_accum_steps,
        "final_micro_batch_size": state.micro_batch_size,
        "final_grad_accum_steps": state.grad_accum_steps,
        "batch_size_changes": state.batch_size_changes,
        "effective_batch_size": job.effective_batch_size,
        "lr": job.lr,
        "lr_scaling": job.rc.optim.lr_scaling,
        "final_lr": job.scheduler.get_last_lr()[0],
        "mixed_precision": t.mixed_precision,
        "precision": job.precision.record() if job.precision else None,
        "loss_normalisation": t.loss_normalisation,
        "engine": engines.engine_name(acc),
        "sync_each_batch": t.sync_each_batch,
        "train_examples_seen": state.examples_seen,
        "label_names": job.task.label_names,
        "problem_type": job.task.problem_type,
        "class_weights": job.task.describe_weights(),
        "class_weights_setting": job.task.class_weights_setting,
        "multi_label_threshold": job.task.threshold if job.task.multi_label else None,
        "run_name": run_name(job.rc),
        "trainable_parameters": job.trainable_parameters,
        "total_parameters": job.total_parameters,
        "peft": job.rc.peft.name,
        "gradient_checkpointing": job.rc.model.gradient_checkpointing,
    }, scored


def report(scored: dict, average: str) -> dict:
    """The metrics.json entry of one evaluation: F1 (by `average`), macro/micro F1, accuracy, per label."""
    keys = ("f1", "accuracy", "f1_macro", "f1_micro", "per_label")
    return {**{k: scored[k] for k in keys}, "average": average, "num_examples": len(scored["predictions"])}


def run_name(rc: RunConfig) -> str:
    """Trackers' project/experiment name: `run_name`, else the run directory's last two parts
    (`2026-11-25_10-00-00`; in a sweep `10-00-00_3`)."""
    return rc.run_name or "_".join(Path(rc.output_dir).resolve().parts[-2:])


# --- outputs ------------------------------------------------------------------------------------------

ADAPTER_DIR = "adapter"  # model/adapter/: the LoRA adapter (peft's save_pretrained), beside the merged model


def save_model(job: Job) -> None:
    """Collective: rank 0 writes model/ (weights, config with label names, tokenizer) atomically.

    Written into model.tmp/ and swapped in by renames, so model/ is always either absent or complete
    (a crash between the two renames leaves the previous complete model in model.old/)."""
    acc = job.accelerator
    final = os.path.join(job.rc.output_dir, "model")
    tmp, old = f"{final}.tmp", f"{final}.old"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(job.model)
    if models.is_peft_model(unwrapped):
        # LoRA runs on one process or under DDP only (engines.check_supported): every rank holds the whole
        # model, and the main process writes. model/ is the merged model, a plain transformers folder
        # (pipeline() loads it without peft); model/adapter/ the adapter alone (LoRA weights and the head).
        if acc.is_main_process:
            models.merged_copy(unwrapped).save_pretrained(tmp)
            # save_embedding_layers=False: the embeddings are frozen, and "auto" would look the base model up.
            unwrapped.save_pretrained(os.path.join(tmp, ADAPTER_DIR), save_embedding_layers=False)
    else:
        unwrapped.save_pretrained(
            tmp, is_main_process=acc.is_main_process, save_function=acc.save,
            state_dict=acc.get_state_dict(job.model),  # collective under FSDP/DeepSpeed
        )
    if acc.is_main_process:
        job.tokenizer.save_pretrained(tmp)
    acc.wait_for_everyone()  # every rank is done with model.tmp/ before it is renamed
    if acc.is_main_process:
        if os.path.isdir(final):
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def load_saved_model(job: Job) -> None:
    """Load model/ (the best model) into the trained model on every rank, with transformers' own loader
    (single or sharded safetensors, as save_pretrained wrote them). Under LoRA the adapter in model/adapter/
    (LoRA weights and the head) goes back into the trained PeftModel; its frozen base never changed."""
    unwrapped = job.accelerator.unwrap_model(job.model)
    if models.is_peft_model(unwrapped):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        weights = load_peft_weights(os.path.join(job.rc.output_dir, "model", ADAPTER_DIR),
                                    device=str(next(unwrapped.parameters()).device))
        result = set_peft_model_state_dict(unwrapped, weights)
        if result.unexpected_keys:
            raise RuntimeError(f"model/{ADAPTER_DIR}: keys the model does not have: {result.unexpected_keys[:5]}")
        return
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(
        os.path.join(job.rc.output_dir, "model"), dtype=next(job.model.parameters()).dtype)
    job.accelerator.unwrap_model(job.model).load_state_dict(saved.state_dict())


def flat_hparams(cfg: DictConfig) -> dict:
    """The resolved config as flat scalars (`trainer.micro_batch_size`: 32), as trackers want them."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def save_outputs(job: Job, cfg: DictConfig, result: dict, scored: dict) -> None:
    """Rank 0 writes config, metrics.json, the validation predictions of the model in model/ and their plot."""
    acc, output_dir = job.accelerator, job.rc.output_dir
    if acc.is_main_process:
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
        predictions_frame(job, scored["predictions"]).to_csv(
            os.path.join(output_dir, "validation_predictions.csv"), index=False)
        plot = "per_label_f1.png" if job.task.multi_label else "confusion_matrix.png"
        metrics.plot_report(os.path.join(output_dir, plot), job.task, scored["predictions"], scored["references"],
                            result["eval"]["per_label"], f"{run_name(job.rc)}: validation "
                            f"({average_name(job.task)} F1 {result['eval']['f1']:.3f})")
        write_json_atomic(os.path.join(output_dir, "metrics.json"), result)
    acc.wait_for_everyone()


def average_name(task: Task) -> str:
    return f"{task.label_names[1]!r}" if task.f1_average == "binary" else task.f1_average


def predictions_frame(job: Job, predictions) -> pd.DataFrame:
    """Text (and pair), true and predicted label names; a multi-label set as names joined by data.label_separator."""
    names, validation = job.task.label_names, job.splits["validation"]
    if job.task.multi_label:
        sep = job.rc.data.label_separator
        label = [sep.join(names[i] for i in ids) for ids in validation["label"]]
        prediction = [sep.join(names[i] for i in np.flatnonzero(row)) for row in predictions]
    else:
        label, prediction = [names[i] for i in validation["label"]], [names[i] for i in predictions]
    texts = {"text": validation["text"]}
    if "text_pair" in validation.column_names:
        texts["text_pair"] = validation["text_pair"]
    return pd.DataFrame({**texts, "label": label, "prediction": prediction})


def write_json_atomic(path: str, obj) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written metrics.json."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
        if int(os.environ.get("RANK", "0")) == 0:
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


def main(cfg: DictConfig) -> float:
    """Entry point for scripts/train.py: expected failures end with a message and a documented code.

    Returns the objective for Hydra sweepers: the best validation F1 (the final one if not tracked).
    """
    check_multirun()
    try:
        result = run(cfg)
        return (result["best"] or result["eval"])["f1"]
    except Exception as err:
        known = exit_code(err)
        if known is None:
            raise
        code, message = known
        if code != EXIT_PREEMPTED or int(os.environ.get("RANK", "0")) == 0:
            print(message, file=sys.stderr)
        sys.exit(code)
