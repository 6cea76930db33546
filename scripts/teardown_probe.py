"""The end of a 2-rank gloo run in miniature, for scripts/stress_teardown.py --tight (issue 11, point 8).

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no scripts/teardown_probe.py --ending ENDING [--gil-work]

Starts Accelerate (gloo), trains one step of a DDP-wrapped Linear, then ends as dist_gacc.run.run()
does: a last wait_for_everyone() (save_outputs), ENDING, accelerator.end_training() (trackers and
destroy_process_group), and finally the DDP model is freed (run() returning). ENDING:
  none      nothing (dist_gacc before the sleep)
  sleep     time.sleep(0.2) (the old mitigation)
  shutdown  dist_gacc.teardown.shutdown(accelerator, models=[model])
  release   shutdown() without its barrier: only the DDP Reducer/Logger release before the destroy
--gil-work: just before ENDING, start an all_reduce whose future callback (on the gloo worker thread)
  sleeps 0.3 s in Python, so a worker thread still needs the GIL while the main thread tears down:
  a stand-in for "a worker blocked in take_gil releasing a finished work", made certain.
--switch S: sys.setswitchinterval(S) from the last barrier on: the main thread keeps the GIL while it
  runs Python code, which widens any race between it and a worker thread that wants the GIL.
Each rank prints how many gloo worker threads are alive before and after end_training() and after the
DDP model is freed: the group, and its threads, die with its last owner.
"""

import argparse
import os
import sys
import time

import torch
import torch._dynamo  # as in a real run (transformers): imported before the process group
import torch.distributed as dist
from accelerate import Accelerator

# Importing torch._dynamo after the process group exists makes it keep ~10 references to the group
# (measured with sys.getrefcount), which would keep the group alive to interpreter exit and hide the
# DDP-release path. scripts/train.py imports it (through transformers) before the group is made.


def threads() -> int:
    """gloo worker threads (ProcessGroupGloo::runLoop) alive in this process."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names.count("pt_gloo_runloop")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ending", choices=["none", "sleep", "shutdown", "release"], default="none")
    ap.add_argument("--gil-work", action="store_true")
    ap.add_argument("--switch", type=float, default=None)
    args = ap.parse_args()

    acc = Accelerator()
    model = acc.prepare(torch.nn.Linear(8, 2))
    acc.backward(model(torch.randn(4, 8)).sum())
    if args.switch is not None:
        sys.setswitchinterval(args.switch)
    acc.wait_for_everyone()  # save_outputs() ends with this barrier
    if args.gil_work:
        def slow(fut):
            time.sleep(0.3)  # runs on a gloo worker; needs the GIL again to return
            return fut.value()
        dist.all_reduce(torch.ones(1), async_op=True).get_future().then(slow)
    if args.ending == "sleep":
        time.sleep(0.2)
    elif args.ending == "shutdown":
        from dist_gacc.teardown import shutdown

        shutdown(acc, models=[model])
    elif args.ending == "release":
        from dist_gacc import teardown

        barrier = teardown.dist.barrier
        teardown.dist.barrier = lambda: None
        try:
            teardown.shutdown(acc, models=[model])
        finally:
            teardown.dist.barrier = barrier
    rank = acc.process_index
    n_before = threads()
    acc.end_training()  # destroy_process_group(); the DDP model still holds the group
    n_destroyed = threads()
    acc._models.clear()
    del model  # the DDP model goes: with its Reducer, the group's last owner
    print(f"probe rank {rank}: gloo worker threads {n_before} -> {n_destroyed} after destroy_process_group "
          f"-> {threads()} after the DDP model is freed", flush=True)


if __name__ == "__main__":
    main()
