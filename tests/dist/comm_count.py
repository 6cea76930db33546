"""Run under `accelerate launch` with 2 ranks: the same float64 training three ways, counting DDP's
gradient all-reduces with a comm hook.

    comm_count.py <out.json> <run_dir>

baseline          trainer.sync_each_batch=false (all-reduce once per window)
sync_each_batch   trainer.sync_each_batch=true (all-reduce after every micro-batch)
prescale          the DeepSpeed route without DeepSpeed: each micro-batch loss pre-scaled by N*W/count
                  before Accelerate's /N and DDP's mean, no gradient rescale afterwards
37 examples, micro-batch 3, N 2, 2 ranks: 7 micro-batches per rank in 4 windows (12, 12, 12, 1 examples).
"""

import json
import os
import sys

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from conftest import TINY, compose_cfg
from dist_gacc.engines import prescaled_engine, rescaled_engine
from dist_gacc.build import build
from dist_gacc.run import train_only
from dist_gacc.teardown import shutdown

out_path, run_dir = sys.argv[1], sys.argv[2]
MODELS = []  # the DDP models, released in order at the end (dist_gacc.teardown)
OVERRIDES = [*TINY, "data.max_train_samples=37", "trainer.micro_batch_size=3", "trainer.grad_accum_steps=2",
             "trainer.max_steps=4", "trainer.log_with=none"]


def trained(name: str, *overrides: str, prescale: bool = False) -> dict:
    job = build(compose_cfg(*OVERRIDES, *overrides, f"output_dir={run_dir}/{name}"), dtype=torch.float64)
    calls = [0]

    def counting_allreduce(state, bucket):
        calls[0] += 1
        return allreduce_hook(None, bucket)

    job.model.register_comm_hook(None, counting_allreduce)
    initial = {k: v.detach().clone() for k, v in job.accelerator.unwrap_model(job.model).state_dict().items()}
    # the job's exact engine pre-scales (unweighted); the baselines rescale after backward, as weighted runs do
    state = train_only(job, engine=prescaled_engine() if prescale else rescaled_engine())
    params = {k: v.detach().clone() for k, v in job.accelerator.unwrap_model(job.model).state_dict().items()}
    MODELS.append(job.model)
    return {"allreduces": calls[0], "params": params, "initial": initial, "losses": state.losses,
            "updates": state.optimizer_steps}


runs = {"baseline": trained("baseline"),
        "sync_each_batch": trained("sync_each_batch", "trainer.sync_each_batch=true"),
        "prescale": trained("prescale", prescale=True)}
base = runs["baseline"]["params"]
record = {name: {"allreduces": r["allreduces"], "updates": r["updates"], "losses": r["losses"],
                 "max_abs_diff": max((r["params"][k] - base[k]).abs().max().item() for k in base)}
          for name, r in runs.items()}
record["moved"] = max((base[k] - runs["baseline"]["initial"][k]).abs().max().item() for k in base)
if os.environ["RANK"] == "0":
    with open(out_path, "w") as f:
        json.dump(record, f)
shutdown(models=MODELS)
