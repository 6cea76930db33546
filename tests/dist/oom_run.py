"""A training run with a simulated out-of-memory error (launched by tests, 1 or 2 ranks).

    oom_run.py <run_dir> <mode> <hydra overrides...>
mode "midway": rank 1 only raises the CPU allocator's out-of-memory error for micro-batches larger
than 2 once 2 updates are done. mode "auto": every rank raises torch.OutOfMemoryError for
micro-batches larger than 4 (so micro_batch_size=auto settles on 4).
"""

import os
import sys

import torch

from conftest import compose_cfg
from dist_gacc import run
from dist_gacc.loop import LoopHooks

run_dir, mode, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))  # set by the launcher


def before_forward(micro_batch_size: int, optimizer_steps: int) -> None:
    if mode == "midway" and rank == 1 and micro_batch_size > 2 and optimizer_steps >= 2:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")
    if mode == "auto" and micro_batch_size > 4:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


run(compose_cfg(*overrides, f"output_dir={run_dir}"), hooks=LoopHooks(before_forward=before_forward))
