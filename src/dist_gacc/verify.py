"""Check a configured split (micro x N x processes) against one big batch per update.

Trains a few updates the way the config says (dropout off), then replays the same windows on the
main process as plain full batches of their real examples with a fresh copy of the initial model,
and compares the parameters group by group. Without mixed precision both run in float64, so
rounding can neither hide a wrong normalisation nor fake one: Adam moves each parameter by about
the LR whatever the gradient's scale, so in fp32 a mis-weighted window differs by barely more than
rounding noise.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, open_dict
from transformers import DataCollatorWithPadding

from . import data, engines, models, optim, teardown
from .build import build
from .loop import Hooks
from .resume import resume
from .run import train_only


def parameter_group(name: str) -> str:
    """'bert.encoder.layer.3.attention.self.query.weight' -> 'bert.encoder.layer.3'."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def windows(job, updates: int) -> list[list[int]]:
    """The example indices of each update's window: consecutive slices of each epoch's order, drawn by
    the sampler training used (Accelerate's seeded shuffle, or the length-grouped order)."""
    train_set, effective, t = job.encoded["train"], job.effective_batch_size, job.rc.trainer
    num_examples = len(train_set)
    per_epoch = math.ceil(num_examples / effective)
    out = []
    for epoch in range(math.ceil(updates / per_epoch)):
        order = data.epoch_order(train_set, job.rc.seed, epoch, t.group_by_length, effective)
        out += [order[i:i + effective] for i in range(0, num_examples, effective)]
    return out[:updates]


def reference_updates(job, initial_state: dict, window_indices: list[list[int]]) -> dict:
    """One process, one padded batch per window (whatever trainer.packing gave the run), the task's loss as torch defines it for one batch (the mean over its
    examples; class-weighted: sum of w*loss / sum of w; multi-label: the mean over examples and labels):
    the definition of the update."""
    acc, rc = job.accelerator, job.rc
    model = plain_copy(job, initial_state)
    model.train()
    # The copy keeps requires_grad: under LoRA the reference trains the adapters and the head only, as the run.
    optimizer = optim.build_optimizer(model, rc.optim, job.lr)
    scheduler = optim.build_scheduler(optimizer, rc.optim, job.total_updates)
    collate = DataCollatorWithPadding(job.tokenizer)
    train_set, objective = job.encoded["train"], job.task.objective()
    for indices in window_indices:
        batch = {k: v.to(acc.device) for k, v in collate([train_set[i] for i in indices]).items()}
        labels = batch.pop("labels")
        with acc.autocast():
            logits = model(**batch).logits
        objective.reference_loss(logits, labels).backward()
        if rc.trainer.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), rc.trainer.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def plain_copy(job, state: dict) -> torch.nn.Module:
    """A one-process copy of the job's model holding `state`. Under FSDP the prepared model cannot be deep-copied
    (FSDP2 forbids it: its parameters are DTensor shards), so the same architecture is built again (as build
    does, memory levers included) and loaded; elsewhere a deep copy of the unwrapped model."""
    if engines.engine_name(job.accelerator) != "fsdp":
        model = copy.deepcopy(job.accelerator.unwrap_model(job.model, keep_fp32_wrapper=False))
    else:
        rc = job.rc
        model = models.apply_memory_levers(
            models.build_model(rc.model, job.task.label_names, job.tokenizer, job.task.problem_type), rc.model, rc.peft)
        model.to(next(iter(state.values())).dtype)  # load_state_dict would cast float64 to the built float32
    model.load_state_dict(state)
    return model


def full_state_dict(accelerator, model) -> dict:
    """Collective: the model's whole tensors, copied, on the main process (FSDP's DTensor shards gathered by
    accelerator.get_state_dict; other ranks may get an empty dict)."""
    return {k: v.detach().clone() for k, v in accelerator.get_state_dict(model).items()}


def verify_config(cfg: DictConfig) -> DictConfig:
    """The config verify trains: dropout off, `verify.updates` updates."""
    with open_dict(cfg):
        cfg.model.dropout = 0.0  # dropout would make the two computations differ by design
        if "dropout" in cfg.get("peft", {}):
            cfg.peft.dropout = 0.0  # LoRA's dropout too
        cfg.trainer.max_steps = cfg.verify.updates
        if cfg.trainer.mixed_precision == "auto":
            # The check is about the split's arithmetic: float64, whatever `auto` would pick on this machine
            # (bf16 on a CPU with AMX would leave ~1e-4 of rounding and FAIL a 1e-9 tolerance). An explicit
            # bf16/fp16 is checked as asked, and the table says so.
            cfg.trainer.mixed_precision = "no"
    return cfg


