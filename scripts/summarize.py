"""Summarise a sweep directory into summary.md, summary.csv and PNG plots; with several seeds per
(dataset, setting) cell also summary_seeds.md / .csv (mean ± spread per cell, and which differences
between settings exceed the seed spread) and summary_seeds_comparisons.csv.

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
seeds = (args.out or args.sweep_dir) / "summary_seeds.md"
if seeds.exists():  # written (fresh) only when some cell has several seeds
    print()
    print(seeds.read_text(), end="")
