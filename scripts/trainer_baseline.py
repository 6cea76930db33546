"""The default job done by transformers' Trainer instead of this trainer (scripts/bench.py, section time_to_f1).

    python scripts/trainer_baseline.py [the same Hydra overrides as scripts/train.py]

Same composed config, hence the same job as `python scripts/train.py`: the same splits (data.load_splits),
tokenizer and initial model (models.build_tokenizer/build_model after the same set_seed), the same
tokenization and its cache (data.tokenize), the same micro-batch, N and effective batch (config.batch_plan),
LR (config.scaled_lr), AdamW (fused where the trainer fuses it; decay on the >=2-D weights only: checked
against optim.build_optimizer's groups before training), linear schedule with the same warm-up updates
(optim.warmup_updates), clipping, precision and evaluation batch size; one evaluation of the validation split
after the last update, scored by the package's offline metric (dist_gacc.metrics). No checkpoints, no
trackers, no test split, no saved model (the clock stops at the final validation F1 on both sides).

The Trainer divides each micro-batch loss by N (`model_accepts_loss_kwargs = False`: transformers 5.24 would
otherwise assume BERT's head normalises by num_items_in_batch, which it does not; scripts/bench_worker.py).
Differences that remain: the training order (Trainer's seeded RandomSampler vs Accelerate's seedable sampler,
both from `seed`) and so the dropout stream: the F1s differ by run-to-run noise, not by method.

Prints `FINAL_F1 <f1> <time.time()>` the moment the final F1 is known (the parent times launch -> this line),
then writes trainer_baseline.json into the run directory.
"""

from __future__ import annotations

import json
import math
import os
import time

import hydra

import dist_gacc  # noqa: F401  (Hydra resolvers, as scripts/train.py)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg):
    import datasets
    import numpy as np
    import torch
    from accelerate.utils import set_seed
    from transformers import Trainer, TrainingArguments

    from dist_gacc import data, metrics, models, optim
    from dist_gacc.config import batch_plan, load_config, scaled_lr
    from dist_gacc.tasks import build_task

    rc = load_config(cfg)
    t = rc.trainer
    if t.micro_batch_size == "auto" or t.loss_normalisation != "exact" or t.class_weights not in (None, "none"):
        raise SystemExit("trainer_baseline: the default job only (a fixed micro-batch, exact loss, no class weights)")
    cuda = torch.cuda.is_available()
    # As build.build: seed, then splits, task, tokenizer, model (the head's initial weights come from this seed).
    set_seed(rc.seed)
    splits = data.load_splits(rc.data, rc.seed)
    train = splits["train"]
    task = build_task(t, data.label_names(train), data.is_multi_label(train), train["label"])
    if task.multi_label:
        raise SystemExit("trainer_baseline: single-label data only")
    tokenizer = models.build_tokenizer(rc.model, data.train_texts(train), rc.data.max_length)
    model = models.apply_memory_levers(models.build_model(rc.model, task.label_names, tokenizer, task.problem_type),
                                       rc.model, rc.peft)
    cache = os.path.join(datasets.config.HF_DATASETS_CACHE, "dist_gacc_tokenized") if t.cache_tokenized else None
    encoded = data.tokenize(splits, tokenizer, rc.data.max_length, cache_dir=cache)
    metric = metrics.load_metric(False)

    micro = t.micro_batch_size
    grad_accum_steps, effective = batch_plan(t, 1, micro)
    lr = scaled_lr(rc.optim, effective)
    total_updates = t.max_steps or t.epochs * math.ceil(len(train) / effective)
    warmup = optim.warmup_updates(rc.optim, total_updates)
    fused = True if t.fused_adamw == "auto" else t.fused_adamw  # auto: fused on CPU and CUDA (build.build)
    ours = optim.build_optimizer(model, rc.optim, lr, fused=fused)  # reference only: the groups to match

    class SameJobTrainer(Trainer):
        def create_optimizer(self, model=None):
            created = super().create_optimizer(model)
            if self.optimizer is not None and not getattr(self, "_checked", False):
                self._checked = True
                check_same_optimizer(self.optimizer, ours)
            return created

    args = TrainingArguments(
        output_dir=os.path.join(rc.output_dir, "trainer"), per_device_train_batch_size=micro,
        per_device_eval_batch_size=t.eval_batch_size, gradient_accumulation_steps=grad_accum_steps,
        max_steps=total_updates, learning_rate=lr, weight_decay=rc.optim.weight_decay,
        lr_scheduler_type={"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[rc.optim.scheduler],
        warmup_steps=warmup, max_grad_norm=t.max_grad_norm or 0.0,
        optim="adamw_torch_fused" if fused else "adamw_torch",
        bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16", use_cpu=not cuda,
        dataloader_num_workers=t.num_workers, dataloader_pin_memory=cuda,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], seed=rc.seed,
    )
    trainer = SameJobTrainer(model=model, args=args, train_dataset=encoded["train"],
                             data_collator=data.collator(tokenizer, cuda))
    trainer.model_accepts_loss_kwargs = False  # divide each micro-batch loss by N (see the docstring)
    trainer.train()
    output = trainer.predict(encoded["validation"])  # the Trainer's evaluation loop, eval_batch_size rows a batch
    predictions = np.asarray(task.predictions(torch.as_tensor(output.predictions)))
    scored = metrics.score(metric, predictions, np.asarray(output.label_ids), task.f1_average, task.label_names)
    print(f"FINAL_F1 {scored['f1']!r} {time.time()!r}", flush=True)

    import psutil

    record = {"f1": scored["f1"], "accuracy": scored["accuracy"], "final_f1_time": time.time(),
              "seconds_since_process_start": time.time() - psutil.Process().create_time(),
              "updates": trainer.state.global_step, "total_updates": total_updates, "micro_batch_size": micro,
              "grad_accum_steps": grad_accum_steps, "lr": lr, "warmup_updates": warmup, "fused_adamw": bool(fused),
              "validation_examples": len(predictions)}
    if trainer.state.global_step != total_updates:
        raise SystemExit(f"trainer_baseline: {trainer.state.global_step} updates, {total_updates} expected")
    with open(os.path.join(rc.output_dir, "trainer_baseline.json"), "w") as f:
        json.dump(record, f, indent=2)
    return scored["f1"]


def check_same_optimizer(theirs, ours) -> None:
    """The Trainer's AdamW has our groups (same parameters decayed / not), LR, betas, eps, fused."""
    def groups(opt):
        return {(frozenset(id(p) for p in g["params"]), g["weight_decay"]) for g in opt.param_groups if g["params"]}

    if type(theirs).__name__ != "AdamW" or groups(theirs) != groups(ours) or any(
            theirs.defaults[k] != ours.defaults[k] for k in ("lr", "betas", "eps", "fused")):
        raise SystemExit(f"trainer_baseline: the Trainer's optimizer differs from the trainer's: "
                         f"{theirs.defaults} vs {ours.defaults}")


if __name__ == "__main__":
    main()
