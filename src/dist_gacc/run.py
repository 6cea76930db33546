"""run(cfg): validate, build everything from its slice of the config, train, write outputs (rank 0)."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import datasets
import pandas as pd
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from . import data, metrics, models, optim
from .config import RunConfig, check_machine, load_config
from .errors import UserError
from .loop import LoopSettings, train, updates_per_epoch

log = get_logger(__name__)


def build_accelerator(rc: RunConfig) -> Accelerator:
    t = rc.trainer
    return Accelerator(
        gradient_accumulation_steps=t.grad_accum_steps,
        mixed_precision=t.mixed_precision,
        # Accelerate's prepared scheduler steps once per process per update unless told otherwise;
        # the loop steps it itself, once per real optimizer update.
        step_scheduler_with_optimizer=False,
        # One seeded permutation per epoch, sharded by batch: 1 and 2 processes see the same windows.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=rc.seed),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))],
        project_dir=rc.output_dir,
    )


def run(cfg: DictConfig, *, after_backward=None) -> dict:
    """Train and evaluate as `cfg` says; returns the metrics written to metrics.json."""
    wall_start = time.perf_counter()
    rc = load_config(cfg)  # every value checked before any work
    check_machine(rc.trainer)
    accelerator = build_accelerator(rc)
    if not accelerator.is_main_process:  # only the main process prints
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    t = rc.trainer
    set_seed(rc.seed)

    # Data and model. Every rank builds the same tokenizer and the same initial weights.
    splits = data.load_splits(rc.data, rc.seed)
    label_names = splits["train"].features["label"].names
    tokenizer = models.build_tokenizer(rc.model, splits["train"]["text"], rc.data.max_length)
    model = models.build_model(rc.model, label_names, tokenizer)
    with accelerator.main_process_first():
        encoded = data.tokenize(splits, tokenizer, rc.data.max_length)
        metric = metrics.load_metric()
    loaders = data.build_loaders(encoded, tokenizer, t.micro_batch_size, t.eval_batch_size,
                                 t.num_workers, pin_memory=accelerator.device.type == "cuda")

    # Schedule sized in optimizer updates, from the per-rank batch count after sharding.
    train_loader = accelerator.prepare(loaders["train"])
    total_updates = t.max_steps or t.epochs * updates_per_epoch(len(train_loader), t.grad_accum_steps)
    lr = rc.optim.lr
    optimizer = optim.build_optimizer(model, rc.optim, lr, fused=accelerator.device.type == "cuda")
    scheduler = optim.build_scheduler(optimizer, rc.optim, total_updates)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    eval_loaders = {k: accelerator.prepare(v) for k, v in loaders.items() if k != "train"}

    world = accelerator.num_processes
    effective = t.micro_batch_size * t.grad_accum_steps * world
    log.info("world size %d | micro-batch %d x accumulation %d x world %d = effective batch %d",
             world, t.micro_batch_size, t.grad_accum_steps, world, effective, main_process_only=True)
    log.info("lr in effect %.3g (schedule %s, warmup %d of %d updates; starts at %.3g) | precision %s | "
             "device %s | train/validation examples %d/%d", lr, rc.optim.scheduler,
             optim.warmup_updates(rc.optim, total_updates), total_updates, scheduler.get_last_lr()[0],
             t.mixed_precision, accelerator.device, len(splits["train"]), len(splits["validation"]))

    average = metrics.resolve_average(t.f1_average, len(label_names))
    latest: dict = {}  # predictions of the newest validation pass, for validation_predictions.csv

    def evaluate_split(split: str) -> dict:
        preds, refs = metrics.predict(model, eval_loaders[split], accelerator)
        if split == "validation":
            latest["predictions"] = preds
        return metrics.score(metric, preds, refs, average)

    loop_start = time.perf_counter()
    state = train(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        train_loader=train_loader, train_examples=len(splits["train"]),
        settings=LoopSettings(t.micro_batch_size, t.grad_accum_steps, total_updates, t.max_grad_norm,
                              t.eval_every, t.log_every),
        evaluate_fn=lambda: evaluate_split("validation"), after_backward=after_backward,
    )
    train_seconds = time.perf_counter() - loop_start - state.eval_seconds
    final = state.history[-1]  # the loop always evaluates after its last update
    test = evaluate_split("test") if "test" in eval_loaders else None

    result = {
        "eval": {"f1": final["f1"], "accuracy": final["accuracy"], "average": average,
                 "num_examples": len(latest["predictions"])},
        "test": test,
        "history": state.history,
        "train_losses": state.losses,
        "lr_after_update": state.lrs,
        "optimizer_steps": state.optimizer_steps,
        "epochs": state.epoch,
        "world_size": world,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "effective_batch_size": effective,
        "lr": lr,
        "final_lr": scheduler.get_last_lr()[0],
        "mixed_precision": t.mixed_precision,
        "train_examples_seen": state.examples_seen,
        "train_samples_per_second": state.examples_seen / max(train_seconds, 1e-9),
        "wall_seconds": time.perf_counter() - wall_start,
        "label_names": label_names,
    }
    save_outputs(accelerator, rc.output_dir, cfg, result, model, tokenizer, splits["validation"],
                 latest["predictions"])
    log.info("done: %d updates | validation f1 %.4f accuracy %.4f | %.1f samples/s | %.0f s | %s",
             state.optimizer_steps, final["f1"], final["accuracy"], result["train_samples_per_second"],
             result["wall_seconds"], rc.output_dir)
    return result


def save_outputs(accelerator, output_dir, cfg, result, model, tokenizer, validation, predictions) -> None:
    """Rank 0 writes config, metrics.json, predictions and model/; the others wait."""
    accelerator.wait_for_everyone()
    model_dir = os.path.join(output_dir, "model")
    accelerator.unwrap_model(model).save_pretrained(
        model_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(model_dir)
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
        label_names = result["label_names"]
        pd.DataFrame({
            "text": validation["text"],
            "label": [label_names[i] for i in validation["label"]],
            "prediction": [label_names[i] for i in predictions],
        }).to_csv(os.path.join(output_dir, "validation_predictions.csv"), index=False)
        write_json_atomic(os.path.join(output_dir, "metrics.json"), result)
    accelerator.wait_for_everyone()


def write_json_atomic(path: str, obj) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written metrics.json."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(cfg: DictConfig) -> float:
    """Entry point for scripts/train.py: bad input ends with its message and exit code 2."""
    try:
        return run(cfg)["eval"]["f1"]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
