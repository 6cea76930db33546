"""Windows: the micro-batches of one optimizer update, and which of their examples are real.

A window is defined by the effective batch, not by the split: window w of an epoch holds examples
[w*E, (w+1)*E) of that epoch's seeded permutation, whatever the micro-batch, N and world size.
Accelerate shards by batch (split_batches=False): global batch j = batch_index * W + rank holds
samples [j*B, (j+1)*B); a short last batch is topped up, and missing batches are filled, with
samples from the start of the epoch (even_batches). Those repeats must not count.

`Window.micro_batches()` pulls batches lazily from the epoch's prepared DataLoader: the loader
marks `end_of_dataloader` one batch ahead, and `accelerator.accumulate()` syncs whenever it is set,
so a window that prefetched its micro-batches would sync on every one of them at the epoch's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np


def real_examples(dataset_len: int, micro_batch_size: int, batch_index: int, world_size: int,
                  rank: int) -> int:
    """How many leading examples of this rank's `batch_index`-th batch are real (not repeats).

    Mirrors accelerate's BatchSamplerShard (split_batches=False, even_batches=True). (No library call
    reports this per batch; `gather_for_metrics` does it only for gathered outputs.)
    """
    start = (batch_index * world_size + rank) * micro_batch_size
    return max(0, min(micro_batch_size, dataset_len - start))


def window_span(dataset_len: int, micro_batch_size: int, window: int, grad_accum_steps: int,
                batches_per_rank: int, world_size: int) -> tuple[int, int]:
    """Positions [start, stop) of the epoch's order that are window `window`'s real examples, over all
    processes, known on every rank before the window starts (no communication).

    The window is batches [window*N, min((window+1)*N, batches_per_rank)) of every rank, i.e. the
    contiguous global batches [first, end) of the permutation, each `micro_batch_size` long and cut
    at the dataset's end (the union of `real_examples` over them, in closed form)."""
    first = window * grad_accum_steps * world_size
    end = min((window + 1) * grad_accum_steps, batches_per_rank) * world_size
    start = min(dataset_len, first * micro_batch_size)
    return start, max(start, min(dataset_len, end * micro_batch_size))


def window_examples(dataset_len: int, micro_batch_size: int, window: int, grad_accum_steps: int,
                    batches_per_rank: int, world_size: int) -> int:
    """Real examples in window `window` of an epoch, over all processes: the count the window's mean
    divides by."""
    start, stop = window_span(dataset_len, micro_batch_size, window, grad_accum_steps, batches_per_rank, world_size)
    return stop - start


class MicroBatch(NamedTuple):
    batch: dict      # the collated, device-placed batch (labels included)
    real: int        # leading rows that are real examples (the rest are Accelerate's repeats)
    last: bool       # the window's last micro-batch on this rank: gradients are exchanged here


@dataclass
class Window:
    """One optimizer update on this rank: micro-batches [first_batch, first_batch + size) of the epoch."""
    epoch: int
    index: int               # window number within the epoch
    first_batch: int         # this rank's batch index of the first micro-batch
    size: int                # micro-batches on this rank (N, or fewer at the epoch's end)
    ends_epoch: bool
    examples: int            # real examples over all processes, known up front
    grad_accum_steps: int    # N of the split in effect
    world_size: int
    _next_batch: Callable[[], dict]
    _real: Callable[[int], int]
    weight: float | None = None  # the normaliser, the sum of the real examples' weights (None: each weighs 1)

    def micro_batches(self) -> Iterator[MicroBatch]:
        """Lazily: each batch is read from the loader only when the previous one is done."""
        for offset in range(self.size):
            batch_index = self.first_batch + offset
            yield MicroBatch(self._next_batch(), self._real(batch_index), offset == self.size - 1)

    @property
    def normaliser(self) -> float:
        """What the window's (weighted) loss sum is divided by: its sum of weights, or its count."""
        return self.examples if self.weight is None else self.weight

    @property
    def prescale(self) -> float:
        """N*W / normaliser: the factor that turns a micro-batch's loss sum into its share of the window
        mean after a divide-by-N (Accelerate, DeepSpeed) and a mean over W processes (DDP)."""
        return self.grad_accum_steps * self.world_size / self.normaliser


class TrainBatches:
    """The training DataLoader at the current micro-batch size, cut into windows.

    `make_loader(micro_batch_size)` returns a prepared DataLoader; it is rebuilt whenever the state's
    micro-batch differs from the one it was built for (after an out-of-memory fallback, or a resume
    with another micro-batch).

    `order_weights(epoch)` (None: every example weighs 1): each position's weight in the epoch's order
    (the class weight of the example drawn there). A window's sum of weights is then known up front, as its
    count is: it covers positions window_span of that order, whatever the split."""

    def __init__(self, accelerator, make_loader: Callable[[int], object], dataset_len: int,
                 order_weights: Callable[[int], np.ndarray] | None = None):
        self.accelerator, self.make_loader, self.dataset_len = accelerator, make_loader, dataset_len
        self.order_weights = order_weights
        self.loader, self.loader_micro = None, None

    def windows(self, state) -> Iterator[Window]:
        """The windows of epoch `state.epoch` from window `state.window` on. Leaving the iteration
        early (the last update, an out-of-memory redo) ends the loader's pass."""
        acc, micro, n = self.accelerator, state.micro_batch_size, state.grad_accum_steps
        loader = self._loader(micro)
        batches_per_rank, world, rank = len(loader), acc.num_processes, acc.process_index
        loader.set_epoch(state.epoch)  # one seeded permutation per epoch, the same on all ranks
        if state.window:  # resume, or redo after out-of-memory: skip the windows already done
            loader = acc.skip_first_batches(loader, state.window * n)
            loader.set_epoch(state.epoch)
        batches = iter(loader)
        count = math.ceil(batches_per_rank / n)
        cumulative = self._cumulative_weights(state.epoch)
        try:
            for index in range(state.window, count):
                first = index * n
                start, stop = window_span(self.dataset_len, micro, index, n, batches_per_rank, world)
                yield Window(
                    epoch=state.epoch, index=index, first_batch=first,
                    size=min(n, batches_per_rank - first), ends_epoch=index == count - 1,
                    examples=stop - start, grad_accum_steps=n, world_size=world, _next_batch=lambda: next(batches),
                    _real=lambda b: real_examples(self.dataset_len, micro, b, world, rank),
                    weight=None if cumulative is None else float(cumulative[stop] - cumulative[start]))
        finally:
            loader.end()  # idempotent; tells Accelerate this pass is over even if abandoned

    def _cumulative_weights(self, epoch: int) -> np.ndarray | None:
        """Running sums of the epoch's order weights (float64, from 0): a window's weight is a difference."""
        if self.order_weights is None:
            return None
        weights = np.asarray(self.order_weights(epoch), dtype=np.float64)
        if len(weights) != self.dataset_len:
            raise ValueError(f"order_weights({epoch}) gave {len(weights)} weights for {self.dataset_len} examples")
        return np.concatenate([[0.0], np.cumsum(weights)])

    def _loader(self, micro_batch_size: int):
        if self.loader_micro != micro_batch_size:
            self.loader, self.loader_micro = self.make_loader(micro_batch_size), micro_batch_size
        return self.loader
