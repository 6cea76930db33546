"""run(cfg): validate, build everything from its slice of the config, train, write outputs (rank 0)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import datasets
import pandas as pd
import torch
import transformers
from accelerate import (Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs,
                        InitProcessGroupKwargs)
from accelerate.logging import get_logger
from accelerate.utils import GradientAccumulationPlugin, TorchDynamoPlugin, set_seed
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, data, engines, metrics, models, optim
from .accumulation import apply_batchnorm_policy
from .config import RunConfig, batch_plan, check_machine, load_config, scaled_lr
from .errors import ConfigError
from .errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_TRAINING_FAILED, TrainingError, UserError
from .loop import LoopHooks, LoopSettings, LoopState, Preempted, is_out_of_memory, smaller_micro_batch, train

log = get_logger(__name__)


def trackers(log_with) -> list[str] | None:
    names = [log_with] if isinstance(log_with, str) else list(log_with or [])
    names = [n for n in names if n != "none"]
    return names or None


def build_accelerator(rc: RunConfig) -> Accelerator:
    t = rc.trainer
    return Accelerator(
        mixed_precision=t.mixed_precision,
        log_with=trackers(t.log_with),
        # Accelerate's prepared scheduler steps once per process per update unless told otherwise;
        # the loop steps it itself, once per real optimizer update.
        step_scheduler_with_optimizer=False,
        # N is set once the micro-batch is known (build); sync_each_batch exchanges gradients after every
        # micro-batch instead of skipping the all-reduce (DDP) / reduce-scatter (FSDP) inside a window.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_each_batch=t.sync_each_batch),
        # One seeded permutation per epoch, sharded by batch: 1 and 2 processes see the same windows.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=rc.seed),
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s)),
            # No collective in forward passes, so a rank that runs out of memory mid-window can still
            # meet the others at the window's agreement point (loop.Loop.agree_on_memory). Buffers of
            # the supported encoders are constants; BatchNorm statistics stay per rank (rank 0 saved).
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
        project_dir=rc.output_dir,
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
    label_names: list[str]
    settings: LoopSettings
    effective_batch_size: int
    lr: float

    def make_loader(self, micro_batch_size: int):
        t = self.rc.trainer
        loader = data.train_loader(self.encoded["train"], self.tokenizer, micro_batch_size, t.num_workers,
                                   pin_memory=self.accelerator.device.type == "cuda", seed=self.rc.seed,
                                   group_by_length=t.group_by_length)
        return self.accelerator.prepare(loader)


def build(cfg: DictConfig, hooks: LoopHooks | None = None, dtype: torch.dtype | None = None) -> Job:
    """Validate the config and build data, model, optimizer and schedule. Raises UserError on bad input.

    `dtype` casts the model's parameters (scripts/verify_equivalence.py checks the math in float64).
    """
    rc = load_config(cfg)  # every value checked before any work
    check_machine(rc.trainer)
    accelerator = build_accelerator(rc)
    engines.check_launch(accelerator)
    engines.check_supported(accelerator, rc.trainer)
    if not accelerator.is_main_process:  # only the main process prints
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    t, world = rc.trainer, accelerator.num_processes
    if cfg.get("num_processes") not in (None, world):
        raise ConfigError(f"num_processes={cfg.num_processes} but this run has {world} process(es): launch it with "
                          f"accelerate launch --num_processes {cfg.num_processes}, or through hydra/launcher=accelerate")
    set_seed(rc.seed)

    # Data and model. Every rank builds the same tokenizer and the same initial weights.
    splits = data.load_splits(rc.data, rc.seed)
    label_names = splits["train"].features["label"].names
    tokenizer = models.build_tokenizer(rc.model, splits["train"]["text"], rc.data.max_length)
    model = models.build_model(rc.model, label_names, tokenizer)
    if dtype is not None:
        model = model.to(dtype)
    with accelerator.main_process_first():
        cache = os.path.join(datasets.config.HF_DATASETS_CACHE, "dist_gacc_tokenized") if t.cache_tokenized else None
        encoded = data.tokenize(splits, tokenizer, rc.data.max_length, cache_dir=cache)
        metric = metrics.load_metric()

    # Batch arithmetic: micro-batch (probed if auto), then N from the effective batch.
    micro = t.micro_batch_size
    if micro == "auto":
        micro = probe_micro_batch_size(accelerator, model, t.auto_micro_batch_cap, rc.data.max_length,
                                       len(tokenizer), hooks or LoopHooks())
    grad_accum_steps, effective = batch_plan(t, world, micro)
    accelerator.gradient_accumulation_steps = grad_accum_steps
    engine = engines.engine_name(accelerator)
    if engine == "deepspeed":
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

    settings = LoopSettings(micro, grad_accum_steps, total_updates, t.max_grad_norm, t.eval_every,
                            t.log_every, exact=t.loss_normalisation == "exact", max_bad_steps=t.max_bad_steps,
                            fp16=t.mixed_precision == "fp16", patience=t.early_stopping_patience,
                            prescale=engine == "deepspeed", deepspeed=engine == "deepspeed")
    log.info("world size %d | micro-batch %d x accumulation %d x world %d = effective batch %d | engine %s%s",
             world, micro, grad_accum_steps, world, effective, engine,
             " | gradients exchanged every micro-batch (sync_each_batch)" if t.sync_each_batch and world > 1 else "")
    scaling = (f"; {rc.optim.lr_scaling} scaling of {rc.optim.lr:.3g} from reference batch "
               f"{rc.optim.reference_batch_size}" if rc.optim.lr_scaling != "none" else "")
    log.info("lr in effect %.3g%s (schedule %s, warmup %d of %d updates; starts at %.3g) | precision %s | "
             "device %s | train/validation examples %d/%d", lr, scaling, rc.optim.scheduler,
             optim.warmup_updates(rc.optim, total_updates), total_updates, scheduler.get_last_lr()[0],
             t.mixed_precision, accelerator.device, len(splits["train"]), len(splits["validation"]))
    return Job(rc, accelerator, splits, encoded, tokenizer, model, optimizer, scheduler, eval_loaders,
               metric, label_names, settings, effective, lr)


def probe_micro_batch_size(accelerator, model, cap: int, max_length: int, vocab_size: int,
                           hooks: LoopHooks) -> int:
    """The largest micro-batch (from `cap`, dividing down) whose worst case fits on every rank.

    Worst case: every row at max_length tokens, forward and backward. Accelerate's
    find_executable_batch_size retries a whole function per size on one process; here all ranks
    must agree on one size, so each try ends in an all-reduce of the failure flag.
    """
    model.to(accelerator.device).train()
    micro = cap
    while True:
        failed = 0.0
        try:
            if hooks.before_forward is not None:
                hooks.before_forward(micro, 0)
            ids = torch.randint(0, vocab_size, (micro, max_length), device=accelerator.device)
            with accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logits.float().sum().backward()
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            failed = 1.0
        model.zero_grad(set_to_none=True)
        failed = accelerator.reduce(torch.tensor(failed, device=accelerator.device), reduction="sum").item()
        if not failed:
            log.info("trainer.micro_batch_size=auto: %d fits (cap %d)", micro, cap)
            return micro
        if micro == 1:
            raise UserError("trainer.micro_batch_size=auto: even 1 example does not fit in memory")
        micro = smaller_micro_batch(micro)


def fingerprint(job: Job) -> dict:
    """The settings that define the sequence of updates; a resume must not change them silently."""
    rc = job.rc
    record = {
        "effective_batch_size": job.effective_batch_size, "lr": job.lr, "total_updates": job.settings.total_updates,
        "seed": rc.seed, "world_size": job.accelerator.num_processes, "mixed_precision": rc.trainer.mixed_precision,
        "loss_normalisation": rc.trainer.loss_normalisation, "max_grad_norm": rc.trainer.max_grad_norm,
        "optim": dataclasses.asdict(rc.optim), "model": dataclasses.asdict(rc.model),
        "data": dataclasses.asdict(rc.data), "engine": engines.engine_name(job.accelerator),
    }
    return json.loads(json.dumps(record))  # the form it takes in trainer_state.json


class StopSignals:
    """SIGTERM / SIGUSR1 (preemption) set a flag; the loop finishes the update, checkpoints and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __call__(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run(cfg: DictConfig, *, hooks: LoopHooks | None = None) -> dict:
    """Train and evaluate as `cfg` says; returns the metrics written to metrics.json."""
    wall_start = time.perf_counter()
    job = build(cfg, hooks)
    acc, t, rc = job.accelerator, job.rc.trainer, job.rc
    hooks = hooks or LoopHooks()
    average = metrics.resolve_average(t.f1_average, len(job.label_names))
    latest: dict = {}  # predictions of the newest validation pass, for validation_predictions.csv

    def evaluate_split(split: str) -> dict:
        preds, refs = metrics.predict(job.model, job.eval_loaders[split], acc)
        if split == "validation":
            latest["predictions"] = preds
        return metrics.score(job.metric, preds, refs, average)

    # Resume: the newest good checkpoint (auto) or the one named; refuse changed math.
    current = fingerprint(job)
    resumed_from, record = checkpoint.choose(acc, rc.output_dir, rc.resume)
    state = position = None
    if resumed_from is not None:
        checkpoint.check_fingerprint(record["fingerprint"], current, resumed_from, rc.resume_force)
        acc.load_state(resumed_from)  # model, optimizer, scheduler, scaler, every rank's RNG
        state, position = LoopState(**record["state"]), record["position"]
        log.info("resumed from %s: update %d, epoch %d, window %d", resumed_from, state.updates,
                 position["epoch"], position["window"])
    checkpointer = checkpoint.Checkpointer(acc, rc.output_dir, t.checkpoint_every, t.keep_checkpoints, current,
                                           before_rename=hooks.before_checkpoint_rename)
    keep_best = t.save_best or t.early_stopping_patience is not None
    if acc.log_with:  # TensorBoard writes to <run>/tensorboard; the whole config becomes hyperparameters
        acc.init_trackers("tensorboard", config=flat_hparams(cfg))

    loop_start = time.perf_counter()
    seen_before, eval_before = (state.examples_seen, state.eval_seconds) if state else (0, 0.0)
    with StopSignals() as stop:
        state = train(accelerator=acc, model=job.model, optimizer=job.optimizer, scheduler=job.scheduler,
                      make_loader=job.make_loader, train_examples=len(job.splits["train"]),
                      settings=job.settings, evaluate_fn=lambda: evaluate_split("validation"), hooks=hooks,
                      state=state, position=position, checkpointer=checkpointer, stop_requested=stop,
                      on_new_best=(lambda: save_model(job)) if keep_best else None,
                      log_fn=(lambda values, step: acc.log(values, step=step)) if acc.log_with else None)
    train_seconds = time.perf_counter() - loop_start - (state.eval_seconds - eval_before)  # this process only
    final = state.history[-1]  # the loop always evaluates after its last update
    if keep_best:  # model/ already holds the best model; evaluate that one from here on
        load_saved_model(job)
        latest.clear()
    else:
        save_model(job)
    if "predictions" not in latest:  # predictions of the model in model/, for the csv
        evaluate_split("validation")
    test = evaluate_split("test") if "test" in job.eval_loaders else None

    result = {
        "eval": {"f1": final["f1"], "accuracy": final["accuracy"], "average": average,
                 "num_examples": len(latest["predictions"])},
        "best": state.best,
        "stopped_early": state.stopped_early,
        "model": "best" if keep_best else "final",
        "test": test,
        "history": state.history,
        "train_losses": state.losses,
        "lr_after_update": state.lrs,
        "optimizer_steps": state.optimizer_steps,
        "updates": state.updates,
        "skipped_updates": state.skipped_updates,
        "grad_norms": state.grad_norms,
        "resumed_from": resumed_from,
        "epochs": state.epoch,
        "world_size": acc.num_processes,
        "micro_batch_size": job.settings.micro_batch_size,
        "grad_accum_steps": job.settings.grad_accum_steps,
        "final_micro_batch_size": state.micro_batch_size,
        "final_grad_accum_steps": state.grad_accum_steps,
        "batch_size_changes": state.batch_size_changes,
        "effective_batch_size": job.effective_batch_size,
        "lr": job.lr,
        "lr_scaling": job.rc.optim.lr_scaling,
        "final_lr": job.scheduler.get_last_lr()[0],
        "mixed_precision": t.mixed_precision,
        "loss_normalisation": t.loss_normalisation,
        "engine": engines.engine_name(acc),
        "sync_each_batch": t.sync_each_batch,
        "train_examples_seen": state.examples_seen,
        "train_samples_per_second": (state.examples_seen - seen_before) / max(train_seconds, 1e-9),
        "wall_seconds": time.perf_counter() - wall_start,
        "label_names": job.label_names,
    }
    save_outputs(job, cfg, result, latest["predictions"])  # ends with a barrier
    if acc.num_processes > 1:
        # torch 2.13 + gloo: the thread that completes a barrier still needs the GIL to free its
        # tensors. If the main thread destroys the process group first (with the GIL held, when the
        # DDP model is released or end_training() runs), each waits for the other forever: seen once
        # in a fresh-clone test run as a finished 2-rank run that never exited (gdb: ~ProcessGroupGloo
        # joining a runloop thread blocked in take_gil). Releasing the GIL briefly lets those threads
        # finish first.
        time.sleep(0.2)
    if acc.log_with:
        acc.end_training()
    log.info("done: %d updates | validation f1 %.4f accuracy %.4f | %.1f samples/s | %.0f s | %s",
             state.optimizer_steps, final["f1"], final["accuracy"], result["train_samples_per_second"],
             result["wall_seconds"], job.rc.output_dir)
    return result


def save_model(job: Job) -> None:
    """Collective: rank 0 writes model/ (weights, config with label names, tokenizer)."""
    acc = job.accelerator
    model_dir = os.path.join(job.rc.output_dir, "model")
    acc.wait_for_everyone()
    acc.unwrap_model(job.model).save_pretrained(
        model_dir, is_main_process=acc.is_main_process, save_function=acc.save,
        state_dict=acc.get_state_dict(job.model),
    )
    if acc.is_main_process:
        job.tokenizer.save_pretrained(model_dir)
    acc.wait_for_everyone()


def load_saved_model(job: Job) -> None:
    """Load model/ (the best model) back into the trained model on every rank."""
    from safetensors.torch import load_file

    path = os.path.join(job.rc.output_dir, "model", "model.safetensors")
    job.accelerator.unwrap_model(job.model).load_state_dict(load_file(path))


def flat_hparams(cfg: DictConfig) -> dict:
    """The resolved config as flat scalars (`trainer.micro_batch_size`: 32), as trackers want them."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            value = node if isinstance(node, (int, float, str, bool)) else str(node)
            flat[prefix[:-1]] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def save_outputs(job: Job, cfg: DictConfig, result: dict, predictions) -> None:
    """Rank 0 writes config, metrics.json and predictions (model/ is already written)."""
    acc, output_dir = job.accelerator, job.rc.output_dir
    if acc.is_main_process:
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
        names, validation = job.label_names, job.splits["validation"]
        pd.DataFrame({
            "text": validation["text"],
            "label": [names[i] for i in validation["label"]],
            "prediction": [names[i] for i in predictions],
        }).to_csv(os.path.join(output_dir, "validation_predictions.csv"), index=False)
        write_json_atomic(os.path.join(output_dir, "metrics.json"), result)
    acc.wait_for_everyone()


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
                  "hydra/launcher=accelerate hydra.launcher.num_processes=N [hydra.launcher.cpu=true] ...",
                  file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    AcceleratorState._reset_state(reset_partial_state=True)


def write_json_atomic(path: str, obj) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written metrics.json."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(cfg: DictConfig) -> float:
    """Entry point for scripts/train.py: expected failures end with a message and a documented code.

    Returns the objective for Hydra sweepers: the best validation F1 (the final one if not tracked).
    """
    check_multirun()
    try:
        result = run(cfg)
        return (result["best"] or result["eval"])["f1"]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_TRAINING_FAILED)
    except Preempted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopped by a signal after a finished update; checkpoint {stop.path}. "
                  "Rerun with resume=auto (same hydra.run.dir) to continue.", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