def verify_dtype(precision: str):
    return torch.float64 if precision == "no" else None  # fp32 is checked in float64


# DeepSpeed's ZeRO-1/2 optimizer keeps fp32 master weights whatever the model's dtype (it steps a .float() copy
# of its partition and copies it back), so a float64 run's parameters are rounded to fp32 at every update:
# measured 1.2e-7 (one fp32 ulp at |p| ~ 1) after 4 updates of the tiny model, against 3.8e-4 for the naive
# normalisation of the same ragged windows on 2 DDP ranks. The check keeps a 1e-6 floor there: weaker than
# float64's 1e-9 (an error whose effect stays near 1e-6, like the README's 1-process naive example at 1.4e-6,
# could pass), which the table says.
DEEPSPEED_FLOAT64_TOLERANCE = 1e-6


def tolerance_in_effect(job, tolerance: float) -> tuple[float, str]:
    """(tolerance, what the table says about the arithmetic)."""
    precision = job.rc.trainer.mixed_precision
    if precision != "no":
        return tolerance, precision
    if engines.engine_name(job.accelerator) == "deepspeed" and tolerance < DEEPSPEED_FLOAT64_TOLERANCE:
        return DEEPSPEED_FLOAT64_TOLERANCE, (f"float64 with DeepSpeed's fp32 master weights (verify.tolerance "
                                             f"{tolerance:.1e} raised to {DEEPSPEED_FLOAT64_TOLERANCE:.0e})")
    return tolerance, "float64"


def verify(cfg: DictConfig, hooks: Hooks | None = None) -> bool:
    """Print the per-group difference table and PASS/FAIL on the main process; same verdict on all ranks.

    With `resume=<checkpoint>` (written by a float64 run of the same config, e.g. on another number of
    processes) training continues from it, and the reference still replays every window from the initial
    model: the check then covers the resume too. `hooks`: tests inject faults (out of memory) into training."""
    tolerance = float(verify_config(cfg).verify.tolerance)
    job = build(cfg, hooks, dtype=verify_dtype)
    acc = job.accelerator
    initial = full_state_dict(acc, job.model)  # the seeded initialisation
    state = train_only(job, state=resume(job)[0])  # without `resume`: a fresh state
    trained = full_state_dict(acc, job.model)
    tolerance, arithmetic = tolerance_in_effect(job, tolerance)

    verdict = [None]
    if acc.is_main_process:
        window_indices = windows(job, job.total_updates)
        reference = reference_updates(job, initial, window_indices)
        diffs: dict[str, float] = defaultdict(float)
        for name, value in reference.items():
            if value.is_floating_point():
                diff = (trained[name].float() - value.float()).abs().max().item()
                diffs[parameter_group(name)] = max(diffs[parameter_group(name)], diff)
        worst = max(diffs.values())
        print(f"\nsplit: micro-batch {state.micro_batch_size} x N {state.grad_accum_steps} x processes "
              f"{acc.num_processes} = effective {job.effective_batch_size}; {job.total_updates} updates; "
              f"windows of {', '.join(str(len(w)) for w in window_indices)} examples; "
              f"normalisation {job.rc.trainer.loss_normalisation}; task {job.task.problem_type}"
              f"{', text pairs' if 'text_pair' in job.splits['train'].column_names else ''}"
              f"{', class weights ' + str(job.task.describe_weights()) if job.task.class_weights else ''}; "
              f"{'packed' if job.packing.on else 'padded'} micro-batches; {arithmetic}")
        width = max(len(g) for g in diffs)
        print(f"{'parameter group':<{width}}  max |difference|")
        for group, diff in diffs.items():
            print(f"{group:<{width}}  {diff:.3e}")
        verdict[0] = worst <= tolerance
        print(f"max {worst:.3e} vs tolerance {tolerance:.1e}: {'PASS' if verdict[0] else 'FAIL'}")
    broadcast_object_list(verdict, from_process=0)
    teardown.shutdown(acc, models=[job.model])
    return bool(verdict[0])
