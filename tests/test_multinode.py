"""Rehearsals of a multi-node job on one host: two `accelerate launch` machines (real gloo ranks, one
process each) against one process; the SLURM batch scripts' requeue rule (only exit 75) with shell stubs
standing in for `srun` and `scontrol` (SLURM is not installed here), around real training steps too."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, TRAIN, _free_port, load_params, max_abs_diff, read_metrics

TWO_MACHINES = [*TINY, "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2", "trainer.epochs=2"]


def machine(rank: int, port: int, cwd: Path, *overrides: str) -> subprocess.Popen:
    """One "machine" of a 2-machine job, the command docs/scaling.md documents (1 process per machine)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
           "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(TRAIN), *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_machines_on_one_host_equal_one_process(tmp_path, equivalent_runs):
    """Machine 0 and machine 1 run in folders of their own (no shared file system) with the default run
    directory, outputs/<rank 0's start time>: they must agree on it, and machine 1 must write nothing but
    what every rank writes, its RNG state in the epoch-end checkpoint."""
    port = _free_port()
    dirs = [tmp_path / f"machine-{rank}" for rank in (0, 1)]
    procs = []
    for rank, cwd in enumerate(dirs):
        cwd.mkdir()
        procs.append(machine(rank, port, cwd, *TWO_MACHINES))
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]

    runs = [list((cwd / "outputs").glob("*/*")) for cwd in dirs]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].relative_to(dirs[0]) == runs[1][0].relative_to(dirs[1])
    run0, run1 = runs[0][0], runs[1][0]
    assert files(run1) == ["checkpoints/.tmp-step-8/random_states_1.pkl"]  # Hydra's folder, and rank 1's RNG only
    assert {"metrics.json", "model/model.safetensors", ".hydra/config.yaml", "train.log",
            "checkpoints/step-8/random_states_0.pkl"} <= set(files(run0))
    assert "dist_gacc" not in outs[1][0] + outs[1][1]  # no log line from machine 1
    assert "[RANK 0] done: 16 updates" in outs[0][0]

    one, two = read_metrics(equivalent_runs["1x8x1"]), read_metrics(run0)
    assert (two["world_size"], two["optimizer_steps"], one["optimizer_steps"]) == (2, 16, 16)
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-6)
    assert max_abs_diff(load_params(run0), load_params(equivalent_runs["1x8x1"])) <= 1e-5


# --- the batch scripts' requeue rule, with stubs for the SLURM binaries --------------------------------

SRUN = """#!/bin/bash
# Stands in for srun: log the call, then run FAKE_STEP if set, else the step's command without srun's options:
# once, or (--ntasks=N, N > 1) N copies at once as srun starts one task per node (SLURM_NODEID, SLURM_PROCID
# 0..N-1), SIGTERM forwarded to each, srun's exit code the highest of theirs.
echo "srun $*" >> "${FAKE_SLURM_LOG}"
if [[ -n "${FAKE_STEP:-}" ]]; then exec bash -c "${FAKE_STEP}"; fi
ntasks=1
while [[ "$1" == --* ]]; do
    if [[ "$1" == --ntasks=* ]]; then ntasks="${1#--ntasks=}"; fi
    shift
done
if (( ntasks == 1 )); then exec "$@"; fi
pids=()
for ((i = 0; i < ntasks; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
highest=0
for pid in "${pids[@]}"; do
    while kill -0 "${pid}" 2>/dev/null; do wait "${pid}"; done
    wait "${pid}"; code=$?
    (( code > highest )) && highest=${code}
done
exit "${highest}"
"""
SCONTROL = """#!/bin/bash
# Stands in for scontrol: log the call; `show hostnames` names this host.
echo "scontrol $*" >> "${FAKE_SLURM_LOG}"
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; fi
"""
SCRIPTS = ["slurm_train.sbatch", "slurm_multinode.sbatch"]


