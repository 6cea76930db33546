"""AdamW and an LR schedule sized in optimizer updates (not micro-batches, not per process)."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from .config import OptimConfig

# transformers' scheduler names; "constant" with warmup 0 is a plain constant.
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float, fused: bool = False):
    """AdamW; biases and LayerNorm weights (the 1-D tensors) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def warmup_updates(cfg: OptimConfig, total_updates: int) -> int:
    return round(cfg.warmup_ratio * total_updates)


def build_scheduler(optimizer, cfg: OptimConfig, total_updates: int):
    """The schedule advances once per optimizer update; `total_updates` counts updates."""
    return get_scheduler(
        SCHEDULES[cfg.scheduler],
        optimizer,
        num_warmup_steps=warmup_updates(cfg, total_updates),
        num_training_steps=total_updates,
    )
