#!/usr/bin/env python
"""data_scale: data preparation (read, count repeated texts, split, tokenize) against the number of rows.

A generated 3-class CSV (words drawn from the embedded Rotten Tomatoes snippets by frequency, snippet-like
lengths, 2 % duplicate rows and 0.5 % duplicates with another label), the MiniLM tokenizer, no tokenized
cache. Each size runs in a fresh process with its own, empty `datasets` cache, so the CSV is read and
converted to Arrow as a first run would; peaks of different sizes do not mix.

    python scripts/bench_data_scale.py --rows 10000,100000,1000000
    python scripts/bench_data_scale.py --quick     # 2000 and 4000 rows: checks the section, not the figures

Per size: read_split_s (data.load_splits), tokenize_s (data.tokenize, data.num_proc=auto),
peak_rss_mb_above_baseline: the process's peak resident memory (VmHWM) minus its resident memory after
importing and loading the tokenizer -- or, when tokenizing processes run (data.num_proc), the peak of
the process tree's summed PSS (sampled every 100 ms; PSS splits the copy-on-write pages a forked child
shares with its parent, so none is counted twice) minus the process's PSS at that point, if larger.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("negative", "neutral", "positive")
QUICK_ROWS = [2000, 4000]


# --- the generated CSV -----------------------------------------------------------------------------------

def generate_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` rows of text,label: words drawn by their frequency in the embedded Rotten Tomatoes snippets,
    lengths drawn from the snippets' word counts; 2 % of rows repeat an earlier row and 0.5 % repeat an
    earlier text with another label (every row is kept; each text stays in one split). Deterministic from `seed`."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "src"))
    from dist_gacc.data import rotten_tomatoes_pool

    texts = rotten_tomatoes_pool()[0]
    words = Counter(word for text in texts for word in re.findall(r"[a-z']+", text.lower()))
    vocab = list(words)
    p = np.array(list(words.values()), dtype=np.float64)
    lengths = np.array([len(text.split()) for text in texts])
    rng = np.random.default_rng(seed)
    n_words = rng.choice(lengths, size=rows)
    drawn = rng.choice(len(vocab), size=int(n_words.sum()), p=p / p.sum()).astype(np.int32)  # word ids
    labels = rng.integers(0, len(LABELS), size=rows)
    ends = np.cumsum(n_words)
    out = [" ".join(map(vocab.__getitem__, drawn[end - n:end].tolist())) for end, n in zip(ends, n_words)]
    repeat = rng.random(rows)
    sources = (rng.random(rows) * np.arange(rows)).astype(np.int64)  # an earlier row
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for i in range(rows):
            text, label = out[i], labels[i]
            if i and repeat[i] < 0.025:
                text = out[sources[i]]
                label = labels[sources[i]] if repeat[i] < 0.02 else (labels[sources[i]] + 1) % len(LABELS)
                out[i], labels[i] = text, label
            f.write(f"{text},{LABELS[label]}\n")
    os.replace(tmp, path)
    return path


# --- one size, in its own process --------------------------------------------------------------------------

def _proc_kb(path: str, field: str) -> float:
    """A `field:  N kB` line of a /proc file, in MiB (0 if the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _rss_mb() -> float:
    return _proc_kb("/proc/self/status", "VmRSS")


def _hwm_mb() -> float:
    return _proc_kb("/proc/self/status", "VmHWM")


def _pss_mb(pid: int | str = "self") -> float:
    """Proportional set size: pages shared between processes (a forked child's copy-on-write pages)
    are split between them, so the sum over a process tree counts each page once."""
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss")


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


class _TreePeak(threading.Thread):
    """The largest PSS of this process plus its descendants (the tokenizing processes), sampled."""

    def __init__(self, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.every_s, self.peak, self.done = every_s, 0.0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.done.is_set():
            self.peak = max(self.peak, _pss_mb() + sum(_pss_mb(kid) for kid in _children(me)))
            self.done.wait(self.every_s)


def measure_one(csv: str, rows: int, num_proc: int | str = "auto") -> dict:
    """In this (fresh) process: import, load the tokenizer, then time load_splits and tokenize."""
    import datasets

    import dist_gacc  # noqa: F401  (resolvers)
    from dist_gacc import data, models
    from dist_gacc.config import DataConfig, ModelConfig
    from dist_gacc.resolvers import embedded_model

    datasets.disable_progress_bars()
    cfg = DataConfig(name="csv", train_file=csv, validation_fraction=0.1, test_fraction=0.1, num_proc=num_proc)
    tokenizer = models.build_tokenizer(ModelConfig(name_or_path=embedded_model("all-MiniLM-L6-v2")), [], 128)
    tokenizer("warm up", truncation=True, max_length=cfg.max_length)
    baseline, baseline_pss = _rss_mb(), _pss_mb()
    sampler = _TreePeak()
    sampler.start()
    started = time.perf_counter()
    splits = data.load_splits(cfg, seed=42)
    split_s = time.perf_counter() - started
    encoded = data.tokenize(splits, tokenizer, cfg.max_length, cache_dir=None, num_proc=cfg.num_proc)
    total_s = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    above = max(_hwm_mb() - baseline, sampler.peak - baseline_pss)  # own peak, or the tree's
    tokens = sum(int(ds.data.column("input_ids").combine_chunks().values.__len__()) for ds in encoded.values())
    kept = sum(len(ds) for ds in splits.values())
    return {"rows": rows, "kept_rows": kept, "tokens_per_row": tokens / max(kept, 1),
            "num_proc_train": data.resolve_num_proc(cfg.num_proc, len(splits["train"])),
            "read_split_s": split_s, "tokenize_s": total_s - split_s, "total_s": total_s,
            "peak_rss_mb_above_baseline": above, "baseline_rss_mb": baseline}


def _run_child(csv: Path, rows: int, work: Path, num_proc: int | str) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="hf-datasets-", dir=work))  # a first read: no Arrow cache of the CSV
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": os.pathsep.join(
               [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", str(csv), str(rows), str(num_proc)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"data_scale at {rows} rows failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_data_scale(rows_list: list[int], work_dir: str | Path, quick: bool,
                       num_proc: int | str = "auto") -> list[dict]:
    """One row per size: seconds to read+count+split and to tokenize, peak memory above the baseline,
    and both per 100k rows (flat across sizes = linear). quick: QUICK_ROWS, whatever rows_list says."""
    work = Path(work_dir) / "data_scale"
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for rows in (QUICK_ROWS if quick else rows_list):
        csv = work / f"generated-{rows}.csv"
        if not csv.exists():
            generate_csv(csv, rows)
        row = _run_child(csv, rows, work, num_proc)
        row["s_per_100k_rows"] = row["total_s"] / rows * 1e5
        row["mb_per_100k_rows"] = row["peak_rss_mb_above_baseline"] / rows * 1e5
        out.append(row)
    return out


COLUMNS = ["rows", "kept_rows", "tokens_per_row", "num_proc_train", "read_split_s", "tokenize_s", "total_s",
           "peak_rss_mb_above_baseline", "s_per_100k_rows", "mb_per_100k_rows"]


def markdown(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,100000,1000000", help="comma list of row counts")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows: checks the section, not the figures")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "dist-gacc-bench"))
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--num-proc", default="auto", help="data.num_proc: auto or an integer")
    p.add_argument("--one", nargs=3, metavar=("CSV", "ROWS", "NUM_PROC"), help=argparse.SUPPRESS)  # per-size child
    args = p.parse_args()
    if args.one:
        num_proc = args.one[2] if args.one[2] == "auto" else int(args.one[2])
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), num_proc)))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from dist_gacc import machine

    num_proc = args.num_proc if args.num_proc == "auto" else int(args.num_proc)
    rows = section_data_scale([int(r) for r in args.rows.split(",")], args.work_dir, args.quick, num_proc)
    print(f"data.num_proc={num_proc}")
    print(f"machine: {machine.label(machine.describe())}\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