@pytest.fixture
def slurm(tmp_path):
    """PATH with the stubs first, the SLURM variables of job 4242 and a run directory; returns (env, log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log.touch()
    env = {**os.environ, "FAKE_SLURM_LOG": str(log), "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2", "RUN_DIR": str(tmp_path / "run"),
           "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])}
    return env, log


def requeues(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("scontrol requeue")]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("code", [0, 1, 2, 3, 75, 137])
def test_batch_script_requeues_only_on_exit_75(slurm, script, code):
    env, log = slurm
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script), "trainer.epochs=1"],
                          env={**env, "FAKE_STEP": f"exit {code}"}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr  # the step's exit code is the job's
    assert requeues(log) == (["scontrol requeue 4242"] if code == 75 else []), proc.stdout
    assert "srun --kill-on-bad-exit=1" in log.read_text() and "trainer.epochs=1" in log.read_text()


def signalled_batch_script(script, env, step, started):
    """Run the batch script with FAKE_STEP `step`; once the step has touched `started`, SIGTERM the batch shell
    (SLURM's warning signal). Returns (process, stdout, stderr) after it ends."""
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / script)], env={**env, "FAKE_STEP": step},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not started.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc, out, err


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("on_term, requeued", [(75, True), (1, False), (0, False), (2, False)])
def test_batch_script_after_the_signal_requeues_only_a_step_that_stopped_with_75(slurm, tmp_path, script,
                                                                                   on_term, requeued):
    """SLURM's warning signal reaches the batch shell; the step gets SIGTERM and ends with `on_term`. A step
    ending 1 with no checkpoint saved for the signal failed: no requeue."""
    env, log = slurm
    started = tmp_path / "started"
    step = f"trap 'exit {on_term}' TERM; touch {started}; while :; do sleep 0.05; done"
    proc, out, err = signalled_batch_script(script, env, step, started)
    assert "signal received" in out
    assert proc.returncode == on_term, out + err
    assert requeues(log) == (["scontrol requeue 4242"] if requeued else []), out + err


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("stale", [False, True])
def test_batch_script_counts_a_launchers_exit_1_as_75_only_with_a_new_stop_checkpoint(slurm, tmp_path, script,
                                                                                      stale):
    """torch's launcher exits 1 while its workers save a checkpoint for the signal and exit 75: requeued, the
    job ends 75. A "stop signal" checkpoint already there before the step (an earlier preemption's) is no
    such evidence: the step's 1 stands, not requeued."""
    env, log = slurm
    state = Path(env["RUN_DIR"]) / "checkpoints" / "step-3" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    saved = tmp_path / "saved.json"  # what the workers write on the signal (the fields the rule reads)
    saved.write_text('{"position": {"reason": "stop signal"}}')
    if stale:
        state.write_text(saved.read_text())
    started = tmp_path / "started"
    on_term = "exit 1" if stale else f"cp {saved} {state}; exit 1"
    step = f"trap '{on_term}' TERM; touch {started}; while :; do sleep 0.05; done"
    proc, out, err = signalled_batch_script(script, env, step, started)
    assert proc.returncode == (1 if stale else 75), out + err
    assert requeues(log) == ([] if stale else ["scontrol requeue 4242"]), out + err


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_slurm_multinode_preempted_real_ranks_requeue_then_resume_to_the_same_model(slurm, equivalent_runs):
    """slurm_multinode.sbatch around real training: the srun stub starts scripts/slurm_node.sh once per node as
    srun does (2 "nodes" on this host, 1 process each: a real `accelerate launch --num_machines 2` per node,
    rendezvous on 127.0.0.1, one run directory). SIGTERM to the batch shell mid-run; torch's launchers exit
    nonzero while their workers checkpoint and exit 75, so the job ends 75 and requeues; the requeued job (same
    RUN_DIR, resume=auto) finishes with 0, not requeued, equal to the uninterrupted 2-rank run."""
    env, log = slurm
    env = {**env, "SLURM_GPUS_ON_NODE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run_dir = Path(env["RUN_DIR"])
    job = ["bash", str(ROOT / "scripts" / "slurm_multinode.sbatch"), *TWO_MACHINES, "trainer.checkpoint_every=1"]
    proc = subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (_steps(run_dir) and _steps(run_dir)[-1] >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err[-3000:]
    assert "node 0/2" in out and "node 1/2" in out  # slurm_node.sh on each node
    # torch's launchers exit nonzero but not 75 (1 when its workers were signalled too, 143 when only it was)
    assert re.search(r"the step exited (1|143) after the signal and its run checkpointed for it: counted as 75", out), out
    assert requeues(log) == ["scontrol requeue 4242"] and not (run_dir / "metrics.json").exists()

    again = subprocess.run(job, env=env, capture_output=True, text=True, timeout=300, check=False)  # the requeue
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert requeues(log) == ["scontrol requeue 4242"] and "exited 0: not requeued" in again.stdout
    assert list(run_dir.parent.rglob("metrics.json")) == [run_dir / "metrics.json"]  # one run, written once
    m = read_metrics(run_dir)
    assert m["resumed_from"] and (m["world_size"], m["optimizer_steps"]) == (2, 16)
    assert max_abs_diff(load_params(run_dir), load_params(equivalent_runs["2x2x2"])) <= 1e-6
