"""What changes under Accelerate's engines (DDP, FSDP, DeepSpeed): the update variant, chosen once at
build (`build_engine`), and the launches and settings we refuse.

The loop and step are the same everywhere; what is engine-specific:

- DeepSpeed owns the window boundary: at the window's last micro-batch `accelerator.backward` runs
  DeepSpeed's `engine.backward` (which divides the loss by its gradient_accumulation_steps) and then
  `engine.step()` (clipping with its `gradient_clipping`, the optimizer step, zeroing). Its ZeRO-2
  gradients live in partitioned buffers, so the exact normalisation cannot rescale them afterwards;
  instead each micro-batch's loss sum is pre-scaled by N*W / (the window's real examples), a count
  every rank computes without communication (windows.window_examples); with class weights, the
  window's sum of weights, read from the epoch's order (windows.TrainBatches, build.Job.order_weights).
  DeepSpeed's /N and its mean over W processes then leave exactly the (weighted) mean over the
  window's real examples.
- FSDP shards parameters: model/ is written from the gathered full state dict (under LoRA through a whole
  CPU copy of the PeftModel, models.whole_peft_copy), and the best model is broadcast back into the shards
  (outputs.load_full_state_dict_fsdp).
- A launch that does not give the world it asked for is refused before any work (measured with
  accelerate 1.15 on CPU: see conf/accelerate/cpu_2proc.yaml).
- Without a GPU, DeepSpeed and (behind DIST_GACC_FSDP_ON_CPU=1) FSDP2 run on gloo CPU ranks: the first
  process group is set up for them (`start_process_group`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
from accelerate import InitProcessGroupKwargs, PartialState
from accelerate.utils import (DistributedType, get_distributed_backend, get_torch_accelerator_backend,
                              parse_flag_from_env)

from .errors import ConfigError, TrainingError
from .launch import FSDP_ON_CPU
from .oom import is_out_of_memory, update_out_of_memory
from .step import StepResult

DEEPSPEED_STAGES = (0, 1, 2)  # ZeRO-3 partitions parameters: saving/reloading the model is not handled here


def engine_name(accelerator) -> str:
    """deepspeed | fsdp | ddp (any multi-process data parallel) | single."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def engine_record(accelerator, model) -> dict:
    """After `accelerator.prepare`: the engine that runs, from Accelerate's state (its distributed type and the
    engine's plugin) and the prepared model's wrapper class. metrics.json's engine_state; the model card names it
    and writes the launch that sets it up again (dist_gacc.launch.for_run)."""
    state = accelerator.state
    # torchrun's per-machine count: the launch's machines (the reproduce command's --num_machines)
    machines = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    record = {"name": engine_name(accelerator), "distributed_type": state.distributed_type.value,
              "wrapper": type(model).__name__, "machines": machines}
    if record["name"] == "deepspeed":
        record["zero_stage"] = state.deepspeed_plugin.zero_stage
    elif record["name"] == "fsdp":
        kind = state.fsdp_plugin.state_dict_type
        record.update(fsdp_version=state.fsdp_plugin.fsdp_version, state_dict_type=getattr(kind, "name", str(kind)))
    return record


def describe_engine(record: dict) -> str:
    """One line for the card and the log: `deepspeed (ZeRO-2; Accelerate's DEEPSPEED, the model a DeepSpeedEngine)`."""
    detail = {"deepspeed": f"ZeRO-{record.get('zero_stage')}; ",
              "fsdp": f"FSDP{record.get('fsdp_version')}, {record.get('state_dict_type')}; "}.get(record["name"], "")
    if "distributed_type" not in record:  # a record from before engine_state
        return record["name"]
    return (f"{record['name']} ({detail}Accelerate's distributed type {record['distributed_type']}, the model a "
            f"{record['wrapper']})")


ACCELERATE_TESTED = ">=1.16,<1.17"  # FSDP on CPU relabels a private field: pinned in pyproject.toml


