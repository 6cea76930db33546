"""Fine-tune a text classifier.

    python scripts/train.py [overrides]                       # one process: CPU or one GPU
    accelerate launch scripts/train.py [overrides]            # as `accelerate config` says (many GPUs)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no scripts/train.py [overrides]   # two CPU ranks

Overrides are Hydra's: e.g. trainer.grad_accum_steps=4 data=chinese_reviews model=tiny.
"""

import hydra

import dist_gacc


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg):
    return dist_gacc.main(cfg)


if __name__ == "__main__":
    main()
