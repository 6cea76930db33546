"""hydra/launcher=accelerate picks CPU ranks by itself when no CUDA device is visible (issue 11, point 9), and a
job past hydra.launcher.timeout_s leaves no process behind (issue 20, 4f)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CONF, running


@pytest.mark.parametrize("setting, cuda, expected", [
    (None, False, True),    # auto, no GPU: CPU ranks (GPU ranks would fail every job)
    (None, True, False),    # auto, a GPU: GPU ranks
    (True, True, True),     # forced CPU even with a GPU
    (False, False, False),  # forced GPU: the user's choice, even where it will fail
])
def test_cpu_setting_decides_or_follows_the_machine(setting, cuda, expected):
    from hydra_plugins.dist_gacc_launcher.accelerate_launcher import use_cpu

    assert use_cpu(setting, cuda) is expected


def test_launcher_cpu_defaults_to_auto():
    from hydra import compose, initialize_config_dir

    import dist_gacc  # noqa: F401  (registers hydra/launcher=accelerate)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=accelerate"], return_hydra_config=True)
    assert cfg.hydra.launcher.cpu is None and cfg.hydra.launcher.num_processes == 1

# The sweep itself runs without hydra.launcher.cpu: tests/test_experiments.py::two_process_sweep.


# A process that ignores SIGTERM and starts a child, in a session of its own (as torch's launcher starts its
# workers), that ignores it too; the parent prints the child's pid.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "parent":
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", ""], start_new_session=True)
    print(child.pid, flush=True)
time.sleep(600)
"""


def test_end_job_ends_every_process_even_in_other_sessions_and_ignoring_sigterm():
    from hydra_plugins.dist_gacc_launcher.accelerate_launcher import end_job

    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, "parent", STUBBORN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    try:
        assert running(proc.pid) and running(child) and os.getsid(child) == child != os.getsid(proc.pid)
        started = time.monotonic()
        assert end_job(proc, grace_s=1) == []
        assert not running(proc.pid) and not running(child)
        assert time.monotonic() - started < 10  # SIGTERM ignored: SIGKILL after the 1 s grace
    finally:
        for pid in (proc.pid, child):  # only if the test failed: never leave them running
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def job_pids(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (the sweep's folder: every process of its jobs)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read() and running(int(entry)):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_a_job_past_its_timeout_leaves_no_process_behind(tmp_path):
    """hydra.launcher.timeout_s ends every process of the job (torch starts its workers in their own sessions),
    with SIGTERM first: the trainer checkpoints its last update (resume=auto continues it). 10 s from the start of
    `accelerate launch` (~2.5 s to its workers here): the workers may still be loading their libraries (a slow
    machine), then they keep the signal and stop after one update."""
    from conftest import TINY, TRAIN

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        # 2 ranks, 1,600 updates: far longer than its 10 s.
        cmd = [sys.executable, str(TRAIN), "-m", "hydra/launcher=accelerate", "hydra.launcher.num_processes=2",
               "hydra.launcher.cpu=true", "hydra.launcher.timeout_s=10", *TINY, "trainer.micro_batch_size=2",
               "trainer.epochs=200", f"hydra.sweep.dir={tmp_path}"]
        proc = subprocess.run(cmd, cwd=CONF.parent, env=env, capture_output=True, text=True, timeout=300, check=False)
        left = job_pids(str(tmp_path))
        assert left == [], f"processes of the timed-out job still run: {left}"
    finally:
        for pid in job_pids(str(tmp_path)):  # only if the test failed: never leave a training running
            os.kill(pid, signal.SIGKILL)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "job #0 ran past hydra.launcher.timeout_s=10" in log and "none is left" in log
    assert "job #0 failed (exit timeout)" in log
    newest = max((tmp_path / "0" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert json.loads((newest / "trainer_state.json").read_text())["position"]["reason"] == "stop signal"
    assert "stopped by a signal after a finished update" in (tmp_path / "0" / "launch.log").read_text()


def test_a_swept_jobs_objective_is_the_score_of_the_model_in_model_dir(tmp_path):
    """As dist_gacc.main returns it: `eval` (the model in model/), not the best evaluation when model/ holds
    the final model (save_best=false)."""
    import json

    from hydra_plugins.dist_gacc_launcher.accelerate_launcher import _job_metric

    (tmp_path / "metrics.json").write_text(json.dumps({"best": {"f1": 0.68}, "eval": {"f1": 0.0}, "model": "final"}))
    assert _job_metric(tmp_path) == 0.0
    assert _job_metric(tmp_path / "absent") is None
