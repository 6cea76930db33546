"""Resuming on another number of processes (a preemptible cluster gives the job back with more or fewer GPUs).

What makes it exact: a window is defined by the effective batch, not by the world size (windows.py), and the
epoch's order is one seeded permutation sharded by batch, the same for any world size. So a checkpoint written
by W processes continues on W' with the same windows, once micro-batch x N x W' is the same effective batch
(resume.resume re-derives micro and N through oom.resplit). What depends on the world size is handled here:

- RNG states are saved per rank (random_states_<rank>.pkl). Accelerate's load_state restores the file of each
  rank that has one and silently skips the others; ranks that did not exist get a seed derived from the run's
  seed, their rank and the update (deterministic), and ranks that no longer exist are dropped (logged). With
  dropout on, the random streams therefore differ from the uninterrupted run; data order, updates, LR schedule
  and counters do not.
- Optimizer state under DDP is replicated (saved once, loaded as is). FSDP2's is sharded by rank but reshards
  on load: Accelerate loads a SHARDED_STATE_DICT checkpoint with torch.distributed.checkpoint (each rank reads the
  pieces of its new shards) and a FULL_STATE_DICT one as whole tensors that set_optimizer_state_dict shards
  again; tests/test_engines_cpu.py checks 2 ranks -> 1 process -> 2 ranks against the uninterrupted run for both.
  DeepSpeed's ZeRO partitions (and FSDP1's state, untested here) are refused, with the way out.
"""

from __future__ import annotations

import hashlib

from accelerate.logging import get_logger
from accelerate.utils import set_seed

from .errors import ConfigError

log = get_logger(__name__)


def check_world_change(engine: str, saved_world: int, world: int, path: str, fsdp_version: int | None = None) -> None:
    """Refuse a change of world size where the checkpoint's state is sharded by rank and not resharded on load."""
    if saved_world == world:
        return
    if engine == "deepspeed":
        raise ConfigError(f"resume={path}: written by {saved_world} DeepSpeed processes, resumed on {world}. DeepSpeed's "
                          "ZeRO checkpoints are partitioned by rank; convert it to a universal checkpoint first "
                          "(deepspeed.checkpoint.ds_to_universal) and load that, or resume on "
                          f"{saved_world} processes.")
    if engine == "fsdp" and fsdp_version != 2:
        raise ConfigError(f"resume={path}: written by {saved_world} FSDP processes, resumed on {world}. Only FSDP2 "
                          "(fsdp_version: 2, as conf/accelerate/fsdp.yaml) checkpoints are resharded here; resume "
                          f"on {saved_world} processes, or start a new run from model/.")


def rank_seed(seed: int, rank: int, update: int) -> int:
    """A deterministic seed for a rank that has no saved RNG state (from the run's seed, rank and update)."""
    digest = hashlib.sha256(f"dist-gacc/{seed}/{rank}/{update}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def restore_rng(accelerator, saved_world: int, seed: int, update: int) -> None:
    """After accelerator.load_state: seed the ranks it had no RNG state for; say which states were dropped."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if rank >= saved_world:
        set_seed(rank_seed(seed, rank, update))
    if world > saved_world:
        log.warning("resume on %d processes from a checkpoint of %d: ranks %s had no saved RNG state and start from "
                    "seeds derived from seed %d, their rank and update %d (dropout streams differ from an "
                    "uninterrupted run; data order and updates do not)", world, saved_world,
                    list(range(saved_world, world)), seed, update, main_process_only=True)
    elif world < saved_world:
        log.warning("resume on %d processes from a checkpoint of %d: the saved RNG states of ranks %s are dropped",
                    world, saved_world, list(range(world, saved_world)), main_process_only=True)
