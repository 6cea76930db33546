"""Does the configured split compute the same updates as one big batch? Prints a table and PASS/FAIL.

    python scripts/verify_equivalence.py [overrides]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no scripts/verify_equivalence.py [overrides]

Takes the same config and overrides as train.py (dropout is switched off), plus verify.updates
and verify.tolerance. Exit code 0 on PASS, 1 on FAIL, 2 on bad input.
"""

import sys

import hydra

from dist_gacc.errors import UserError
from dist_gacc.verify import verify


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg):
    try:
        ok = verify(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
