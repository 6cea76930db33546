"""Nothing lost: SIGKILL and resume, SIGTERM preemption, interrupted saves, corrupt checkpoints,
changed settings, rank failure, non-finite updates, bad data. Real processes and real signals."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (ROOT, TINY, TRAIN, _multi_gpu_args, first_rank_failure, launch, launch_script, load_params,
                      max_abs_diff, read_metrics, start_launch)
from dist_gacc import checkpoint

pytestmark = pytest.mark.slow

FAULTS = ROOT / "tests" / "dist" / "faults.py"
# 64 examples, effective batch 8 (2 ranks x micro 2 x N 2, or 1 rank x micro 2 x N 4), 2 epochs = 16 updates,
# a checkpoint after every update (the last two kept).
RESUMABLE = [*TINY, "trainer.micro_batch_size=2", "trainer.effective_batch_size=8", "trainer.epochs=2",
             "trainer.checkpoint_every=1", "model.dropout=0.1"]


def start(run_dir, *overrides, processes=2, real=True):
    """Launch train.py in its own process group, so the test can signal every process of the job. `real=False`:
    forked from the fork server (conftest.start_launch; output in <run_dir>.log): the ranks are real processes,
    children(job.pid), and the job process in the launcher's place reports their exit codes."""
    launcher = ["-m", "accelerate.commands.launch", *_multi_gpu_args(processes)] if processes > 1 else []
    cmd = [sys.executable, *launcher, str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if not real:
        return start_launch(cmd, env, TRAIN, f"{run_dir}.log")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def children(pid):
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def output(proc, run_dir) -> str:
    """What a launch start() made wrote to stderr (forked: its log, stdout and stderr together)."""
    if isinstance(proc, subprocess.Popen):
        return proc.communicate()[1]
    return Path(f"{run_dir}.log").read_text()


def signal_tree(pid, sig):
    """Signal a process and all its descendants (torch's launcher puts workers in their own sessions)."""
    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_for_checkpoint(run_dir, step, proc, timeout=120, note=""):
    deadline = time.time() + timeout
    while not (steps(run_dir) and steps(run_dir)[-1] >= step):  # step-N may already be pruned
        assert proc.poll() is None, f"run ended before step-{step} {note}: {output(proc, run_dir)[-3000:]}"
        assert time.time() < deadline, f"no checkpoint step-{step} {note}"
        time.sleep(0.01)


def steps(run_dir):
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for processes in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"full{processes}")
        launch(run_dir, *RESUMABLE, processes=processes)
        runs[processes] = run_dir
    return runs


def assert_same_run(resumed, reference, exact=True):
    a, b = read_metrics(resumed), read_metrics(reference)
    assert a["optimizer_steps"] == b["optimizer_steps"] == 16 and a["updates"] == 16
    assert a["lr_after_update"] == b["lr_after_update"] and a["final_lr"] == b["final_lr"]
    diff = max_abs_diff(load_params(resumed), load_params(reference))
    assert diff == 0.0 if exact else diff <= 1e-6
    assert a["train_losses"] == b["train_losses"]  # every update's logged loss, before and after the resume
    return a


