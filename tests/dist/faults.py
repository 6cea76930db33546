"""A training run with an injected fault (launched by tests, 1 or 2 ranks).

    faults.py <run_dir> <mode> <hydra overrides...>

midway      rank 1 raises the CPU allocator's out-of-memory error for micro-batches larger than 2
            once 2 updates are done (the fallback must keep every update the same)
auto        every rank raises torch.OutOfMemoryError for micro-batches larger than 4
raise       rank 1 raises a RuntimeError during update 3
nan         rank 1's losses are NaN in update 4
nan_always  every rank's losses are NaN from update 2 on
save_crash  the main process dies while saving checkpoint step-4, after the files, before the rename
term_setup  the process sends itself SIGTERM at the end of set-up, before the first update
oom_step    torch.OutOfMemoryError in the first optimizer step (as AdamW allocating its state)
oom_clip    torch.OutOfMemoryError while clipping the first update's gradients
oom_eval    rank 1 (of 2) runs out of memory in evaluation forward passes of more than 8 rows; each failed
            size is appended to <run_dir>.oom_eval
ended       no fault: each rank prints how many DDP Reducers were released by the run's ordered teardown
            (dist_gacc.teardown.shutdown) and how many DDP models still held one after it
verify-<mode>  the same fault under scripts/verify_equivalence.py's check (float64 against one batch per
            update): exit 0 on PASS, 1 on FAIL
"""

import os
import signal
import sys
import time

import torch

from conftest import compose_cfg
from dist_gacc.run import run
from dist_gacc.loop import Hooks
from dist_gacc.run import exit_code
from dist_gacc.verify import verify

run_dir, mode, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
checked, mode = mode.startswith("verify-"), mode.removeprefix("verify-")
rank = int(os.environ.get("RANK", "0"))  # set by the launcher


def before_forward(micro_batch_size: int, updates: int) -> None:
    if mode == "midway" and rank == 1 and micro_batch_size > 2 and updates >= 2:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")
    if mode == "auto" and micro_batch_size > 4:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    if mode == "raise" and rank == 1 and updates == 2:
        raise RuntimeError(f"injected failure on rank 1 in update 3 at t={time.time():.3f}")


def after_forward(losses: torch.Tensor, updates: int) -> torch.Tensor:
    if (mode == "nan" and rank == 1 and updates == 3) or (mode == "nan_always" and updates >= 1):
        return losses * float("nan")
    return losses


def before_checkpoint_rename(tmp: str) -> None:
    if mode == "save_crash" and tmp.endswith("step-4"):
        os._exit(9)  # as abrupt as a kill: no cleanup, no exception handling


def after_setup() -> None:
    if mode == "term_setup":
        os.kill(os.getpid(), signal.SIGTERM)


def before_clip() -> None:
    if mode == "oom_clip":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (simulated, clipping)")


def optimizer_step(optimizer, args, kwargs) -> None:  # torch's global optimizer step pre-hook
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 88.00 MiB (simulated, AdamW state)")


def eval_forward(module, args) -> None:  # torch's global module forward pre-hook: the first Linear of a pass
    rows = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else 0
    if rank == 1 and isinstance(module, torch.nn.Linear) and not module.training and rows > 8:
        with open(f"{run_dir}.oom_eval", "a") as f:
            f.write(f"{rows}\n")
        raise torch.OutOfMemoryError(f"CUDA out of memory at {rows} rows (simulated, evaluation)")


if mode == "oom_step":
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(optimizer_step)
if mode == "oom_eval":
    torch.nn.modules.module.register_module_forward_pre_hook(eval_forward)


if mode == "ended":  # wraps the run's own call (run.py and verify.py call teardown.shutdown at their end)
    import gc

    from torch.nn.parallel import DistributedDataParallel

    from dist_gacc import teardown

    ordered_shutdown = teardown.shutdown

    def shutdown_and_count(*args, **kwargs):
        released = ordered_shutdown(*args, **kwargs)
        alive = sum(isinstance(o, DistributedDataParallel) and "reducer" in o.__dict__ for o in gc.get_objects())
        print(f"rank {rank}: teardown released {released} DDP reducer(s); {alive} still held after it", flush=True)
        return released

    teardown.shutdown = shutdown_and_count


hooks = Hooks(before_forward=before_forward, after_forward=after_forward,
              before_checkpoint_rename=before_checkpoint_rename, after_setup=after_setup, before_clip=before_clip)
try:  # as dist_gacc.main does: expected failures exit with their documented code
    if checked:
        sys.exit(0 if verify(compose_cfg(*overrides, f"output_dir={run_dir}"), hooks) else 1)
    run(compose_cfg(*overrides, f"output_dir={run_dir}"), hooks=hooks)
except Exception as err:
    known = exit_code(err)
    if known is None:
        raise
    print(known[1], file=sys.stderr)
    sys.exit(known[0])
