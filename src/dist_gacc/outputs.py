"""After the loop: model/ settles (the best model reloaded, or the final one saved), the test split is
scored, and rank 0 writes metrics.json, config.yaml, the validation predictions and their plot.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import transformers
from accelerate.logging import get_logger
from omegaconf import DictConfig, OmegaConf

from . import baseline, card, checkpoint, engines, metrics, models, tasks
from .build import Job
from .config import REPORTED_METRICS, RunConfig
from .evaluation import Evaluator
from .preemption import StopRequested, StopSignals
from .state import TrainState
from .tasks import Task

log = get_logger(__name__)


def evaluate(job: Job, split: str, average: str) -> dict:
    """Collective. Metrics of `split` on every rank, with the predictions in dataset order (multi-label: and
    each label's probability, `probabilities`)."""
    scores, refs = metrics.predict(job.model, job.eval_loaders[split], job.accelerator, job.task, job.eval_forward)
    out = rescore(job, scores, refs, average)
    if job.task.multi_label:
        out["probabilities"] = scores
    return out


def rescore(job: Job, scores, refs, average: str, thresholds=None) -> dict:
    """Metrics of gathered scores (multi-label: thresholded at `thresholds`, one per label; None: the task's)."""
    preds = job.task.decide(scores, thresholds)
    return {**metrics.score(job.metric, preds, refs, average, job.task.label_names), "predictions": preds,
            "references": refs}


THRESHOLDS_FILE = "thresholds.json"  # model/thresholds.json: tuned multi-label thresholds by label name


def tune(job: Job, validation: dict, test: dict | None, average: str) -> dict:
    """Collective (every rank holds the gathered scores and computes the same). Per-label thresholds tuned on the
    validation probabilities of the model in model/ (tasks.tune_thresholds), written to model/thresholds.json
    (scripts/predict.py applies them), and the validation and test reports at those thresholds."""
    names = job.task.label_names
    thresholds = tasks.tune_thresholds(validation["probabilities"], validation["references"], job.task.threshold)
    by_name = dict(zip(names, thresholds))
    if job.accelerator.is_main_process:
        write_json_atomic(os.path.join(job.rc.output_dir, "model", THRESHOLDS_FILE), by_name)
    job.accelerator.wait_for_everyone()
    log.info("multi-label thresholds tuned on validation (each label's F1-maximising threshold): %s",
             ", ".join(f"{name} {value:.4f}" for name, value in by_name.items()))

    def again(scored: dict) -> dict:
        return report(rescore(job, scored["probabilities"], scored["references"], average, thresholds), job.task)

    return {"thresholds": by_name, "validation": again(validation), "test": again(test) if test else None}


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
    tuned = tune(job, scored, test, average) if job.task.tune_thresholds else None
    acc, t = job.accelerator, job.rc.trainer
    return {
        "eval": report(scored, job.task),
        "metric": job.task.metric,
        "best": state.best,
        "stopped_early": state.stopped_early,
        "model": "best" if keep_best else "final",
        "test": report(test, job.task) if test else None,
        "tuned_thresholds": tuned,
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
        "engine": job.engine_state["name"],  # read after prepare (engines.engine_record)
        "engine_state": job.engine_state,
        "packing": job.packing.record() if job.packing is not None else None,
        "sync_each_batch": t.sync_each_batch,
        "train_examples_seen": state.examples_seen,
        "label_names": job.task.label_names,
        "problem_type": job.task.problem_type,
        "class_weights": job.task.describe_weights(),
        "class_weights_setting": job.task.class_weights_setting,
        "multi_label_threshold": ("tune" if job.task.tune_thresholds else job.task.threshold)
        if job.task.multi_label else None,
        "run_name": run_name(job.rc),
        "trainable_parameters": job.trainable_parameters,
        "total_parameters": job.total_parameters,
        "peft": job.rc.peft.name,
        "gradient_checkpointing": job.rc.model.gradient_checkpointing,
    }, scored


def report(scored: dict, task: Task) -> dict:
    """The metrics.json entry of one evaluation: F1 (by the task's average), macro/micro F1, accuracy, per label;
    regression: pearson, spearman, mse."""
    if task.regression:
        return {**{k: scored[k] for k in REPORTED_METRICS["regression"]}, "num_examples": len(scored["predictions"])}
    keys = ("f1", "accuracy", "f1_macro", "f1_micro", "per_label")
    return {**{k: scored[k] for k in keys}, "average": task.f1_average, "num_examples": len(scored["predictions"])}


def run_name(rc: RunConfig) -> str:
    """Trackers' project/experiment name: `run_name`, else the run directory's last two parts
    (`2026-11-25_10-00-00`; in a sweep `10-00-00_3`)."""
    return rc.run_name or "_".join(Path(rc.output_dir).resolve().parts[-2:])


ADAPTER_DIR = "adapter"  # model/adapter/: the LoRA adapter (peft's save_pretrained), beside the merged model


def save_model(job: Job) -> None:
    """Collective: rank 0 writes model/ (weights, config with label names, tokenizer) atomically.

    Written into model.tmp/ and swapped in by renames, so model/ is always either absent or complete
    (a crash between the two renames leaves the previous complete model in model.old/)."""
    acc = job.accelerator
    final = os.path.join(job.rc.output_dir, "model")
    tmp = f"{final}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(job.model)
    if models.is_peft_model(unwrapped):
        # model/ is the merged model, a plain transformers folder (pipeline() loads it without peft); model/adapter/
        # the adapter alone (LoRA weights and the head). Under FSDP the shards are gathered into a whole copy on
        # rank 0 (collective); elsewhere every rank holds the whole model (DeepSpeed ZeRO-1/2 too).
        whole = whole_peft_model(job)
        if acc.is_main_process:
            models.merged_copy(whole).save_pretrained(tmp)
            # save_embedding_layers=False: the embeddings are frozen, and "auto" would look the base model up.
            whole.save_pretrained(os.path.join(tmp, ADAPTER_DIR), save_embedding_layers=False)
    else:
        unwrapped.save_pretrained(
            tmp, is_main_process=acc.is_main_process, save_function=acc.save,
            state_dict=acc.get_state_dict(job.model),  # collective under FSDP/DeepSpeed
        )
    if acc.is_main_process:
        job.tokenizer.save_pretrained(tmp)
    acc.wait_for_everyone()  # every rank is done with model.tmp/ before it is renamed
    if acc.is_main_process:
        checkpoint.replace_folder(tmp, final)
    acc.wait_for_everyone()


def whole_peft_model(job: Job):
    """Collective under FSDP. The trained PeftModel with whole parameters on the main process (None elsewhere
    under FSDP): FSDP2 can neither deepcopy nor merge sharded parameters on one rank, so its full state dict
    (Accelerate's get_state_dict gathers it on rank 0) goes into an unsharded CPU copy (models.whole_peft_copy)."""
    acc = job.accelerator
    unwrapped = acc.unwrap_model(job.model)
    if engines.engine_name(acc) != "fsdp":
        return unwrapped
    full = acc.get_state_dict(job.model)
    return models.whole_peft_copy(unwrapped, full) if acc.is_main_process else None


def load_saved_model(job: Job) -> None:
    """Load model/ (the best model) into the trained model on every rank, with transformers' own loader
    (single or sharded safetensors, as save_pretrained wrote them). Under LoRA the adapter in model/adapter/
    (LoRA weights and the head) goes back into the trained PeftModel; its frozen base never changed."""
    unwrapped = job.accelerator.unwrap_model(job.model)
    fsdp = engines.engine_name(job.accelerator) == "fsdp"
    if models.is_peft_model(unwrapped):
        # under FSDP: into rank 0's whole copy, whose full state dict then goes back into the shards
        target = whole_peft_model(job) if fsdp else unwrapped
        if target is not None:
            load_adapter(job, target)
        if fsdp:
            load_full_state_dict_fsdp(job, target.state_dict() if target is not None else {})
        return
    if fsdp:
        load_full_state_dict_fsdp(job, read_saved_model(job).state_dict() if job.accelerator.is_main_process else {})
        return
    unwrapped.load_state_dict(read_saved_model(job).state_dict())


def load_adapter(job: Job, peft_model) -> None:
    """model/adapter/ (LoRA weights and the head) into `peft_model`; its frozen base never changed."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(os.path.join(job.rc.output_dir, "model", ADAPTER_DIR),
                                device=str(next(peft_model.parameters()).device))
    result = set_peft_model_state_dict(peft_model, weights)
    if result.unexpected_keys:
        raise RuntimeError(f"model/{ADAPTER_DIR}: keys the model does not have: {result.unexpected_keys[:5]}")


def read_saved_model(job: Job):
    """model/ as a transformers model on the CPU, in the trained parameters' dtype."""
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        os.path.join(job.rc.output_dir, "model"), dtype=next(job.model.parameters()).dtype)


