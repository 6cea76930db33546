"""Summarise a sweep directory into summary.md, summary.csv and PNG plots.

    python scripts/summarize.py multirun/2026-11-25/10-00-00 [--out docs/results]
"""

import argparse
from pathlib import Path

from dist_gacc.summary import summarize

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("sweep_dir", type=Path, help="the multirun directory holding one folder per job")
parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep directory)")
args = parser.parse_args()
print(summarize(args.sweep_dir, args.out).to_markdown(index=False, floatfmt=".4g"))
