"""What Hydra's sweepers get: dist_gacc.main's return value for a composed config, printed as `objective <value>`
(tests/test_core_runs.py).

    objective.py <output_dir> [overrides...]
"""

import sys

from conftest import compose_cfg
from dist_gacc.run import main

print("objective", main(compose_cfg(*sys.argv[2:], "output_dir=" + sys.argv[1])))