def _launched(engine: str) -> bool:
    """The launch config asks for FSDP / DEEPSPEED (accelerate launch exports ACCELERATE_USE_<engine>)."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def _no_accelerator() -> bool:
    """No GPU-like device Accelerate would pick a process-group backend for (it then leaves it unset)."""
    return get_distributed_backend(get_torch_accelerator_backend()[0]) is None


def process_group_setup() -> tuple[bool, str | None]:
    """(cpu, backend) for the first PartialState of a run (build.choose_precision), set for the engine the
    launch asks for. Measured with accelerate 1.16 on a machine without CUDA:

    - DeepSpeed: Accelerate leaves the backend unset without a GPU (each rank a world of 1), and
      ACCELERATE_USE_CPU=1 switches DeepSpeed off altogether. So the variable is dropped for this process
      and the backend is gloo: DeepSpeed's own process group, 2 ranks, device cpu.
    - FSDP: Accelerate enables it only for GPU-like distributed types; on CPU it silently trains DDP
      (check_launch refuses). With DIST_GACC_FSDP_ON_CPU=1 the gloo CPU group is built as for DDP and then
      relabelled (relabel_for_fsdp).
    Otherwise (DDP, one process, any GPU launch): Accelerate's own choice, from ACCELERATE_USE_CPU.
    """
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    distributed = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    if not distributed or not _no_accelerator():
        return cpu, None
    if _launched("DEEPSPEED"):
        # AcceleratorState reads the variable again: drop it for this process, not only here.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        return False, "gloo"
    if parse_flag_from_env(FSDP_ON_CPU):
        if not _launched("FSDP"):
            raise ConfigError(f"{FSDP_ON_CPU}=1 rehearses an FSDP launch on CPU ranks, but this launch does not ask "
                              "for FSDP: launch with --config_file conf/accelerate/fsdp.yaml (or unset the variable).")
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(f"{FSDP_ON_CPU}=1 supports FSDP2 only (fsdp_version: 2, as conf/accelerate/fsdp.yaml): "
                              "FSDP1 on CPU segfaults in torch when Accelerate gathers a full state dict with "
                              "offload_to_cpu=True (measured, torch 2.13).")
        return True, "gloo"
    return cpu, None


def start_process_group(timeout_s: float) -> PartialState:
    """The run's first PartialState (Hydra's ${now} resolver or build.choose_precision, whichever comes first:
    the first one fixes the backend and timeout), set up for the launched engine."""
    cpu, backend = process_group_setup()
    state = PartialState(cpu, **process_group_kwargs(timeout_s, backend).to_kwargs())
    relabel_for_fsdp(state)
    return state


def process_group_kwargs(timeout_s: float, backend: str | None) -> InitProcessGroupKwargs:
    """`backend` None: Accelerate's default for the device."""
    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s), **({"backend": backend} if backend else {}))


def relabel_for_fsdp(state) -> None:
    """Under DIST_GACC_FSDP_ON_CPU=1: relabel the CPU group MULTI_GPU before AcceleratorState reads it, so
    Accelerate enables FSDP (it does only for GPU-like types). A private field of Accelerate's shared state,
    written by hand because no public switch exists: the FSDP CPU test asserts the parameters are really
    DTensor-sharded, so an Accelerate upgrade cannot turn this into DDP unnoticed."""
    if not (parse_flag_from_env(FSDP_ON_CPU) and _launched("FSDP") and state.device.type == "cpu"
            and state.distributed_type == DistributedType.MULTI_CPU):
        return
    state._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    if state.is_main_process:
        warnings.warn(f"{FSDP_ON_CPU}=1: FSDP2 on CPU ranks (gloo) is a rehearsal mode for tests and trying a "
                      "launch, not for speed.", stacklevel=2)


