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

import torch
import torch.nn.functional as F


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


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, real: int) -> torch.Tensor:
    """Sum of per-example cross-entropy over the first `real` rows (fp32, whatever the autocast)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    return losses[:real].sum()


def finish_window(accelerator, model, loss_sum: torch.Tensor, count: int,
                  grad_accum_steps: int) -> torch.Tensor:
    """Make the accumulated gradients exact; return [loss sum, real examples] over all processes.

    Call once per window, after the last backward and before clipping and the optimizer step.
    """
    totals = torch.stack([loss_sum.float(), loss_sum.new_tensor(float(count))])
    totals = accelerator.reduce(totals, reduction="sum")  # the one extra collective per update
    scale = grad_accum_steps * accelerator.num_processes / totals[1]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # Rescaling commutes with the fp16 GradScaler's factor, so this is correct before unscaling too.
    torch._foreach_mul_(grads, scale)
    return totals
