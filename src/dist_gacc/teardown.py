"""Ordered end of a multi-process run (issue 11, point 8: a finished 2-rank gloo run that never exited).

What hung (gdb on the orphaned rank): the main thread was in ~ProcessGroupGloo, joining a gloo worker
thread, and that worker was blocked in take_gil while destroying a finished AsyncBarrierWork.

Why (sources read: torch/csrc/distributed/c10d/ProcessGroupGloo.cpp and init.cpp from pytorch/pytorch,
the installed torch 2.13 headers ProcessGroupGloo.hpp/ProcessGroup.hpp, torch/nn/parallel/distributed.py,
torch/distributed/distributed_c10d.py, torch/autograd/graph.py; accelerate 1.15 state.py/accelerator.py):

* ProcessGroupGloo::runLoop holds its own references to the work it runs (a local and
  workInProgress_[i]) and drops them only after AsyncWork::execute() has completed the work, so the
  last reference, and the work's destructor, can be on the gloo worker thread. What a work releases
  may need the GIL: AsyncWork keeps the caller's at::ThreadLocalState (tls_), which can hold
  SafePyObjects (torch/autograd/graph.py: "SafePyObject's destructor needs the GIL"), tensors whose
  PyObject is kept from C++, Python future callbacks.
* ~ProcessGroupGloo() waits for its queue to empty, then joins every worker thread; it does not release
  the GIL. Python handles on a ProcessGroup release it before the destructor runs (init.cpp binds
  ProcessGroup with intrusive_ptr_no_gil_destructor_*_class_), but the DDP model's C++ Reducer (a
  plain pybind shared_ptr class) and the dist.Logger holding that Reducer also own the group, and they
  are freed with the GIL held.
* Accelerator.end_training() -> PartialState.destroy_process_group() -> torch's destroy_process_group()
  drops torch.distributed's own references (_world); gloo's shutdown() is a no-op (Backend::shutdown).
  With the DDP model alive that does not end the group: it ends when the DDP model is freed (run()
  returning), last in dist.Logger -> ~Reducer -> ~ProcessGroup -> ~ProcessGroupGloo -> join(), GIL held,
  a moment after the last barrier. A worker that needs the GIL then can never get it: the hang.
  scripts/teardown_probe.py --ending none --gil-work makes the worker need the GIL on purpose and hangs
  every time; gdb shows exactly that main-thread stack (dict_dealloc of the DDP module -> Reducer
  dealloc -> ~ProcessGroupGloo -> std::thread::join) against a runLoop thread in take_gil.

time.sleep(0.2) only made the window unlikely (the same probe with the sleep still hangs when the worker
needs the GIL for 0.3 s). shutdown() removes the cycle: the group's destructor never runs with the GIL.
"""

from __future__ import annotations

import torch.distributed as dist
from accelerate.state import PartialState
from torch.nn.parallel import DistributedDataParallel


def shutdown(accelerator=None, models=()) -> int:
    """Collective: end a run's process group in an order that cannot deadlock. Every rank calls it,
    as the last distributed step of a run; a no-op unless torch.distributed is initialised.

    1. A barrier on the main thread, waited (the GIL is released while waiting): every rank has
       finished its collectives, and gloo's barrier also waits for all earlier work on this rank
       (AsyncBarrierWork::run waits on the prior in-progress and queued work).
    2. Drop the C++ owners of the process group that would destroy it with the GIL held: each DDP
       model's Reducer and the dist.Logger holding it. The model's parameters are untouched; it can
       still be evaluated or saved, not trained (DDP's forward needs the Reducer).
    3. destroy_process_group() (through Accelerate's PartialState, which skips it for notebook/fork
       launches). Only Python handles are left on the group, and their holder releases the GIL
       before ~ProcessGroupGloo joins the worker threads, so a worker that still needs the GIL gets
       it and the join returns.
    Accelerator.end_training() afterwards still finishes the trackers; its destroy_process_group() is
    then a no-op (it checks torch.distributed.is_initialized()).

    `accelerator`: the run's Accelerator, or None; `models`: the prepared models (a DDP model, or a wrapper
    holding one) to release. Pass them: Accelerate keeps the DDP wrapper in `accelerator._models` on GPUs but
    not on CPU ranks (accelerate 1.16's prepare_model replaces the list entry only for MULTI_GPU), and a
    missed Reducer brings the hang back (seen: verify_equivalence on 2 CPU ranks, 1 run in 8).
    Returns how many Reducers were released (tests check it).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    released = 0
    PartialState().wait_for_everyone()  # = accelerator.wait_for_everyone(): dist.barrier() on gloo/NCCL
    for prepared in [*getattr(accelerator, "_models", []), *models]:
        for module in prepared.modules():  # finds DDP inside a torch.compile wrapper too
            if isinstance(module, DistributedDataParallel) and "reducer" in module.__dict__:
                # dist.Logger owns a shared_ptr to the Reducer, so both go (None is DDP's own
                # "no logger" value). ~Reducer removes its autograd hooks; it runs here, on the main
                # thread with the GIL, while torch.distributed's _world still holds the group, so it
                # is not the group's last owner.
                module.logger = None
                del module.reducer
                released += 1
    PartialState().destroy_process_group()  # what Accelerator.end_training() calls
    return released


def end_after_failure() -> None:
    """After an expected failure (bad input, a failed run): end this rank's process group before the process
    exits, without a barrier (another rank may never reach one). Left to the interpreter's exit, a live gloo
    group's C++ threads can meet the process's static destructors: seen once, a DeepSpeed launch refused for
    bad input had one rank abort (`terminate called without an active exception`, exit code -6) instead of
    exiting 2. Local: destroy_process_group() runs no collective."""
    if dist.is_available() and dist.is_initialized():
        PartialState().destroy_process_group()
