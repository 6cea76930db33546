"""build(cfg) -> Job: every value checked, then the Accelerator, data, model, optimizer and schedule, each
from its own slice of the config; and the fingerprint a resume must match.

    build ─┬─ load_config / check_machine     typed slices, every value checked before any work
           ├─ choose_precision                precision.resolve on the main process, broadcast   collective
           ├─ build_accelerator               devices, DDP/FSDP/DeepSpeed, precision, trackers
           ├─ engines.check_launch/_supported launches and settings an engine cannot honour: refused
           ├─ build_data_and_model            splits, task, tokenizer, model, memory levers, tokenized splits
           ├─ batch plan, optimizer, schedule accelerator.prepare
           └─ engines.build_engine            the update variant
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import (GradientAccumulationPlugin, ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list,
                              set_seed)
from omegaconf import DictConfig

from . import checkpoint, data, engines, metrics, models, oom, optim, precision
from . import packing as packing_
from .batchnorm import apply_batchnorm_policy
from .config import DataConfig, RunConfig, batch_plan, check_machine, load_config, scaled_lr
from .errors import ConfigError, UserError
from .loop import Hooks
from .tasks import Task, build_task

log = get_logger(__name__)


def trackers(log_with) -> list[str] | None:
    names = [log_with] if isinstance(log_with, str) else list(log_with or [])
    names = [n for n in names if n != "none"]
    return names or None


def choose_precision(rc: RunConfig) -> precision.PrecisionChoice:
    """trainer.mixed_precision resolved for this machine (`auto`: measured; precision.py). The process group
    starts here, before the Accelerator that needs the answer: the main process decides (it alone may probe
    and write the probe's cache) and every rank takes its answer. A resume under `auto` keeps the precision
    the checkpoint trained in."""
    # The same arguments AcceleratorState would pass; the Accelerator then reuses this PartialState. Without a
    # GPU, DeepSpeed and FSDP need a gloo group set up here (engines.process_group_setup).
    state = engines.start_process_group(rc.trainer.dist_timeout_s)
    choice = [None]
    if state.is_main_process:
        saved = checkpoint_precision(rc) if rc.trainer.mixed_precision == "auto" else None
        choice[0] = (precision.kept_on_resume(saved) if saved else
                     precision.resolve(rc.trainer.mixed_precision, state.device.type))
    if state.num_processes > 1:
        broadcast_object_list(choice, from_process=0)  # collective: one small object, once per run
    return choice[0]


def checkpoint_precision(rc: RunConfig) -> str | None:
    """The precision the checkpoint this run resumes from trained in (None: a fresh run, or no usable
    checkpoint -- resume.resume then says why)."""
    if rc.resume is None:
        return None
    try:
        found = checkpoint.choose_on_main(rc.output_dir, rc.resume)
    except UserError:
        return None
    return found[1]["fingerprint"].get("mixed_precision") if found else None


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
            # as choose_precision's, which started the group (the first initialisation fixes it)
            engines.process_group_kwargs(t.dist_timeout_s, engines.process_group_setup()[1]),
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
    engine_state: dict | None = None  # the engine that runs, read after prepare (engines.engine_record)
    precision: precision.PrecisionChoice | None = None   # requested/resolved/reason (auto: measured)
    eval_forward: oom.EvalForward | None = None          # evaluation logits, sliced on out of memory (None: plain)
    packing: packing_.Packing | None = None              # trainer.packing resolved: the packed collator, or off

    @property
    def keep_best(self) -> bool:
        """model/ holds the best model by validation F1 (save_best, implied by early stopping)."""
        return self.rc.trainer.save_best or self.rc.trainer.early_stopping_patience is not None

    def order_weights(self):
        """Under DeepSpeed with class weights: epoch -> the class weight at each position of the epoch's order
        (windows.TrainBatches: a window's sum of weights, known before its first forward pass, so DeepSpeed's
        pre-scale can divide by it; DeepSpeed steps inside the window's last backward). Else None: the
        pre-scaled engines divide by the count, the rescaled one by the weights all-reduced after backward."""
        if self.engine.name != "deepspeed" or not self.task.weighted_normaliser:
            return None
        import numpy as np

        train, t = self.encoded["train"], self.rc.trainer
        example_weights = np.asarray(self.task.class_weights, dtype=np.float64)[np.asarray(train["labels"])]
        return lambda epoch: example_weights[data.epoch_order(train, self.rc.seed, epoch, t.group_by_length,
                                                              self.effective_batch_size)]

    def make_loader(self, micro_batch_size: int):
        t = self.rc.trainer
        loader = data.train_loader(self.encoded["train"], self.tokenizer, micro_batch_size, t.num_workers,
                                   pin_memory=self.accelerator.device.type == "cuda", seed=self.rc.seed,
                                   group_by_length=t.group_by_length, group_size=self.effective_batch_size,
                                   collate=self.collate)
        return self.accelerator.prepare(loader)

    @property
    def collate(self):
        """The batches' collator: packed (trainer.packing resolved on), else None (padded per batch)."""
        return self.packing.collator if self.packing is not None and self.packing.on else None


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
    engines.check_supported(accelerator, rc.trainer)
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
    splits, tokenizer, model, encoded, metric, task, packing = build_data_and_model(rc, accelerator, dtype)
    trainable_parameters, total_parameters = models.parameter_counts(model)  # before prepare (FSDP shards)

    # Batch arithmetic: micro-batch (probed if auto), then N from the effective batch.
    micro = t.micro_batch_size
    if micro == "auto":
        micro = oom.probe_micro_batch_size(accelerator, model, t.auto_micro_batch_cap, rc.data.max_length,
                                           len(tokenizer), hooks, packing.collator)
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
    if engine_name == "fsdp":
        engines.configure_fsdp(accelerator)  # reduce in fp32 under bf16/fp16
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if engine_name == "fsdp":
        log.info("FSDP: %d parameter tensors sharded over %d ranks; mixed precision policy %s",
                 engines.check_sharded(accelerator, model), world, accelerator.state.fsdp_plugin.mixed_precision_policy)
    engine_state = engines.engine_record(accelerator, model)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in data.eval_loaders(
        encoded, tokenizer, t.eval_batch_size, t.num_workers, accelerator.device.type == "cuda", rc.seed,
        collate=packing.collator).items()}
    engine = engines.build_engine(engine_name, t.loss_normalisation, fp16=t.mixed_precision == "fp16",
                                  weighted=task.weighted_normaliser)
    job = Job(rc, accelerator, splits, encoded, tokenizer, model, optimizer, scheduler, eval_loaders, metric, task,
              micro, grad_accum_steps, effective, total_updates, lr, engine, oom_policy, hooks,
              trainable_parameters, total_parameters, engine_state, choice,
              oom.EvalForward(oom_policy, t.eval_batch_size, packing.collator), packing)
    log_plan(job)
    return job


def build_data_and_model(rc: RunConfig, accelerator, dtype):
    """Splits, tokenizer, model, tokenized splits, metric, task. Every rank builds the same tokenizer and the
    same initial weights; the main process tokenizes first (and fills the cache), the others load it."""
    splits = data.load_splits(rc.data, rc.seed)
    train = splits["train"]
    regression = data.is_regression(train)
    task = build_task(rc.trainer, [data.score_name(rc.data)] if regression else data.label_names(train),
                      data.is_multi_label(train), train["label"], regression)
    tokenizer = models.build_tokenizer(rc.model, data.train_texts(train), rc.data.max_length)
    model = models.build_model(rc.model, task.label_names, tokenizer, task.problem_type)
    models.check_max_length(model, rc.data.max_length)  # before tokenizing: a longer row would fail mid-run
    hf_model = model
    if rc.trainer.packing is not False:
        packing_.enable(model)  # on the transformers model itself, before LoRA wraps it (an unknown one: unchanged)
    # LoRA and gradient checkpointing, before accelerator.prepare; the optimizer then keeps the
    # parameters that require grad (LoRA: the adapters and the classification head).
    model = models.apply_memory_levers(model, rc.model, rc.peft)
    if dtype is not None:
        model = model.to(dtype)
    with accelerator.main_process_first():
        cache = (os.path.join(datasets.config.HF_DATASETS_CACHE, "dist_gacc_tokenized")
                 if rc.trainer.cache_tokenized else None)
        encoded = data.tokenize(splits, tokenizer, rc.data.max_length, cache_dir=cache, num_proc=rc.data.num_proc)
        metric = metrics.load_metric(task.multi_label, task.regression)
    packing = choose_packing(rc, accelerator, hf_model, model, tokenizer, encoded["train"])
    return splits, tokenizer, model, encoded, metric, task, packing


def choose_packing(rc: RunConfig, accelerator, hf_model, model, tokenizer, train) -> packing_.Packing:
    """trainer.packing, decided before prepare on the whole model: every rank holds the same weights and the same
    first training texts, so every rank reaches the same verdict without a collective."""
    cuda = accelerator.device.type == "cuda"
    features = [train[i] for i in range(min(packing_.CHECK_TEXTS, len(train)))]
    return packing_.choose(rc.trainer.packing, rc.trainer.packing_max_tokens, hf_model, model, tokenizer,
                           data.collator(tokenizer, cuda), features, 8 if cuda else None)


def log_plan(job: Job) -> None:
    rc, t, world = job.rc, job.rc.trainer, job.accelerator.num_processes
    log.info("world size %d | micro-batch %d x accumulation %d x world %d = effective batch %d | engine %s%s",
             world, job.micro_batch_size, job.grad_accum_steps, world, job.effective_batch_size,
             engines.describe_engine(job.engine_state),
             " | gradients exchanged every micro-batch (sync_each_batch)" if t.sync_each_batch and world > 1 else "")
    scaling = (f"; {rc.optim.lr_scaling} scaling of {rc.optim.lr:.3g} from reference batch "
               f"{rc.optim.reference_batch_size}" if rc.optim.lr_scaling != "none" else "")
    log.info("lr in effect %.3g%s (schedule %s, warmup %d of %d updates; starts at %.3g) | precision %s | "
             "device %s | train/validation examples %d/%d", job.lr, scaling, rc.optim.scheduler,
             optim.warmup_updates(rc.optim, job.total_updates), job.total_updates, job.scheduler.get_last_lr()[0],
             describe_precision(job.precision, t.mixed_precision), job.accelerator.device, len(job.splits["train"]),
             len(job.splits["validation"]))
    log.info("packing %s", job.packing.reason)
    task = job.task
    pairs = " | text pairs" if "text_pair" in job.splits["train"].column_names else ""
    if task.regression:
        log.info("task regression, one output %r%s | squared error | validation metric %s", task.label_names[0],
                 pairs, task.metric)
        return log_parameters(job)
    log.info("task %s, %d labels %s%s | F1 average %s | validation metric %s%s | class weights %s%s",
             task.problem_type, len(task.label_names), task.label_names, pairs, task.f1_average, task.metric,
             " | thresholds tuned on validation after training" if task.tune_thresholds else "",
             task.class_weights_setting,
             f" {task.describe_weights()}" + (" (positive weights per label)" if task.multi_label else
                                               "; an update divides by its window's sum of weights")
             if task.class_weights else "")
    log_parameters(job)


def log_parameters(job: Job) -> None:
    rc = job.rc
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


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    # The order of every epoch: a mid-epoch resume in another order would repeat some examples and miss others.
    # Absent when off (the default), so checkpoints written before this key still resume.
    if rc.trainer.group_by_length:
        record["group_by_length"] = True
    # The metric that picks the best model: a resume must compare like with like (absent at the old default f1).
    if job.task.metric != "f1":
        record["metric"] = job.task.metric
    # Frozen BatchNorm statistics change every forward pass; warn and error train alike (error refuses N > 1).
    # Only where the model has BatchNorm layers (elsewhere the setting changes nothing); absent otherwise.
    if rc.trainer.batchnorm == "freeze" and has_batchnorm(job.accelerator.unwrap_model(job.model)):
        record["batchnorm"] = "freeze"
    return json.loads(json.dumps(record))  # the form it takes in trainer_state.json


def data_fingerprint(cfg: DataConfig) -> dict:
    """The data slice of `fingerprint`; data.tsv_quoting, data.problem_type and data.drop_duplicates only where
    set (not their defaults), so checkpoints written before the keys existed still resume."""
    defaults = (("tsv_quoting", "auto"), ("problem_type", "auto"), ("drop_duplicates", False))
    return {k: v for k, v in dataclasses.asdict(cfg).items() if (k, v) not in defaults}
