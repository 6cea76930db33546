"""Typed, validated slices of the Hydra config.

Hydra composes the config and, in struct mode, rejects unknown keys. This module checks values
(ranges, choices, files) before any work starts and hands each builder a plain dataclass, so the
training loop never touches a DictConfig.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

PRECISIONS = ("auto", "no", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")
F1_AVERAGES = ("auto", "binary", "macro", "micro", "weighted")
BATCHNORM_POLICIES = ("warn", "error", "freeze")
NORMALISATIONS = ("exact", "naive")
LR_SCALINGS = ("none", "linear", "sqrt")
DATASETS = ("rotten_tomatoes", "chinese_reviews", "debates", "csv", "hub", "review_pairs", "word_pleasantness")
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
# Compressed text files (x.tsv.gz is a TSV): datasets' csv/json builders and pandas decompress them
# through fsspec (.zst needs the zstandard package). Parquet compresses inside the file.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
TSV_QUOTINGS = ("auto", "none", "csv")
PEFT_METHODS = ("none", "lora")
PROBLEM_TYPES = ("auto", "classification", "regression")
# What trainer.metric may name, by problem type: the keys each evaluation reports (tasks.Task.metric). The first
# is `auto`'s choice. mse is the one lower-is-better metric.
REPORTED_METRICS = {"classification": ("f1", "accuracy", "f1_macro", "f1_micro"),
                    "regression": ("pearson", "spearman", "mse")}
LOWER_IS_BETTER = ("mse",)
# What a log line, a history entry and the model card show: the run's trainer.metric first, then these.
HEADLINE_METRICS = {"classification": ("f1", "accuracy"), "regression": REPORTED_METRICS["regression"]}


def headline_metrics(metric: str, regression: bool) -> tuple[str, ...]:
    """The chosen validation metric, then the task kind's other headline figures."""
    keys = HEADLINE_METRICS["regression" if regression else "classification"]
    return (metric, *[k for k in keys if k != metric])


def table_suffix(path: str) -> tuple[str | None, str | None]:
    """(format suffix, compression suffix) of a data file, looking through the compression:
    x.tsv.gz -> (".tsv", ".gz"), x.csv -> (".csv", None); (None, ...) if not a table we read."""
    stem, compression = os.path.splitext(path)
    if compression.lower() not in COMPRESSION_SUFFIXES:
        stem, compression = path, None
    suffix = os.path.splitext(stem)[1].lower()
    if suffix not in DATA_FILE_SUFFIXES or (compression and suffix == ".parquet"):
        return None, compression
    return suffix, compression