def load_full_state_dict_fsdp(job: Job, full: dict) -> None:
    """Collective. FSDP2: `full` is the whole model's state dict on rank 0 (empty elsewhere); torch's
    set_model_state_dict broadcasts each tensor and keeps this rank's shard of it (strict: every key of the
    sharded model must be there). The inverse of the call Accelerate's get_state_dict makes when it gathers.

    Resharded first: after an evaluation's forward (no backward) FSDP2 leaves the root module's parameters
    (embeddings, classifier) unsharded, plain tensors, and loading the broadcast DTensors into them fails
    ("got mixed torch.Tensor and DTensor", measured with torch 2.13)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    for module in job.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    set_model_state_dict(job.model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


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
        predictions_frame(job, scored["predictions"], scored.get("probabilities")).to_csv(
            os.path.join(output_dir, "validation_predictions.csv"), index=False)
        task = job.task
        plot = "predictions.png" if task.regression else "per_label_f1.png" if task.multi_label else \
            "confusion_matrix.png"
        figure = f"{task.metric} {result['eval'][task.metric]:.3f}" if task.regression or task.metric != "f1" else \
            f"{average_name(task)} F1 {result['eval']['f1']:.3f}"
        metrics.plot_report(os.path.join(output_dir, plot), task, scored["predictions"], scored["references"],
                            result["eval"].get("per_label"), f"{run_name(job.rc)}: validation ({figure})")
        write_json_atomic(os.path.join(output_dir, "metrics.json"), result)
    acc.wait_for_everyone()


def average_name(task: Task) -> str:
    return f"{task.label_names[1]!r}" if task.f1_average == "binary" else task.f1_average


def predictions_frame(job: Job, predictions, probabilities=None) -> pd.DataFrame:
    """Text (and pair), true and predicted label names; a multi-label set as names joined by data.label_separator,
    then each label's probability (`probability_<name>`, float64 of the float32 sigmoid: the exact values thresholds
    are tuned on); regression: the true and predicted values."""
    names, validation = job.task.label_names, job.splits["validation"]
    scores = {}
    if job.task.regression:
        label, prediction = list(validation["label"]), np.asarray(predictions, dtype=np.float64)
    elif job.task.multi_label:
        sep = job.rc.data.label_separator
        label = [sep.join(names[i] for i in ids) for ids in validation["label"]]
        prediction = [sep.join(names[i] for i in np.flatnonzero(row)) for row in predictions]
        if probabilities is not None:
            scores = {f"probability_{name}": np.asarray(probabilities[:, i], dtype=np.float64)
                      for i, name in enumerate(names)}
    else:
        label, prediction = [names[i] for i in validation["label"]], [names[i] for i in predictions]
    texts = {"text": validation["text"]}
    if "text_pair" in validation.column_names:
        texts["text_pair"] = validation["text_pair"]
    return pd.DataFrame({**texts, "label": label, "prediction": prediction, **scores})


def write_json_atomic(path: str, obj) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written metrics.json."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def add_baseline(job: Job, result: dict, stop: StopSignals) -> None:
    """Main process only, after the process group has ended (no rank waits on it): fit the TF-IDF baseline on
    the run's training split (baseline.py), score it on the same validation/test splits with the same metric
    code, add `baseline` to `result` and rewrite metrics.json; warn when the fine-tuned model does not beat it.

    A baseline that cannot be fitted (scikit-learn refuses the texts: an empty vocabulary, say) is recorded
    with its error and warned about; it never fails a finished run. Nor does a stop signal: one that arrived
    after the last update, or arrives during the fit, skips the baseline (recorded and warned about)."""
    t, train = job.rc.trainer, job.splits["train"]
    if not baseline.wanted(t.baseline, len(train)):
        why = ("trainer.baseline=false" if t.baseline is False else
               f"the training split has {len(train)} rows, over {baseline.AUTO_MAX_TRAIN_ROWS} "
               "(trainer.baseline=auto; true fits it anyway)")
        result["baseline"] = {"skipped": why}
    else:
        try:
            with stop.interrupting():
                log.info("baseline: fitting TF-IDF + a linear model on %d training rows (a stop signal skips it)",
                         len(train))
                fitted = baseline.fit_and_predict(job.splits, job.task.problem_type, len(job.task.label_names),
                                                  job.task.class_weights is not None, job.rc.seed,
                                                  job.task.threshold)
        except (ValueError, MemoryError) as err:
            result["baseline"] = {"error": f"{type(err).__name__}: {err}"}
            log.warning("the TF-IDF baseline could not be fitted: %s", err)
        except StopRequested as stopped:
            result["baseline"] = {"skipped": f"a stop signal ({stopped.name}) arrived after training; the fit "
                                             "was abandoned so that the run ends promptly"}
            log.warning("%s after training: the TF-IDF baseline is skipped; metrics.json and the model card are "
                        "written without it", stopped.name)
        else:
            record_baseline(job, result, fitted)
    write_json_atomic(os.path.join(job.rc.output_dir, "metrics.json"), result)


def record_baseline(job: Job, result: dict, fitted: dict) -> None:
    """Score the baseline's predictions with the run's own metric module and report (F1/accuracy, or pearson,
    spearman, mse for regression), compare on the run's trainer.metric (lower is better for mse), log, warn."""
    task, metric = job.task, job.task.metric
    scores = {split: report({**metrics.score(job.metric, preds, fitted["references"][split], task.f1_average,
                                             None if task.regression else task.label_names),
                             "predictions": preds}, task)
              for split, preds in fitted["predictions"].items()}
    model_scores = {"validation": result["eval"], "test": result.get("test")}
    gaps = baseline.gaps(model_scores, scores, metric)
    result["baseline"] = {**scores, "settings": fitted["settings"], "seconds": fitted["seconds"], "metric": metric,
                          "model_minus_baseline": gaps,
                          "beaten": all(baseline.beats(g, metric) for g in gaps.values())}
    log.info("baseline (%s, %s): validation %s %.4f%s | %.1f s, not counted in training throughput",
             fitted["settings"]["features"], fitted["settings"]["model"], metric, scores["validation"][metric],
             f" test {metric} {scores['test'][metric]:.4f}" if "test" in scores else "", fitted["seconds"])
    warning = baseline.not_beaten(model_scores, scores, metric)
    if warning:
        log.warning(warning)


def write_model_card(job: Job, result: dict) -> None:
    """Main process: model/README.md from the run's record (card.py)."""
    card.write_card(os.path.join(job.rc.output_dir, "model", "README.md"), result, job.rc,
                    {name: len(split) for name, split in job.splits.items()}, card.hydra_overrides(job.rc.output_dir),
                    job.accelerator.device.type)