@pytest.mark.parametrize("processes", [2, 1])
def test_sigkill_then_resume_auto_equals_uninterrupted(tmp_path, uninterrupted, processes):
    run_dir = tmp_path / "run"
    # The kill point is drawn at random, from a seed that is printed and named in every failure:
    # replay one with RESUME_KILL_SEED=<seed>.
    seed = int(os.environ.get("RESUME_KILL_SEED", random.randrange(1 << 30)))
    kill_at = random.Random(seed).randint(2, 7)  # epoch 1 has 8 updates: the resume crosses the epoch boundary
    replay = f"kill after update {kill_at}; replay with RESUME_KILL_SEED={seed}"
    print(replay)
    # Forked ranks, killed with kill -9 (the job process in the launcher's place survives to report them);
    # a real `accelerate launch` killed whole: tests/test_elastic.py
    proc = start(run_dir, *RESUMABLE, processes=processes, real=False)
    wait_for_checkpoint(run_dir, kill_at, proc, note=f"({replay})")
    for rank in children(proc.pid):
        signal_tree(rank, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    assert not (run_dir / "metrics.json").exists(), f"run finished before the kill ({replay})"
    last = steps(run_dir)[-1]
    launch(run_dir, *RESUMABLE, "resume=auto", processes=processes)
    try:
        m = assert_same_run(run_dir, uninterrupted[processes])
    except AssertionError as e:
        raise AssertionError(f"{e} ({replay})") from e
    assert m["resumed_from"].endswith(f"step-{last}"), (replay, m["resumed_from"])


def test_sigterm_checkpoints_the_current_update_and_resume_finishes(tmp_path, uninterrupted):
    """SIGTERM to every rank mid-epoch: they finish the update in progress, checkpoint it together and exit 75.
    Forked ranks (the job process in the launcher's place reports their codes); SIGTERM to every process of a
    real `accelerate launch`: tests/test_launcher.py (hydra.launcher.timeout_s) and tests/test_multinode.py (the
    SLURM script, whose requeued job resumes to the uninterrupted model)."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, *RESUMABLE, real=False)
    wait_for_checkpoint(run_dir, 3, proc)
    for rank in children(proc.pid):
        signal_tree(rank, signal.SIGTERM)
    assert proc.wait(timeout=60) != 0 and first_rank_failure(proc) == 75
    err = output(proc, run_dir)
    assert "stopped by a signal after a finished update" in err, err[-3000:]
    newest = run_dir / "checkpoints" / f"step-{steps(run_dir)[-1]}"
    record = json.loads((newest / "trainer_state.json").read_text())
    assert record["position"]["reason"] == "stop signal"
    assert record["state"]["updates"] == steps(run_dir)[-1] >= 3
    assert (newest / "random_states_0.pkl").exists() and (newest / "random_states_1.pkl").exists()
    assert not (run_dir / "metrics.json").exists()
    launch(run_dir, *RESUMABLE, "resume=auto", processes=2)
    assert_same_run(run_dir, uninterrupted[2])


def handles(pid: int, sig: int) -> bool:
    """Whether process `pid` has its own handler for `sig` (/proc's SigCgt mask: bit sig - 1)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (sig - 1) & 1)


def signal_while_loading(proc, sig=signal.SIGTERM) -> None:
    """Send `sig` as soon as scripts/train.py's first lines set its handler, while torch is still loading."""
    deadline = time.time() + 60
    while not handles(proc.pid, sig):
        assert proc.poll() is None and time.time() < deadline, "scripts/train.py never set its handler"
        time.sleep(0.005)
    with open(f"/proc/{proc.pid}/maps") as f:  # torch's library not yet mapped: the imports are under way
        assert "libtorch" not in f.read(), "the handler was set only after torch had loaded"
    proc.send_signal(sig)


def test_sigterm_while_the_libraries_load_stops_after_one_checkpointed_update(tmp_path):
    """One process, SIGTERM while torch and the others load (~5 s): kept, not fatal (it was: exit -15, which a
    batch script does not requeue). The run stops after its first update with a checkpoint and exit 75, as for a
    signal during set-up or training. A sweep's parent (-m) runs no job itself: it still ends on the signal."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, *RESUMABLE, processes=1)
    sweep = subprocess.Popen([sys.executable, str(TRAIN), "-m", "hydra/launcher=accelerate", *RESUMABLE,
                              f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    signal_while_loading(proc)
    signal_while_loading(sweep)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by a signal after a finished update" in err and "Rerun with resume=auto" in err
    assert steps(run_dir) == [1]
    record = json.loads((run_dir / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert record["position"]["reason"] == "stop signal" and record["state"]["updates"] == 1
    assert not (run_dir / "metrics.json").exists()
    sweep.communicate(timeout=60)
    assert sweep.returncode == -signal.SIGTERM and not (tmp_path / "sweep").exists()


def test_interrupted_save_leaves_previous_checkpoint_as_resume_point(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    with pytest.raises(AssertionError, match="script failed"):
        launch_script(FAULTS, str(run_dir), "save_crash", *RESUMABLE, processes=1)
    assert steps(run_dir) == [2, 3] and (run_dir / "checkpoints" / ".tmp-step-4").is_dir()
    launch(run_dir, *RESUMABLE, "resume=auto", processes=1)
    m = assert_same_run(run_dir, uninterrupted[1])
    assert m["resumed_from"].endswith("step-3")


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[1], run_dir)
    (run_dir / "metrics.json").unlink()
    assert steps(run_dir) == [14, 15]
    weights = run_dir / "checkpoints" / "step-15" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = launch(run_dir, *RESUMABLE, "resume=auto", processes=1)
    assert re.search(r"skipping checkpoint .*step-15: .*model.safetensors is corrupt", proc.stdout + proc.stderr)
    m = assert_same_run(run_dir, uninterrupted[1])
    assert m["resumed_from"].endswith("step-14")


def test_missing_resume_path_exits_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "step-7"
    proc = launch(tmp_path / "run", *RESUMABLE, f"resume={missing}", processes=1, check=False)
    assert proc.returncode == 2 and f"resume={missing}: no such checkpoint folder" in proc.stderr


def test_resume_with_changed_math_is_refused_unless_forced(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[1], run_dir)
    (run_dir / "metrics.json").unlink()
    proc = launch(run_dir, *RESUMABLE, "resume=auto", "optim.lr=2e-3", "trainer.effective_batch_size=16",
                  processes=1, check=False)
    assert proc.returncode == 2
    assert "lr: checkpoint 0.001 -> now 0.002" in proc.stderr
    assert "effective_batch_size: checkpoint 8 -> now 16" in proc.stderr
    assert not (run_dir / "metrics.json").exists()
    proc = launch(run_dir, *RESUMABLE, "resume=auto", "optim.lr=2e-3", "resume_force=true", processes=1)
    assert read_metrics(run_dir)["resumed_from"].endswith("step-15")


def test_rank_failure_ends_the_job_quickly_with_the_error(tmp_path):
    started = time.time()
    with pytest.raises(AssertionError) as failure:
        launch_script(FAULTS, str(tmp_path / "run"), "raise", *RESUMABLE, timeout=120, real=True)  # torchrun's end
    ended = time.time()
    text = str(failure.value)
    raised_at = float(re.search(r"injected failure on rank 1 in update 3 at t=([0-9.]+)", text).group(1))
    assert ended - raised_at < 30, f"job outlived the failure by {ended - raised_at:.1f} s"
    assert ended - started < 120


def test_non_finite_update_is_skipped_on_every_rank(tmp_path):
    base = [*TINY, "trainer.micro_batch_size=2", "trainer.effective_batch_size=8", "optim.scheduler=constant",
            "optim.warmup_ratio=0"]
    nan_run, reference = tmp_path / "nan", tmp_path / "ref"
    launch_script(FAULTS, str(nan_run), "nan", *base, "trainer.max_steps=4")
    launch(reference, *base, "trainer.max_steps=3", processes=2)
    m = read_metrics(nan_run)
    assert (m["updates"], m["optimizer_steps"], m["skipped_updates"]) == (4, 3, 1)
    assert m["lr_after_update"] == read_metrics(reference)["lr_after_update"] + [m["lr_after_update"][-1]]
    assert max_abs_diff(load_params(nan_run), load_params(reference)) == 0.0  # update 4 changed nothing


def test_too_many_non_finite_updates_abort(tmp_path):
    with pytest.raises(AssertionError) as failed:
        launch_script(FAULTS, str(tmp_path / "run"), "nan_always", *TINY, "trainer.max_bad_steps=2",
                      "trainer.max_steps=10", processes=1)
    assert "2 updates in a row had a non-finite loss or gradient (trainer.max_bad_steps=2)" in str(failed.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_data_stops_before_training_without_a_finished_looking_run(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\ngood,1\nbad,0\n")
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "model=tiny", "data=csv", f"data.train_file={bad}", check=False)
    assert proc.returncode == 2
    assert f"error: {bad}: no column 'text'" in proc.stderr
    assert "updates:" not in proc.stderr  # no training started
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model").exists()
    assert not (run_dir / "checkpoints").exists()


# RESUMABLE with every checkpoint kept, the best model kept (model/) and an evaluation every 2 updates. Measured
# (tiny BERT, binary F1): 0.0 at updates 2 and 4, 0.68 from update 6 on, so model/ is replaced after step-4.
KEPT = [*RESUMABLE, "trainer.keep_checkpoints=20", "trainer.save_best=true", "trainer.eval_every=2"]


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kept")
    launch(run_dir, *KEPT, processes=1)
    return run_dir


def abandoned_copy(kept, run_dir):
    """A finished run whose user goes back to an older checkpoint: its folder without metrics.json."""
    shutil.copytree(kept, run_dir)
    (run_dir / "metrics.json").unlink()
    return run_dir


def resume_and_stop(run_dir, *overrides):
    """Resume, then stop by a signal at the end of set-up: one update is trained and checkpointed (exit 75).
    Returns the run's output."""
    with pytest.raises(AssertionError, match=r"script failed \(75\)") as stopped:
        launch_script(FAULTS, str(run_dir), "term_setup", *KEPT, *overrides, processes=1)
    return str(stopped.value)


def test_resume_in_another_example_order_is_refused_and_changes_nothing(tmp_path, kept):
    """trainer.group_by_length decides every epoch's order: a mid-epoch resume in another order would train
    some examples twice and skip others."""
    run_dir = abandoned_copy(kept, tmp_path / "run")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = launch(run_dir, *KEPT, f"resume={run_dir}/checkpoints/step-4", "trainer.group_by_length=true",
                  processes=1, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "group_by_length: checkpoint None -> now True" in proc.stderr
    # Refused before anything moved: the newer checkpoints stay where they were.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert not (run_dir / "metrics.json").exists()


def test_resume_from_an_older_checkpoint_retires_the_newer_ones(tmp_path, kept):
    run_dir = abandoned_copy(kept, tmp_path / "run")
    output = resume_and_stop(run_dir, f"resume={run_dir}/checkpoints/step-4", "trainer.keep_checkpoints=2")
    retired = list((run_dir / "checkpoints").glob("retired-from-step-4-*"))
    assert len(retired) == 1
    assert sorted(int(p.name.split("-")[1]) for p in retired[0].glob("step-*")) == list(range(5, 16))
    assert (f"resuming from update 4: moved the newer checkpoints step-5, step-6, step-7, step-8, step-9, step-10, "
            f"step-11, step-12, step-13, step-14, step-15 (an abandoned continuation) aside into {retired[0]}") in output
    # The new step-5 is kept (pruning used to keep the abandoned step-14 and step-15 and delete it) ...
    assert steps(run_dir) == [4, 5]
    # ... and resume=auto continues the new run, not the abandoned one: the same run as uninterrupted.
    launch(run_dir, *KEPT, "resume=auto", processes=1)
    m = read_metrics(run_dir)
    assert m["resumed_from"].endswith("checkpoints/step-5")
    assert m["train_losses"] == read_metrics(kept)["train_losses"] and m["updates"] == 16
    assert max_abs_diff(load_params(run_dir), load_params(kept)) == 0.0


def test_resume_puts_back_the_best_model_its_checkpoint_describes(tmp_path, kept):
    """model/ travels with the checkpoints: after a resume it is the model of the resumed state's `best`,
    not the abandoned run's later best (which a replay that differs may never overwrite)."""
    from safetensors.torch import load_file

    step4 = json.loads((kept / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert step4["state"]["best"]["update"] == 2 and read_metrics(kept)["best"]["update"] == 6  # measured
    after_update_2 = load_file(str(kept / "checkpoints" / "step-2" / "model.safetensors"))
    run_dir = abandoned_copy(kept, tmp_path / "run")
    assert max_abs_diff(load_params(run_dir), after_update_2) > 1e-3  # model/: the abandoned run's best (update 6)
    resume_and_stop(run_dir, f"resume={run_dir}/checkpoints/step-4")
    assert max_abs_diff(load_params(run_dir), after_update_2) == 0.0
    # The checkpoint written after the resume (update 5, no evaluation) carries that model: a copy, not model/'s
    # file, but the very file of step-4's best_model/ (the same best: no second copy on disk).
    checkpoints, model = run_dir / "checkpoints", run_dir / "model"
    saved = checkpoints / "step-5" / "best_model" / "model.safetensors"
    assert saved.read_bytes() == (model / "model.safetensors").read_bytes()
    assert not os.path.samefile(saved, model / "model.safetensors")
    assert os.path.samefile(saved, checkpoints / "step-4" / "best_model" / "model.safetensors")
    record = json.loads((checkpoints / "step-5" / "trainer_state.json").read_text())
    assert record["state"]["best"]["update"] == 2 and "best_model/model.safetensors" in record["files"]

    # A user edits model/ in place (as an "r+b" write, or save_pretrained's config.json written with "w"):
    # the checkpoints' best models do not change, and step-5 still passes its manifest check.
    best = {p: p.read_bytes() for step in ("step-4", "step-5") for p in (checkpoints / step / "best_model").iterdir()}
    with open(model / "model.safetensors", "r+b") as f:
        f.seek(200)
        edited = bytes(b ^ 0xFF for b in f.read(16))
        f.seek(200)
        f.write(edited)
    with open(model / "config.json", "w") as f:
        f.write("{}")
    assert {p: p.read_bytes() for p in best} == best
    assert checkpoint.read_checkpoint(str(checkpoints / "step-5"))["state"]["updates"] == 5


def test_best_model_copies_are_shared_between_checkpoints_never_with_model(kept):
    """The finished run's checkpoints: best_model/ is never model/'s file (it may be edited in place); checkpoints
    whose best is the same evaluation share one copy (hard links), a new best is a new copy."""
    def best_file(step):
        return kept / "checkpoints" / f"step-{step}" / "best_model" / "model.safetensors"

    def best_update(step):
        return json.loads((kept / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())["state"]["best"]
    model = kept / "model" / "model.safetensors"
    assert read_metrics(kept)["best"]["update"] == 6 and steps(kept) == list(range(1, 16))
    assert not any(os.path.samefile(best_file(step), model) for step in range(2, 16))
    assert [best_update(step)["update"] for step in (2, 5, 6, 15)] == [2, 2, 6, 6]
    assert os.path.samefile(best_file(2), best_file(5)) and os.path.samefile(best_file(6), best_file(15))
    assert not os.path.samefile(best_file(5), best_file(6)) and best_file(15).read_bytes() == model.read_bytes()


def test_only_the_newest_abandoned_continuation_is_kept(tmp_path):
    """Three resumes, each from an older checkpoint than the newest: each retires the newer checkpoints, and the
    retired folders do not pile up (each holds whole checkpoints): the newest is kept, the older ones removed."""
    from accelerate import PartialState

    PartialState()  # Accelerate's logger needs its state
    root = tmp_path / "checkpoints"

    def write_steps(first, last):  # the checkpoints a continuation wrote
        for step in range(first, last + 1):
            (root / f"step-{step}").mkdir(parents=True)
            (root / f"step-{step}" / "model.safetensors").write_text(f"update {step} of continuation {first}")
    write_steps(1, 8)
    for resumed_from in (6, 4, 2):
        retired = checkpoint.retire_newer(str(tmp_path), resumed_from)
        write_steps(resumed_from + 1, 8)  # the new continuation reaches update 8 again
    folders = sorted(p.name for p in root.iterdir() if p.name.startswith("retired-"))
    assert folders == [os.path.basename(retired)] and folders[0].startswith("retired-from-step-2-")
    assert sorted(p.name for p in Path(retired).iterdir()) == [f"step-{s}" for s in (3, 4, 5, 6, 7, 8)]
    assert (Path(retired) / "step-8" / "model.safetensors").read_text() == "update 8 of continuation 5"
    assert steps(tmp_path) == list(range(1, 9))


def test_a_checkpoint_without_an_evaluation_removes_the_abandoned_best_model(tmp_path):
    from accelerate import PartialState

    from dist_gacc.checkpoint import restore_best_model

    PartialState()  # Accelerate's logger needs its state
    model, step = tmp_path / "model", tmp_path / "checkpoints" / "step-1"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"abandoned")
    step.mkdir(parents=True)
    restore_best_model(str(step), {"state": {"updates": 1, "best": None}}, str(model))
    assert not model.exists() and not (tmp_path / "model.old").exists()
    (step / "best_model").mkdir()
    (step / "best_model" / "model.safetensors").write_bytes(b"best")
    restore_best_model(str(step), {"state": {"updates": 1, "best": {"update": 1}}}, str(model))
    assert (model / "model.safetensors").read_bytes() == b"best" and not (tmp_path / "model.tmp").exists()
