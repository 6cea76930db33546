"""BatchNorm under accumulation: its statistics are those of each micro-batch, never the effective batch.

Accumulation adds up gradients after the fact, but no forward pass ever sees the other micro-batches,
so a BatchNorm layer normalises with micro-batch statistics and updates its running statistics N
times per optimizer update. The trainer warns, refuses, or freezes them (trainer.batchnorm).
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import ConfigError


def _use_running_statistics(module, args) -> None:  # a forward pre-hook must return None
    module.eval()


BATCHNORM_WHY = (
    "BatchNorm normalises each forward pass with the mean and variance of that micro-batch "
    "({micro} examples per process), not of the effective batch of {effective}: accumulation adds up "
    "gradients after the fact, but no forward pass ever sees the other micro-batches, and the running "
    "statistics are updated {n} times per optimizer update from micro-batch statistics."
)


def apply_batchnorm_policy(model: torch.nn.Module, policy: str, micro: int, n: int, effective: int,
                           warn: Callable[[str], None]) -> list[str]:
    """Act on BatchNorm layers when accumulating (n > 1): warn, refuse, or freeze their statistics.

    Returns the names of the BatchNorm modules found.
    """
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or n == 1:
        return [name for name, _ in norms]
    why = BATCHNORM_WHY.format(micro=micro, effective=effective, n=n)
    names = ", ".join(name for name, _ in norms)
    if policy == "error":
        raise ConfigError(f"trainer.batchnorm=error: the model has BatchNorm layers ({names}) and "
                          f"grad_accum_steps={n}. {why} Use trainer.batchnorm=freeze to keep their running "
                          "statistics fixed, or warn to go on.")
    if policy == "freeze":
        for _, module in norms:
            # Normalise with the stored running statistics and never update them; the affine
            # weights still train. A pre-hook survives the model.train() calls around evaluation.
            module.register_forward_pre_hook(_use_running_statistics)
        warn(f"trainer.batchnorm=freeze: running statistics of {names} are fixed during training. {why}")
    else:
        warn(f"the model has BatchNorm layers ({names}) and grad_accum_steps={n}. {why} "
             "Set trainer.batchnorm=freeze to keep their running statistics fixed, or error to refuse.")
    return [name for name, _ in norms]
