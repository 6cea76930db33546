"""Run under `accelerate launch` with 2 ranks: record, after every micro-batch's backward, whether the
two ranks' gradients are identical, and whether Accelerate called it a sync (boundary) step."""

import json
import os
import sys

import torch
from accelerate.utils import gather

from conftest import TINY, compose_cfg
from dist_gacc.run import run
from dist_gacc.loop import Hooks

out_path, run_dir = sys.argv[1], sys.argv[2]
records = []


def after_backward(model, sync):
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    both = gather(grads[None])  # collective: every rank calls it on every micro-batch
    records.append({"sync": bool(sync), "max_abs_diff": (both[0] - both[1]).abs().max().item()})


cfg = compose_cfg(*TINY, "trainer.micro_batch_size=2", "trainer.grad_accum_steps=3", "trainer.max_steps=3",
                  f"output_dir={run_dir}")
run(cfg, hooks=Hooks(after_backward=after_backward))
if os.environ["RANK"] == "0":  # run() has ended (and Accelerate has closed the process group)
    with open(out_path, "w") as f:
        json.dump(records, f)