def check_launch(accelerator) -> None:
    """Refuse launches where Accelerate silently set up something other than what was launched."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"the launcher started {launched} processes but each sees a world of {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type.value}): they would train independently. Without a "
            "GPU, set ACCELERATE_USE_CPU=1 for `accelerate launch --multi_gpu` (or --config_file "
            "conf/accelerate/cpu_2proc.yaml)."
        )
    for engine, wanted in (("FSDP", DistributedType.FSDP), ("DEEPSPEED", DistributedType.DEEPSPEED)):
        if _launched(engine) and accelerator.distributed_type != wanted:
            raise ConfigError(
                f"the launch config asks for {engine} but Accelerate set up {accelerator.distributed_type.value} "
                f"(device {accelerator.device}). Accelerate enables {engine} only on GPUs (and similar "
                "accelerators); on a CPU it would silently train without it"
                + (f". To rehearse an FSDP2 launch on CPU ranks, set {FSDP_ON_CPU}=1." if engine == "FSDP" else ".")
            )


def configure_fsdp(accelerator) -> None:
    """Before `accelerator.prepare`: FSDP2 under bf16/fp16 reduces (and, inside a window, accumulates) gradients
    in fp32, as DDP's fp32 `.grad` does. Accelerate's policy reduces in the compute dtype, so a window's
    gradient sum and its reduce-scatter would round to bf16. Parameters are still all-gathered and computed in
    the compute dtype (FSDP's memory and bandwidth saving)."""
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if plugin.fsdp_version == 2 and policy is not None and policy.reduce_dtype not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def check_sharded(accelerator, model) -> int:
    """Under FSDP, after prepare: the number of DTensor-sharded parameters, refused if none (FSDP2 on CPU rests
    on relabel_for_fsdp: an Accelerate that wrapped DDP instead must not train unnoticed)."""
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    if engine_name(accelerator) == "fsdp" and accelerator.num_processes > 1 and not sharded:
        raise TrainingError(f"the launch asks for FSDP but no parameter of the prepared model is sharded "
                            f"({type(model).__name__}): Accelerate did not apply fully_shard (FSDP2 is supported "
                            f"here; with {FSDP_ON_CPU}=1, accelerate {ACCELERATE_TESTED} only).")
    return sharded


def check_supported(accelerator, trainer) -> None:
    """Settings an engine cannot honour, refused before any work."""
    engine = engine_name(accelerator)
    if engine == "deepspeed":
        if trainer.loss_normalisation == "naive":
            raise ConfigError("trainer.loss_normalisation=naive is not supported under DeepSpeed: DeepSpeed divides "
                              "each micro-batch's loss by its own gradient_accumulation_steps inside backward, and "
                              "the loop pre-scales the losses to the exact window mean; the naive variant (the "
                              "comparison baseline) would silently train exact. Use DDP or one process for naive.")
        if trainer.micro_batch_size == "auto":
            raise ConfigError("trainer.micro_batch_size=auto is not supported under DeepSpeed: DeepSpeed fixes "
                              "train_micro_batch_size_per_gpu when it starts. Give a number.")
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage not in DEEPSPEED_STAGES:
            raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported here (stages "
                              f"{', '.join(map(str, DEEPSPEED_STAGES))}): ZeRO-3 partitions the parameters, "
                              "and saving and reloading the model are not handled for it")


def configure_deepspeed(accelerator, trainer, micro_batch_size: int, grad_accum_steps: int) -> dict:
    """Before `accelerator.prepare`: make DeepSpeed's batch and clipping values the trainer's."""
    return fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, trainer.max_grad_norm,
                                 micro_batch_size, grad_accum_steps, accelerator.num_processes)