def _int(key: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    return value


def _float(key: str, value: Any, low: float, high: float | None = None, *, low_open=False,
           allow_none=False) -> float | None:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"{key} must be a number {bound}" + (" or null" if allow_none else "")
                          + f", got {value!r}")
    return float(value)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {'|'.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainerConfig:
    micro_batch_size: int | str = 32  # or "auto": the largest that fits, probing down from auto_micro_batch_cap
    grad_accum_steps: int = 1
    effective_batch_size: int | None = None  # if set, grad_accum_steps is derived from it
    auto_micro_batch_cap: int = 64
    epochs: int = 1
    max_steps: int | None = None
    mixed_precision: str = "auto"
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    eval_batch_size: int = 64
    log_every: int = 10
    f1_average: str = "auto"
    num_workers: int = 0
    dist_timeout_s: int = 1800
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    early_stopping_patience: int | None = None
    save_best: bool = False
    log_with: str | list | None = "tensorboard"
    max_bad_steps: int = 5
    batchnorm: str = "warn"            # BatchNorm under accumulation: warn | error | freeze
    loss_normalisation: str = "exact"  # exact | naive (Accelerate's divide-by-N; for comparison only)
    group_by_length: bool = False      # micro-batches of similar length: less padding
    # padding-free micro-batches (packing.py): auto packs where the architecture is known and packed logits equal
    # padded ones at build; true refuses to run otherwise; false pads every batch to its longest row
    packing: str | bool = "auto"
    packing_max_tokens: int = 64       # tokens per packed row, or the longest text (docs/benchmarks.md: measured)
    cache_tokenized: bool = True       # keep tokenized splits in the datasets cache between runs
    compile: bool = False              # torch.compile the model (Accelerate's dynamo plugin, inductor)
    fused_adamw: str | bool = "auto"   # auto: fused AdamW on CUDA and CPU (measured faster) | true | false
    sync_each_batch: bool = False      # exchange gradients after every micro-batch, not once per window
    oom_fallback: str | bool = "auto"  # out of memory: redo the window at half the micro-batch (auto: where safe)
    # none | balanced | a list (label order) or {label: weight}; multi-label: per-label positive weights
    class_weights: str | list | dict | None = "none"
    # multi-label: a label is predicted where its sigmoid score >= this; tune: per-label thresholds picked on the
    # validation split after training (tasks.tune_thresholds), stored in model/thresholds.json
    multi_label_threshold: float | str = 0.5
    # the validation metric that picks the best model, drives early stopping and is the sweep objective:
    # auto (f1 for classification, pearson for regression) or a key the problem type reports (REPORTED_METRICS)
    metric: str = "auto"
    baseline: str | bool = "auto"       # TF-IDF + linear baseline after training (auto: <= 200k training rows)

    def __post_init__(self):
        p = "trainer."
        if self.micro_batch_size != "auto":
            _int(p + "micro_batch_size", self.micro_batch_size, 1)
        _int(p + "grad_accum_steps", self.grad_accum_steps, 1)
        _int(p + "effective_batch_size", self.effective_batch_size, 1, allow_none=True)
        _int(p + "auto_micro_batch_cap", self.auto_micro_batch_cap, 1)
        _int(p + "checkpoint_every", self.checkpoint_every, 1, allow_none=True)
        _int(p + "keep_checkpoints", self.keep_checkpoints, 1)
        _int(p + "early_stopping_patience", self.early_stopping_patience, 1, allow_none=True)
        for key in ("save_best", "group_by_length", "cache_tokenized", "compile", "sync_each_batch"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"trainer.{key} must be true or false, got {getattr(self, key)!r}")
        if self.packing not in ("auto", True, False):
            raise ConfigError(f"trainer.packing must be auto, true or false, got {self.packing!r}")
        _int(p + "packing_max_tokens", self.packing_max_tokens, 1)
        if self.oom_fallback not in ("auto", True, False):
            raise ConfigError(f"trainer.oom_fallback must be auto, true or false, got {self.oom_fallback!r}")
        if self.baseline not in ("auto", True, False):
            raise ConfigError(f"trainer.baseline must be auto, true or false, got {self.baseline!r}")
        if self.fused_adamw not in ("auto", True, False):
            raise ConfigError(f"trainer.fused_adamw must be auto, true or false, got {self.fused_adamw!r}")
        trackers = [self.log_with] if isinstance(self.log_with, str) else list(self.log_with or [])
        known = ("none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                 "swanlab", "trackio")
        for tracker in trackers:
            _choice(p + "log_with", tracker, known)
        _int(p + "max_bad_steps", self.max_bad_steps, 1)
        _choice(p + "batchnorm", self.batchnorm, BATCHNORM_POLICIES)
        _choice(p + "loss_normalisation", self.loss_normalisation, NORMALISATIONS)
        _int(p + "epochs", self.epochs, 1)
        _int(p + "max_steps", self.max_steps, 1, allow_none=True)
        # YAML 1.1 reads a bare `no` as false; accept it as "no".
        if self.mixed_precision is False:
            object.__setattr__(self, "mixed_precision", "no")
        _choice(p + "mixed_precision", self.mixed_precision, PRECISIONS)
        _float(p + "max_grad_norm", self.max_grad_norm, 0.0, low_open=True, allow_none=True)
        _int(p + "eval_every", self.eval_every, 1, allow_none=True)
        _int(p + "eval_batch_size", self.eval_batch_size, 1)
        _int(p + "log_every", self.log_every, 1)
        _choice(p + "f1_average", self.f1_average, F1_AVERAGES)
        _int(p + "num_workers", self.num_workers, 0)
        _int(p + "dist_timeout_s", self.dist_timeout_s, 1)
        if self.multi_label_threshold != "tune":
            try:
                _float(p + "multi_label_threshold", self.multi_label_threshold, 0.0, 1.0, low_open=True)
            except ConfigError as err:
                raise ConfigError(f"{err} (or tune)") from None
        known = sorted({m for metrics in REPORTED_METRICS.values() for m in metrics})
        _choice(p + "metric", self.metric, ("auto", *known))
        check_class_weights(self.class_weights)


def check_class_weights(value: Any) -> None:
    """The form of trainer.class_weights; its length and label names are checked against the data
    (tasks.class_weights), once the labels are known."""
    if value is None or value in ("none", "balanced"):
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None or not value:
        raise ConfigError(f"trainer.class_weights must be none, balanced, a list of weights in label order or "
                          f"a mapping label -> weight, got {value!r}")
    for key, weight in items:
        _float(f"trainer.class_weights[{key}]", weight, 0.0, low_open=True)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    scheduler: str = "linear"
    warmup_ratio: float = 0.1
    lr_scaling: str = "none"                 # none | linear | sqrt, relative to reference_batch_size
    reference_batch_size: int | None = None  # the effective batch at which `lr` was tuned

    def __post_init__(self):
        _float("optim.lr", self.lr, 0.0, low_open=True)
        _choice("optim.lr_scaling", self.lr_scaling, LR_SCALINGS)
        _int("optim.reference_batch_size", self.reference_batch_size, 1, allow_none=True)
        if self.lr_scaling != "none" and self.reference_batch_size is None:
            raise ConfigError(f"optim.lr_scaling={self.lr_scaling} needs optim.reference_batch_size "
                              "(the effective batch size at which optim.lr was tuned)")
        _float("optim.weight_decay", self.weight_decay, 0.0)
        _choice("optim.scheduler", self.scheduler, SCHEDULERS)
        _float("optim.warmup_ratio", self.warmup_ratio, 0.0, 1.0)


@dataclass(frozen=True)
class DataConfig:
    name: str = "rotten_tomatoes"
    max_length: int = 128
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # processes that tokenize a split: auto (min(cores, 4) for >= 50k rows on > 2 cores, else 1) or >= 1
    num_proc: int | str = "auto"
    # false: every row is kept (a repeated text stays in one split); true: exact copies (same text and label)
    # are dropped first, counted in the data line
    drop_duplicates: bool = False
    # data=csv
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    # .tsv files: auto (the reading that keeps every row: quoted fields as pandas to_csv writes them, or
    # none, GLUE-style: a field may start with a lone "), none, or csv (quoted)
    tsv_quoting: str = "auto"
    # data=csv and data=hub
    text_pair_column: str | None = None  # sentence pairs: the second text's column (null: single texts)
    multi_label: bool = False            # the label column holds a set of labels per row
    label_separator: str = ","           # multi-label csv/tsv: labels in one cell, split on this
    # auto: regression where the training label column holds floats (Arrow float type), else classification;
    # regression: one output, squared error, the label column parsed as numbers
    problem_type: str = "auto"
    # data=hub
    hub_name: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation"
    test_split: str | None = None

    def __post_init__(self):
        _choice("data.name", self.name, DATASETS)
        _int("data.max_length", self.max_length, 8)
        _float("data.validation_fraction", self.validation_fraction, 0.0, 0.5)
        _float("data.test_fraction", self.test_fraction, 0.0, 0.5)
        _int("data.max_train_samples", self.max_train_samples, 1, allow_none=True)
        _int("data.max_eval_samples", self.max_eval_samples, 1, allow_none=True)
        if self.num_proc != "auto":
            if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int) or self.num_proc < 1:
                raise ConfigError(f"data.num_proc must be auto or an integer >= 1, got {self.num_proc!r}")
        if self.name == "csv":
            if not self.train_file:
                raise ConfigError("data.train_file is required with data=csv")
            for key in ("train_file", "validation_file", "test_file"):
                path = getattr(self, key)
                if path is None:
                    continue
                if not os.path.isfile(path):
                    raise ConfigError(f"data.{key}: file not found: {path}")
                if table_suffix(path)[0] is None:
                    raise ConfigError(f"data.{key}: {path} must end with one of {DATA_FILE_SUFFIXES}, the "
                                      f"text formats optionally followed by one of {COMPRESSION_SUFFIXES}")
        _choice("data.tsv_quoting", self.tsv_quoting, TSV_QUOTINGS)
        _choice("data.problem_type", self.problem_type, PROBLEM_TYPES)
        if self.problem_type == "regression" and self.multi_label:
            raise ConfigError("data.problem_type=regression and data.multi_label=true: a regression label is one "
                              "number per row")
        if self.name == "hub" and not self.hub_name:
            raise ConfigError("data.hub_name is required with data=hub (a `datasets` Hub name)")
        if self.name in ("csv", "hub"):
            for key in ("text_column", "label_column"):
                if not isinstance(getattr(self, key), str) or not getattr(self, key):
                    raise ConfigError(f"data.{key} must be a column name, got {getattr(self, key)!r}")
            if self.text_pair_column is not None:
                if not isinstance(self.text_pair_column, str) or not self.text_pair_column:
                    raise ConfigError(f"data.text_pair_column must be a column name or null, "
                                      f"got {self.text_pair_column!r}")
                if self.text_pair_column in (self.text_column, self.label_column):
                    raise ConfigError(f"data.text_pair_column={self.text_pair_column!r} is also "
                                      "data.text_column or data.label_column")
        elif self.text_pair_column is not None or self.multi_label:
            # The embedded corpora have their own columns and labels.
            raise ConfigError("data.text_pair_column / data.multi_label apply to data=csv|hub, "
                              f"not data={self.name}")
        if not isinstance(self.drop_duplicates, bool):
            raise ConfigError(f"data.drop_duplicates must be true or false, got {self.drop_duplicates!r}")
        if not isinstance(self.multi_label, bool):
            raise ConfigError(f"data.multi_label must be true or false, got {self.multi_label!r}")
        if not isinstance(self.label_separator, str) or not self.label_separator:
            raise ConfigError(f"data.label_separator must be a non-empty string, "
                              f"got {self.label_separator!r}")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str | None = None
    dropout: float = 0.1
    from_scratch: dict | None = None
    # Recompute each layer's activations in backward instead of keeping them: less memory, ~30 % more
    # compute, the same math (models.enable_gradient_checkpointing).
    gradient_checkpointing: bool = False

    def __post_init__(self):
        _float("model.dropout", self.dropout, 0.0, 1.0)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"model.gradient_checkpointing must be true or false, "
                              f"got {self.gradient_checkpointing!r}")
        if self.name_or_path is None and not self.from_scratch:
            raise ConfigError("model.name_or_path is null and model.from_scratch is empty: "
                              "give a pretrained name/folder or use model=tiny")
        if self.name_or_path is not None:
            if not isinstance(self.name_or_path, str) or not self.name_or_path:
                raise ConfigError(f"model.name_or_path must be a name or folder, got {self.name_or_path!r}")
            looks_local = self.name_or_path.startswith((".", "/", "~")) or os.path.exists(self.name_or_path)
            if looks_local and not os.path.isdir(os.path.expanduser(self.name_or_path)):
                raise ConfigError(f"model.name_or_path: folder not found: {self.name_or_path}")
        if self.name_or_path is None:
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size"):
                _int(f"model.from_scratch.{key}", self.from_scratch.get(key), 1)
            architecture = self.from_scratch.get("architecture", "bert")
            if architecture not in ("bert", "llama"):
                raise ConfigError(f"model.from_scratch.architecture must be bert (model=tiny) or llama "
                                  f"(model=tiny_decoder), got {architecture!r}")
            heads, kv_heads = self.from_scratch["num_attention_heads"], self.from_scratch.get("num_key_value_heads")
            if _int("model.from_scratch.num_key_value_heads", kv_heads, 1, allow_none=True) and heads % kv_heads:
                raise ConfigError(f"model.from_scratch.num_key_value_heads={kv_heads} must divide "
                                  f"num_attention_heads={heads}")
            if self.from_scratch["hidden_size"] % heads:
                raise ConfigError(f"model.from_scratch.hidden_size={self.from_scratch['hidden_size']} must be a "
                                  f"multiple of num_attention_heads={heads}")


@dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning through `peft` (models.apply_lora). none: every parameter trains."""
    name: str = "none"                     # none | lora
    r: int = 8                             # LoRA rank
    alpha: float = 16.0                    # LoRA scale is alpha / r
    dropout: float = 0.05                  # dropout on the adapters' input (0 for exact comparisons)
    target_modules: list | None = None     # module names to adapt; null: the default of the architecture

    def __post_init__(self):
        _choice("peft.name", self.name, PEFT_METHODS)
        _int("peft.r", self.r, 1)
        object.__setattr__(self, "alpha", _float("peft.alpha", self.alpha, 0.0, low_open=True))
        object.__setattr__(self, "dropout", _float("peft.dropout", self.dropout, 0.0, 1.0))
        if self.dropout >= 1.0:
            raise ConfigError(f"peft.dropout must be a number >= 0.0 and < 1.0, got {self.dropout!r}")
        if self.target_modules is not None:
            names = self.target_modules
            if (not isinstance(names, (list, tuple)) or not names
                    or not all(isinstance(n, str) and n for n in names)):
                raise ConfigError(f"peft.target_modules must be a non-empty list of module names or null, "
                                  f"got {names!r}")
            object.__setattr__(self, "target_modules", list(names))


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    trainer: TrainerConfig
    optim: OptimConfig
    seed: int
    output_dir: str
    resume: str | None = None
    resume_force: bool = False
    run_name: str | None = None
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)


def _slice(cls, cfg: DictConfig, key: str):
    node = cfg.get(key)
    if node is None:
        raise ConfigError(f"config group {key!r} is missing")
    for name in node:  # `???` values: report the key rather than OmegaConf's traceback
        if OmegaConf.is_missing(node, name):
            raise ConfigError(f"{key}.{name} is required (set it with {key}.{name}=...)")
    values = OmegaConf.to_container(node, resolve=True)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {key}: {', '.join(unknown)}")
    return cls(**values)


def load_config(cfg: DictConfig) -> RunConfig:
    """Validate the composed config and return typed slices. Raises ConfigError naming the key."""
    return RunConfig(
        data=_slice(DataConfig, cfg, "data"),
        model=_slice(ModelConfig, cfg, "model"),
        trainer=_slice(TrainerConfig, cfg, "trainer"),
        optim=_slice(OptimConfig, cfg, "optim"),
        # Optional: a config composed without the peft group (older configs) trains every parameter.
        peft=_slice(PeftConfig, cfg, "peft") if cfg.get("peft") is not None else PeftConfig(),
        seed=_int("seed", cfg.get("seed"), 0),
        output_dir=str(cfg.output_dir),
        resume=None if cfg.get("resume") in (None, "", "none") else str(cfg.get("resume")),
        resume_force=bool(cfg.get("resume_force", False)),
        run_name=None if cfg.get("run_name") in (None, "") else str(cfg.get("run_name")),
    )


def batch_plan(trainer: TrainerConfig, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """(grad_accum_steps, effective batch) for this world size and micro-batch.

    The effective batch is `effective_batch_size` if set, else micro (the cap, for `auto`) x N x world;
    N is derived so that micro x N x world equals it, or the run stops here naming the numbers.
    """
    if trainer.effective_batch_size is not None:
        effective = trainer.effective_batch_size
    else:
        nominal = trainer.auto_micro_batch_cap if trainer.micro_batch_size == "auto" else micro_batch_size
        effective = nominal * trainer.grad_accum_steps * world_size
    per_window = micro_batch_size * world_size
    if effective % per_window:
        raise ConfigError(
            f"trainer.effective_batch_size={effective} is not divisible by trainer.micro_batch_size="
            f"{micro_batch_size} x world size {world_size} = {per_window}; choose an effective batch "
            "that is a multiple of micro-batch x processes"
        )
    return effective // per_window, effective


def scaled_lr(optim: OptimConfig, effective_batch_size: int) -> float:
    """The LR in effect: optim.lr, scaled linearly or by the square root of effective/reference."""
    if optim.lr_scaling == "none":
        return optim.lr
    ratio = effective_batch_size / optim.reference_batch_size
    return optim.lr * (ratio if optim.lr_scaling == "linear" else ratio ** 0.5)


def check_machine(trainer: TrainerConfig) -> None:
    """Refuse settings this machine cannot honour (Accelerate would silently fall back)."""
    import torch

    if trainer.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.mixed_precision=fp16 needs a CUDA GPU; on this machine Accelerate would silently "
            "train in fp32. Use trainer.mixed_precision=bf16 (works on CPU) or no."
        )
