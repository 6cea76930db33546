"""scripts/gpu_check.sh without a GPU: its syntax, its plan (steps adapt to the GPU count, budgets within the
8-minute total), the report row every step leaves, and a dry run of every step's command on the CPU."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, ForkServer

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ONE_GPU = ["env", "equivalence-fp32", "equivalence-bf16", "fp16-gradscaler", "bert-base-bf16", "time-to-f1"]
TWO_GPUS = [*ONE_GPU[:4], "equivalence-2gpu", "fsdp-deepspeed-2gpu", *ONE_GPU[4:]]


def run(*args: str, gpus: int = 1, budget: int | None = None, timeout: int = 60,
        path_first: str | None = None) -> subprocess.CompletedProcess:
    env = script_env(gpus, path_first)
    if budget is not None:
        env.update(GPU_CHECK_BUDGET_S=str(budget), GPU_CHECK_BUDGET_SCALE="1")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def script_env(gpus: int, path_first: str | None = None) -> dict:
    """The script's environment (`path_first`: a folder put before the environment's bin/ on PATH)."""
    folders = [*([path_first] if path_first else []), os.path.dirname(sys.executable), os.environ["PATH"]]
    return {**os.environ, "GPU_CHECK_GPUS": str(gpus), "PATH": os.pathsep.join(folders)}


# The dry run's `python scripts/<x>.py`, `python - <<heredoc`, `python -m pytest`, `python -m dist_gacc.launch` and
# `accelerate launch ... scripts/<x>.py` fork from a fork server started with the environment the script gives its steps
# (tests/forkclient.py), so they skip ~5 s of imports per process (the forked pytest warns that 2 plugins the
# server had imported, Hydra's and anyio's, are not assert-rewritten); the rest (python -c, the benchmark's
# worker: sys.executable) is the real interpreter.
SHIMS = {
    "python": 'if [[ "$1" == - || "$1" == *.py && -f "$1" || "$1" == -m && "$2" == @(pytest|dist_gacc.launch) ]]; then\n'
              '    exec {python} {client} {socket} "$@"\nfi\n'
              'exec {python} "$@"\n',
    "accelerate": 'if [[ "$1" == launch ]]; then shift; exec {python} {client} {socket} -m accelerate.commands.launch "$@"; fi\n'
                  'exec {python} -m accelerate.commands.accelerate_cli "$@"\n',
}
# What scripts/gpu_check.sh --dry-run exports for its steps (on top of the caller's environment).
DRY_RUN_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def forking_shims(folder, gpus: int) -> ForkServer:
    """`python` and `accelerate` in `folder` that send scripts to a fork server of the dry run's environment."""
    folder.mkdir()
    server = ForkServer()
    server.start(env={**script_env(gpus, str(folder)), **DRY_RUN_ENV})
    assert not server.failed
    for name, body in SHIMS.items():
        shim = folder / name
        shim.write_text("#!/bin/bash\n" + body.format(python=sys.executable, client=ROOT / "tests" / "forkclient.py",
                                                        socket=server.socket))
        shim.chmod(0o755)
    return server


def rows(report: str) -> dict[str, list[str]]:
    """step name -> [result, wall s, budget s, summary] from the report's table."""
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in report.splitlines()
             if re.match(r"\| \d+ \|", line)]
    return {c[1]: c[2:] for c in cells}


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("gpus, steps, total", [(1, ONE_GPU, 375), (2, TWO_GPUS, 585)])
def test_plan_adapts_to_the_gpu_count(gpus, steps, total):
    proc = run("--dry-run", "--list", gpus=gpus)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()[:-1]] == steps
    assert proc.stdout.splitlines()[-1] == f"steps {len(steps)}, budgets {total} s, total budget 480 s, {gpus} GPU(s)"


def test_every_step_leaves_its_row_when_the_budget_is_spent(tmp_path):
    """A 10 s budget leaves under 20 s for every step: each is SKIPPED, each still has its row, exit code 1."""
    proc = run("--dry-run", str(tmp_path), gpus=2, budget=10)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = rows((tmp_path / "report.md").read_text())
    assert list(table) == TWO_GPUS
    assert all(r[0] == "SKIPPED" and "the total budget is spent" in r[3] for r in table.values())
    assert "0 of 8 steps passed" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_dry_run_runs_every_step_and_reports_it(tmp_path):
    """Every step's command on CPU ranks with tiny sizes (2 "GPUs": the 2-process steps too)."""
    server = forking_shims(tmp_path / "bin", gpus=2)
    try:
        proc = run("--dry-run", str(tmp_path / "report"), gpus=2, timeout=900, path_first=str(tmp_path / "bin"))
    finally:
        server.proc.kill()
    tmp_path = tmp_path / "report"
    report = (tmp_path / "report.md").read_text()
    table = rows(report)
    assert list(table) == TWO_GPUS, report
    assert proc.returncode == 0 and all(r[0] == "PASS" for r in table.values()), report + proc.stderr[-2000:]
    assert "Dry run on a CPU" in report and "8 of 8 steps passed" in report
    assert re.search(r"max \S+ vs tolerance 1\.0e-09: PASS", table["equivalence-fp32"][3])
    assert re.search(r"max \S+ vs tolerance 1\.0e-02: PASS", table["equivalence-bf16"][3])
    assert re.search(r"max \S+ vs tolerance 1\.0e-09: PASS", table["equivalence-2gpu"][3])
    assert "dry run, bf16 for fp16: 6 optimizer steps" in table["fp16-gradscaler"][3]
    assert re.search(r"tiny bf16 seq \d+, micro 8 x N 4: \d+ samples/s, .* MFU n/a", table["bert-base-bf16"][3])
    assert re.search(r"s to validation F1 0\.\d{4} \(test F1 0\.\d{4}\); precision no", table["time-to-f1"][3])
    assert "skipped" in table["fsdp-deepspeed-2gpu"][3]  # pytest -m gpu on a CPU: they skip with the reason
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"{i:02d}-{s}.log" for i, s in
                                                                      enumerate(TWO_GPUS, 1)]
