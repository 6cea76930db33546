"""Each rank writes what its launcher gave it to <out>.<RANK>.json: environment, argv, sys.path's head,
working folder, torch's threads and seed, its pid (tests/test_forkserver.py compares the fork server's ranks
with real ones).

    rank_env.py <out> [sleep]      # sleep: then wait to be killed
"""

import json
import os
import sys
import time

import torch

out = sys.argv[1]
with open(f"{out}.{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump({"env": dict(os.environ), "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
               "threads": torch.get_num_threads(), "seed": torch.initial_seed(), "rand": torch.rand(2).tolist(),
               "main": sys.modules["__main__"].__file__, "pid": os.getpid()}, f)
if sys.argv[2:] == ["sleep"]:
    time.sleep(3600)
