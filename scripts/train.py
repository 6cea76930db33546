"""Fine-tune a text classifier.

    python scripts/train.py [overrides]                       # one process: CPU or one GPU
    accelerate launch scripts/train.py [overrides]            # as `accelerate config` says (many GPUs)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no scripts/train.py [overrides]   # two CPU ranks

Overrides are Hydra's: e.g. trainer.grad_accum_steps=4 data=chinese_reviews model=tiny.
"""

import signal

# A stop signal (SIGTERM, SIGUSR1: preemption, a launcher's timeout) while the libraries below load (~5-8 s) is
# kept, not fatal: the run then stops after its first update with a checkpoint and exit 75, as for one during
# set-up (dist_gacc.preemption). Killed here it would exit 143, and a batch script requeues only exit 75.
KEPT_SIGNALS: list[int] = []
for _sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, lambda signum, frame: KEPT_SIGNALS.append(signum))

import hydra  # noqa: E402
from hydra._internal.utils import get_args_parser  # noqa: E402

import dist_gacc  # noqa: E402

MULTIRUN = get_args_parser().parse_known_args()[0].multirun
if not MULTIRUN:  # a sweep's parent loads them only if its launcher runs jobs in this process (Hydra's basic one)
    import dist_gacc.run  # noqa: E402,F401  (a run's libraries: loaded while stop signals are kept)

# Defaults again for Hydra's set-up (~0.3 s, as before); the run's StopSignals keeps them from its start, the kept
# ones included.
for _sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, signal.SIG_DFL)
if KEPT_SIGNALS and MULTIRUN:
    signal.raise_signal(KEPT_SIGNALS[-1])  # a sweep's parent runs no job itself: it ends, as it did before


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg):
    return dist_gacc.main(cfg, kept_signals=KEPT_SIGNALS)


if __name__ == "__main__":
    main()
