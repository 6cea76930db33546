"""The arithmetic of one optimizer update: which examples are real, and exact normalisation.

An update must equal the gradient of the mean loss over the real examples of its window, summed
over every micro-batch on every process. Accelerate's `backward` divides each micro-batch loss by N
and DDP averages over the W processes; both are right only when every micro-batch is full. The last
window of an epoch is often shorter, and Accelerate pads a rank's last batch with repeated samples.
So each micro-batch backpropagates the *sum* of its real per-example losses, and at the window
boundary the gradients are rescaled by N*W / (global count of real examples), a count all-reduced
once per window together with the loss sum (which also gives the logged loss).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError


def real_examples(dataset_len: int, micro_batch_size: int, batch_index: int, world_size: int,
                  rank: int) -> int:
    """How many leading examples of this rank's `batch_index`-th batch are real (not repeats).

    Mirrors accelerate's BatchSamplerShard (split_batches=False, even_batches=True): global batch
    j = batch_index * world_size + rank holds samples [j*B, (j+1)*B) of the epoch's permutation;
    a short last batch is topped up, and missing batches are filled, with samples from the start.
    (No library call reports this per batch; `gather_for_metrics` does it only for gathered outputs.)
    """
    start = (batch_index * world_size + rank) * micro_batch_size
    return max(0, min(micro_batch_size, dataset_len - start))


def window_examples(dataset_len: int, micro_batch_size: int, window: int, grad_accum_steps: int,
                    batches_per_rank: int, world_size: int) -> int:
    """Real examples in window `window` of an epoch, over all processes: the count the window's mean
    divides by, known on every rank before the window starts (no communication).

    A window is batches [window*N, (window+1)*N) of every rank, cut at the epoch's end."""
    batches = range(window * grad_accum_steps, min((window + 1) * grad_accum_steps, batches_per_rank))
    return sum(real_examples(dataset_len, micro_batch_size, b, world_size, r)
               for b in batches for r in range(world_size))


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row, in fp32 at least whatever the autocast (fp64 stays fp64)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                           reduction="none")


def finish_window(accelerator, model, loss_sum: torch.Tensor, count: int, grad_accum_steps: int,
                  rescale: bool = True, stop: bool = False) -> torch.Tensor:
    """Make the accumulated gradients exact; return [loss sum, real examples, stop votes] summed
    over all processes (the stop votes ride along in the same all-reduce).

    Call once per window, after the last backward and before clipping and the optimizer step.
    Each micro-batch backpropagated its loss sum, which Accelerate divided by N and DDP averaged
    over W processes; multiplying by N*W/count turns that into the mean over the window's examples.
    """
    totals = torch.stack([loss_sum, loss_sum.new_tensor(float(count)), loss_sum.new_tensor(float(stop))])
    totals = accelerator.reduce(totals, reduction="sum")  # the one extra collective per update
    if rescale:
        scale = grad_accum_steps * accelerator.num_processes / totals[1]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # Rescaling commutes with the fp16 GradScaler's factor, so it is right before unscaling too.
        torch._foreach_mul_(grads, scale)
    return totals


def _use_running_statistics(module, args) -> None:  # a forward pre-hook must return None
    module.eval()


BATCHNORM_WHY = (
    "BatchNorm normalises each forward pass with the mean and variance of that micro-batch "
    "({micro} examples per process), not of the effective batch of {effective}: accumulation adds up "
    "gradients after the fact, but no forward pass ever sees the other micro-batches, and the running "
    "statistics are updated {n} times per optimizer update from micro-batch statistics."
)


def apply_batchnorm_policy(model: torch.nn.Module, policy: str, micro: int, n: int, effective: int,
                           warn: Callable[[str], None]) -> list[str]:
    """Act on BatchNorm layers when accumulating (n > 1): warn, refuse, or freeze their statistics.

    Returns the names of the BatchNorm modules found.
    """
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or n == 1:
        return [name for name, _ in norms]
    why = BATCHNORM_WHY.format(micro=micro, effective=effective, n=n)
    names = ", ".join(name for name, _ in norms)
    if policy == "error":
        raise ConfigError(f"trainer.batchnorm=error: the model has BatchNorm layers ({names}) and "
                          f"grad_accum_steps={n}. {why} Use trainer.batchnorm=freeze to keep their running "
                          "statistics fixed, or warn to go on.")
    if policy == "freeze":
        for _, module in norms:
            # Normalise with the stored running statistics and never update them; the affine
            # weights still train. A pre-hook survives the model.train() calls around evaluation.
            module.register_forward_pre_hook(_use_running_statistics)
        warn(f"trainer.batchnorm=freeze: running statistics of {names} are fixed during training. {why}")
    else:
        warn(f"the model has BatchNorm layers ({names}) and grad_accum_steps={n}. {why} "
             "Set trainer.batchnorm=freeze to keep their running statistics fixed, or error to refuse.")
    return [name for name, _ in norms]
