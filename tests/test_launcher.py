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


def signalled_sweep(sweep_dir, sig, processes, *options):
    """A sweep of one long job (2 ranks, or 1 process) sent `sig` once the job has checkpointed an update,
    as a CI `timeout` (SIGTERM) or a closed terminal (SIGHUP) would. Returns (the sweep's exit code, its output,
    the job's processes still running then)."""
    from conftest import TINY, TRAIN

    env = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(TRAIN), *options, "-m", "hydra/launcher=accelerate",
           f"hydra.launcher.num_processes={processes}", *TINY, "trainer.micro_batch_size=2", "trainer.epochs=200",
           "trainer.checkpoint_every=1", "trainer.baseline=false", f"hydra.sweep.dir={sweep_dir}"]
    output = sweep_dir.parent / f"{sweep_dir.name}.out"
    try:
        with open(output, "w") as out:
            # SIGHUP as a terminal's shell leaves it: handled by default (under nohup the sweep would inherit it
            # ignored, and an ignored SIGHUP stays ignored)
            proc = subprocess.Popen(cmd, cwd=CONF.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
        deadline = time.time() + 240
        while not list((sweep_dir / "0" / "checkpoints").glob("step-*")):  # (the newest 2 are kept)
            assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        left = job_pids(str(sweep_dir))
    finally:
        for pid in job_pids(str(sweep_dir)):  # only if the test failed: never leave a training running
            os.kill(pid, signal.SIGKILL)
    return proc.returncode, output.read_text(), left


def check_ended_like_a_timeout(sweep_dir, code, output, left, sig):
    """The sweep died of `sig` after its job got SIGTERM in every process, checkpointed and ended: none is left."""
    assert left == [], f"processes of the job outlived the sweep: {left}\n{output[-3000:]}"
    assert code == -sig, output[-3000:]
    name = signal.Signals(sig).name
    assert f"job #0: the sweep got {name}: the job's processes were sent SIGTERM" in output and "none is left" in output
    newest = max((sweep_dir / "0" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert int(newest.name.split("-")[1]) >= 2  # one more update, finished after the signal
    assert json.loads((newest / "trainer_state.json").read_text())["position"]["reason"] == "stop signal"
    assert "stopped by a signal after a finished update" in (sweep_dir / "0" / "launch.log").read_text()


@pytest.mark.slow
def test_sigterm_to_the_sweep_ends_its_job_as_a_timeout_does(tmp_path):
    """A CI `timeout` signals the sweep's parent only; its job runs in a session of its own (one process here: the
    job's ranks are ended by the same code as a timeout's, which the 2-rank timeout test above runs)."""
    sweep_dir = tmp_path / "sweep"
    check_ended_like_a_timeout(sweep_dir, *signalled_sweep(sweep_dir, signal.SIGTERM, 1), signal.SIGTERM)


@pytest.fixture(scope="module")
def hangup_sweep(tmp_path_factory):
    """A closed terminal's SIGHUP to a sweep of one 1-process job, run with its own config: --config-dir (a folder
    of its own) and --config-name other (train.yaml with a run_name). (sweep dir, exit code, output, pids left)."""
    folder = tmp_path_factory.mktemp("hangup")
    (folder / "conf").mkdir()
    text = (CONF / "train.yaml").read_text()
    assert "\nrun_name: null\n" in text
    (folder / "conf" / "other.yaml").write_text(text.replace("\nrun_name: null\n", "\nrun_name: from-other-yaml\n"))
    sweep_dir = folder / "sweep"
    return (sweep_dir, *signalled_sweep(sweep_dir, signal.SIGHUP, 1, "--config-dir", str(folder / "conf"),
                                        "--config-name", "other"))


@pytest.mark.slow
def test_sighup_to_the_sweep_ends_its_job_as_a_timeout_does(hangup_sweep):
    sweep_dir, code, output, left = hangup_sweep
    check_ended_like_a_timeout(sweep_dir, code, output, left, signal.SIGHUP)


@pytest.mark.slow
def test_the_sweeps_config_dir_and_name_reach_its_jobs(hangup_sweep):
    """The job is the same script again: without the sweep's --config-dir/--config-name it would load train.yaml."""
    import yaml

    sweep_dir = hangup_sweep[0]
    assert yaml.safe_load((sweep_dir / "0" / ".hydra" / "config.yaml").read_text())["run_name"] == "from-other-yaml"


def test_the_sweeps_config_options_are_forwarded_in_any_spelling(tmp_path):
    from hydra_plugins.dist_gacc_launcher.accelerate_launcher import accelerate_command, config_options

    from dist_gacc.launch import Launch

    options = config_options(["-cn", "other", f"--config-dir={tmp_path}", "-m", "a=1", "hydra.launcher.cpu=true"])
    assert options == ["--config-dir", str(tmp_path), "--config-name", "other"]
    cmd = accelerate_command("train.py", ["a=1", "hydra.launcher.cpu=true"], "/run", Launch(2, cpu=True), options)
    assert cmd[cmd.index("train.py"):] == ["train.py", *options, "a=1", "hydra.run.dir=/run", "hydra.mode=RUN"]