def fill_deepspeed_config(config: dict, max_grad_norm: float | None, micro_batch_size: int,
                          grad_accum_steps: int, world_size: int) -> dict:
    """Fill DeepSpeed's `auto` (or missing) batch and clipping values; refuse any that disagree.

    DeepSpeed must accumulate exactly the trainer's N (the loss pre-scale assumes its division by N)
    and clip at trainer.max_grad_norm (the loop does not clip under DeepSpeed; left `auto`, Accelerate
    would fill 1.0 whatever the trainer says). Returns the values in effect.
    """
    wanted = {
        "train_micro_batch_size_per_gpu": (micro_batch_size, "trainer.micro_batch_size"),
        "gradient_accumulation_steps": (grad_accum_steps, "trainer.grad_accum_steps (N)"),
        "train_batch_size": (micro_batch_size * grad_accum_steps * world_size, "the effective batch"),
        "gradient_clipping": (max_grad_norm or 0.0, "trainer.max_grad_norm"),  # DeepSpeed: 0 = no clipping
    }
    for key, (value, source) in wanted.items():
        have = config.get(key, "auto")
        if have == "auto":
            config[key] = value
        elif not math.isclose(float(have), float(value)):
            raise ConfigError(
                f"the DeepSpeed config has {key}={have} but {source} gives {value}: DeepSpeed would "
                f"{'clip' if key == 'gradient_clipping' else 'accumulate'} differently from the trainer. "
                f"Set {key}: auto in the DeepSpeed config (the trainer fills it) or change {source}."
            )
    return {key: config[key] for key in wanted}


# --- the update variants, chosen once at build -------------------------------------------------------

@dataclass(frozen=True)
class Engine:
    """How a window's losses become one update: a pair of functions, picked by `build_engine`.

    loss_to_backward(real_sum, losses, window): the tensor each micro-batch backpropagates.
    apply_update(parts, window, totals): after the window's last backward and the all-reduce of
        totals = [loss sum, weight sum, real examples, stop votes]: normalise, clip, step; a step.StepResult.
    """
    name: str
    loss_to_backward: Callable
    apply_update: Callable


def _prescaled(real_sum, losses, window):
    return real_sum * window.prescale


def build_engine(engine: str, loss_normalisation: str, fp16: bool, weighted: bool = False) -> Engine:
    """`weighted`: the objective's rows carry weights (class weights), so the window's normaliser is known
    only after its last micro-batch."""
    if engine == "deepspeed":
        # DeepSpeed divides by its N and averages over W itself: pre-scale by N*W/count (known up front; with
        # class weights, the window's sum of weights, read from the epoch's order: windows.Window.normaliser).
        return Engine("deepspeed", _prescaled, _apply_deepspeed)
    if loss_normalisation == "naive":
        # Accelerate's plain loss/N on the micro-batch mean, repeats included: only to show what it gets wrong.
        return Engine("naive", lambda real_sum, losses, window: losses.mean(),
                      functools.partial(_apply, rescale=False, fp16=fp16))
    if weighted:
        return rescaled_engine(fp16)
    # exact, unweighted: the window's real examples are counted up front (windows.window_examples), so each
    # micro-batch's loss sum is pre-scaled by N*W/count and the summed gradients ARE the window mean: no
    # extra pass over every gradient after backward (measured ~0.3-0.7 % of a MiniLM update on CPU).
    return prescaled_engine(fp16, name="exact")


def rescaled_engine(fp16: bool = False) -> Engine:
    """exact, weighted: backpropagate the (weighted) loss sum; rescale the summed gradients by N*W/(sum of
    weights) once the window's weights are all known (step.train_step all-reduces them)."""
    return Engine("exact", lambda real_sum, losses, window: real_sum, functools.partial(_apply, rescale=True, fp16=fp16))


def prescaled_engine(fp16: bool = False, name: str = "prescaled") -> Engine:
    """DeepSpeed's arithmetic without DeepSpeed (pre-scaled losses, no rescale afterwards, our own step): the
    exact engine of unweighted objectives. tests/dist/comm_count.py checks it equals the rescaled one on 2 DDP
    ranks."""
    return Engine(name, _prescaled, functools.partial(_apply, rescale=False, fp16=fp16))


