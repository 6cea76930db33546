"""The first part of a float64 check across a resume (launched by tests, 1 or 2 ranks): trains verify's config
(dropout off, verify.updates updates, float64) and stops after update K with a checkpoint, as a preempted
run does. `scripts/verify_equivalence.py resume=<run_dir>/checkpoints/step-K` then checks the whole run.

    float64_checkpoint.py <run_dir> <K> <hydra overrides...>
"""

import sys

from conftest import compose_cfg
from dist_gacc import teardown
from dist_gacc.build import build
from dist_gacc.loop import fit
from dist_gacc.preemption import Preempted
from dist_gacc.run import build_loop
from dist_gacc.state import TrainState
from dist_gacc.verify import verify_config, verify_dtype

run_dir, stop_after, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
job = build(verify_config(compose_cfg(*overrides, "trainer.log_with=none", f"output_dir={run_dir}")),
            dtype=verify_dtype)
state = TrainState(job.micro_batch_size, job.grad_accum_steps, total_updates=job.total_updates)
# The stop vote is cast before a window and acted on after it: update K is the last one trained and saved.
loop = build_loop(job, state, lambda: state.updates == stop_after - 1, evaluate_fn=None, keep_best=False)
try:
    fit(loop, state)
    raise SystemExit(f"trained all {state.updates} updates: K={stop_after} is not before the end")
except Preempted as stopped:
    print(f"checkpoint {stopped.path}")
teardown.shutdown(job.accelerator, models=[job.model])
