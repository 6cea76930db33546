"""Batches: the training order (Accelerate's seeded shuffle, or grouped by length), micro-batch and evaluation
loaders, padded per batch by transformers' collator."""

from __future__ import annotations

import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

from .columns import column


def collator(tokenizer, pin_memory: bool):
    # Pad each batch to its longest row (to a multiple of 8 on GPUs, for tensor cores).
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if pin_memory else None)


def _own_generator(seed: int) -> torch.Generator:
    # Each new DataLoader iterator draws a seed from its generator. With the global one, starting
    # an iterator (as a resumed run does mid-epoch) would shift the dropout random stream, and a
    # resumed run would no longer reproduce the uninterrupted one.
    return torch.Generator().manual_seed(seed)


class _LengthGrouped(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from `seed + epoch`: the same on every rank, and a
    resumed run redraws the order of the epoch it stopped in (Accelerate calls set_epoch).

    Grouped by `group_size` = the effective batch, not the micro-batch: the order (and so which
    examples form each window) must not change when the micro-batch does (an out-of-memory fallback,
    a resume with another micro-batch, another world size). Micro-batches are consecutive slices of
    the order, so each still holds rows of similar length."""

    def __init__(self, group_size: int, lengths: list[int], seed: int):
        super().__init__(group_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def train_sampler(encoded_train: Dataset, seed: int, group_by_length: bool, group_size: int):
    """The sampler of the training order; None: Accelerate's seeded shuffle (use_seedable_sampler)."""
    if not group_by_length:
        return None
    lengths = pc.list_value_length(column(encoded_train, "input_ids")).to_numpy(zero_copy_only=False)
    return _LengthGrouped(group_size, lengths.tolist(), seed)


def epoch_order(encoded_train: Dataset, seed: int, epoch: int, group_by_length: bool, group_size: int) -> list[int]:
    """The example order of `epoch`, as training draws it (scripts/verify_equivalence.py replays it)."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = (train_sampler(encoded_train, seed, group_by_length, group_size)
               or SeedableRandomSampler(range(len(encoded_train)), data_seed=seed))
    sampler.set_epoch(epoch)
    return list(sampler)


def train_loader(encoded_train: Dataset, tokenizer, micro_batch_size: int, num_workers: int,
                 pin_memory: bool, seed: int, shuffle: bool = True, group_by_length: bool = False,
                 group_size: int | None = None, collate=None) -> DataLoader:
    """Micro-batches in a seeded order (Accelerate swaps in its seeded sampler for a shuffled loader).

    group_by_length: rows of similar length are neighbours in the order (sorted within random groups
    of `group_size` x up to 50 rows; group_size: the effective batch), so per-batch padding adds fewer
    pad tokens, and the order does not depend on the micro-batch. `collate`: the packed collator
    (packing.PackedCollator); None pads each batch.
    """
    sampler = train_sampler(encoded_train, seed, group_by_length, group_size or micro_batch_size)
    return DataLoader(encoded_train, batch_size=micro_batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, collate_fn=collate or collator(tokenizer, pin_memory), num_workers=num_workers,
                      pin_memory=pin_memory, generator=_own_generator(seed))


def eval_loaders(encoded: DatasetDict, tokenizer, batch_size: int, num_workers: int,
                 pin_memory: bool, seed: int, collate=None) -> dict[str, DataLoader]:
    return {split: DataLoader(encoded[split], batch_size=batch_size, shuffle=False,
                              collate_fn=collate or collator(tokenizer, pin_memory), num_workers=num_workers,
                              pin_memory=pin_memory, generator=_own_generator(seed))
            for split in ("validation", "test") if split in encoded}
