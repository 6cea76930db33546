"""Stress the end of 2-rank CPU runs: K launches in a row, each with a timeout; counts runs that hang.

    python scripts/stress_teardown.py                       # 50 tiny 2-rank training runs (scripts/train.py)
    python scripts/stress_teardown.py -k 20 --timeout 60 --tight "--ending none"  # teardown_probe.py
    python scripts/stress_teardown.py -- trainer.log_with=none               # extra Hydra overrides

Issue 11, point 8: a finished 2-rank gloo run was once seen never to exit (see dist_gacc.teardown).
A launch that outlives --timeout is a hang: the stacks of the launcher and its ranks are saved with
gdb when it is installed and ptrace is allowed (run-K/hang-<pid>.txt), then they are killed. A launch
that exits but leaves a rank behind counts as a hang too (orphan). The tiny run is the
test suite's (model=tiny, 64 training examples, 2 updates); the run directories are kept under --out.
Prints one line per run and a summary: runs, finished, hung, failed, median and total seconds, CPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
        "data.max_train_samples=64", "data.max_eval_samples=37", "data.max_length=64",
        "trainer.micro_batch_size=4", "trainer.max_steps=2"]


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after the name: state ppid ...
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> set[int]:
    """The launcher's processes (its ranks run in sessions of their own, so follow parents)."""
    tree, found, todo = children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int, start: str) -> bool:
    """pid still runs and is the same process (same start time in /proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[21] == start
    except (OSError, IndexError):
        return False


def start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[21]
    except (OSError, IndexError):
        return None


def dump_stacks(pids: list[int], run_dir: Path) -> None:
    if not shutil.which("gdb"):
        return
    for pid in pids:
        try:
            out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 25"],
                                 check=False, capture_output=True, text=True, timeout=60)
            (run_dir / f"hang-{pid}.txt").write_text(out.stdout + out.stderr)
        except (OSError, subprocess.TimeoutExpired):
            pass


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def one_run(args, i: int, out: Path) -> tuple[str, float, str]:
    from dist_gacc.launch import Launch, free_port

    run_dir = out / f"run-{i}"
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = Launch(2, cpu=True, port=free_port())
    if args.tight is not None:
        cmd = launch.argv(ROOT / "scripts" / "teardown_probe.py", *shlex.split(args.tight))
    else:
        cmd = launch.argv(ROOT / "scripts" / "train.py", *TINY, *args.overrides, f"hydra.run.dir={run_dir}")
    env = launch.env({**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                      "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    started = time.perf_counter()
    seen: dict[int, str] = {}  # every rank process seen, with its start time
    with open(run_dir / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        rc = None
        while time.perf_counter() - started < args.timeout:
            for pid in descendants(proc.pid):
                if pid not in seen and (start := start_time(pid)):
                    seen[pid] = start
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
    seconds = time.perf_counter() - started
    if rc is None:
        left = [proc.pid, *sorted(descendants(proc.pid))]
    else:
        time.sleep(0.5)  # a rank the launcher left behind is still there after this
        left = [pid for pid, start in seen.items() if alive(pid, start)]
    if left:
        dump_stacks(left, run_dir)
        kill_all(left)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return "hung", seconds, "timed out" if rc is None else f"orphaned ranks {left}"
    if rc != 0:
        return "failed", seconds, f"exit {rc}"
    return "finished", seconds, ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", "--runs", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run before it counts as hung")
    ap.add_argument("--tight", metavar="ARGS", default=None,
                    help="launch scripts/teardown_probe.py with these arguments instead of a training run")
    ap.add_argument("--out", type=Path, default=None, help="where run directories go (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for scripts/train.py (after --)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="stress-teardown-"))
    what = (f"teardown_probe.py {args.tight}" if args.tight is not None
            else "train.py " + " ".join(TINY + args.overrides))
    print(f"{args.runs} two-rank launches of {what}; timeout {args.timeout:.0f} s; runs in {out}", flush=True)
    counts = {"finished": 0, "hung": 0, "failed": 0}
    times = []
    wall = time.perf_counter()
    for i in range(1, args.runs + 1):
        status, seconds, note = one_run(args, i, out)
        counts[status] += 1
        times.append(seconds)
        print(f"run {i:3d}  {status:8s}  {seconds:6.1f} s  {note}", flush=True)
    total = time.perf_counter() - wall
    print()
    print("| runs | finished | hung | failed | median s | max s | total s | CPU (nproc) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {args.runs} | {counts['finished']} | {counts['hung']} | {counts['failed']} | "
          f"{statistics.median(times):.1f} | {max(times):.1f} | {total:.0f} | "
          f"{cpu_model()} ({os.cpu_count()}) |")
    return 0 if counts["hung"] == 0 and counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
