"""What a run shows while it trains: the progress bar, trackers, samples/s. Main process only."""

from __future__ import annotations

import time

from tqdm.auto import tqdm


class Telemetry:
    def __init__(self, accelerator, total_updates: int, done_updates: int, log_every: int, trackers: bool):
        self.accelerator, self.log_every, self.trackers = accelerator, log_every, trackers
        self.total_updates = total_updates
        self.bar = tqdm(total=total_updates, initial=done_updates, desc="updates",
                        disable=not accelerator.is_main_process)
        self.last_update_time = time.perf_counter()

    def update(self, state, result) -> None:
        now = time.perf_counter()
        if self.trackers:
            self.accelerator.log({"train/loss": result.loss, "train/lr": state.lrs[-1],
                                  "train/grad_norm": result.grad_norm,
                                  "train/samples_per_second": result.examples / max(now - self.last_update_time, 1e-9),
                                  "train/micro_batch_size": state.micro_batch_size}, step=state.updates)
        self.last_update_time = now
        self.bar.update(1)
        if state.updates % self.log_every == 0 or state.updates == self.total_updates:
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{state.lrs[-1]:.3g}")

    def evaluated(self, entry: dict, seconds: float) -> None:
        if self.trackers:
            figures = ("f1", "accuracy", "f1_macro", "f1_micro", "pearson", "spearman", "mse")
            self.accelerator.log({f"eval/{k}": entry[k] for k in figures if k in entry}, step=entry["update"])
        self.last_update_time += seconds  # samples/s counts training time only

    def close(self) -> None:
        self.bar.close()