def _apply(parts, window, totals: torch.Tensor, rescale: bool, fp16: bool):
    """Rescale to the window mean, clip, step, unless the loss or gradient is non-finite on any rank."""
    acc, model = parts.accelerator, parts.model
    if rescale:
        # Each micro-batch backpropagated its (weighted) loss sum, which Accelerate divided by N and DDP
        # averaged over W: multiplying by N*W/(sum of weights) gives the weighted mean over the window's real
        # examples (the plain mean when each weighs 1). (Rescaling commutes with the fp16 GradScaler's
        # factor, so it is right before unscaling too.)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, window.grad_accum_steps * window.world_size / totals[1])
    # The norm of the all-reduced gradients: every rank sees the same number.
    try:
        parts.hooks.before_clip()
        norm = acc.clip_grad_norm_(model.parameters(), parts.max_grad_norm or math.inf)
    except RuntimeError as err:
        if is_out_of_memory(err):
            raise update_out_of_memory("clipping the gradients", window, model) from err
        raise
    loss_sum, weight, examples, stop_votes, grad_norm = torch.cat(
        [totals.float(), norm.reshape(1).float().to(totals.device)]).tolist()  # the update's one host read
    finite = math.isfinite(loss_sum) and (math.isfinite(grad_norm) or fp16)  # fp16: the GradScaler skips infs
    stepped = False
    if finite:
        try:
            parts.optimizer.step()
        except RuntimeError as err:
            if is_out_of_memory(err):
                raise update_out_of_memory("in the optimizer step", window, model) from err
            raise
        stepped = not acc.optimizer_step_was_skipped  # a GradScaler-skipped step does not advance the schedule
        if stepped:
            parts.scheduler.step()
    elif acc.scaler is not None:
        skip_scaler_step(acc.scaler)  # the clip's unscale_() above must be closed by an update()
    # Not optimizer.zero_grad(): Accelerate makes that a no-op off a sync step.
    model.zero_grad(set_to_none=True)
    return StepResult(loss_sum, weight, int(examples), grad_norm, int(stop_votes), stepped=stepped,
                      skipped=not finite)


def skip_scaler_step(scaler) -> None:
    """Leave the fp16 GradScaler as torch's own skipped step does (GradScaler.step finding an inf, then
    update()): the scale times backoff_factor, the growth count back to 0, and this update's unscale_() record
    cleared (without that, the next unscale_() raises "unscale_() has already been called on this optimizer
    since the last update()"). Public API only: update(new_scale) clears the record but keeps the growth count,
    which load_state_dict resets. Runs only on a skipped update (it reads the scale: a host sync)."""
    state = scaler.state_dict()
    if not state:  # a disabled scaler keeps no state
        return
    backed_off = state["scale"] * state["backoff_factor"]
    scaler.update(new_scale=backed_off)
    scaler.load_state_dict({**state, "scale": backed_off, "_growth_tracker": 0})


def _apply_deepspeed(parts, window, totals: torch.Tensor):
    """DeepSpeed has already clipped (its gradient_clipping), stepped and zeroed the gradients inside the
    window's last backward: step our schedule and read its gradient norm."""
    acc = parts.accelerator
    norm = acc.clip_grad_norm_(parts.model.parameters(), parts.max_grad_norm)  # reads DeepSpeed's norm
    loss_sum, weight, examples, stop_votes = totals.float().tolist()
    skipped = acc.optimizer_step_was_skipped  # fp16 overflow: DeepSpeed skipped the step itself
    if not skipped and not math.isfinite(loss_sum):
        raise TrainingError(f"non-finite loss in window {window.index} of epoch {window.epoch} under DeepSpeed, "
                            "which steps inside backward: the update was applied and cannot be skipped. Resume "
                            "from the newest checkpoint with a lower optim.lr.")
    if not skipped:
        parts.scheduler.step()
    return StepResult(loss_sum, weight, int(examples), math.nan if norm is None else float(norm), int(stop_votes),
                      stepped=not skipped, skipped=skipped)
