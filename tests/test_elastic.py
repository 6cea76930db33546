"""Elastic resume: a checkpoint written by W processes continues on W' with the same effective batch, the
same windows and the same math (real processes; SIGKILL; dropout 0 so parameters can be compared)."""

import shutil
import signal

import pytest

from conftest import ROOT, TINY, launch, launch_script, load_params, max_abs_diff, read_metrics
from dist_gacc.elastic import check_world_change, rank_seed
from dist_gacc.errors import ConfigError
from test_resume import signal_tree, start, steps, wait_for_checkpoint

# 64 examples, effective batch 8 (2 ranks x micro 2 x N 2, or 1 process x micro 2 x N 4), 2 epochs = 16 updates,
# a checkpoint after every update, all kept.
ELASTIC = [*TINY, "trainer.micro_batch_size=2", "trainer.effective_batch_size=8", "trainer.epochs=2",
           "trainer.checkpoint_every=1", "trainer.keep_checkpoints=20", "model.dropout=0.0"]


def test_seeds_for_new_ranks_are_deterministic_and_distinct():
    assert rank_seed(42, 1, 3) == rank_seed(42, 1, 3)
    assert len({rank_seed(42, r, u) for r in range(4) for u in range(4)}) == 16
    with pytest.raises(ConfigError, match="universal checkpoint"):
        check_world_change("deepspeed", 2, 4, "ckpt")
    with pytest.raises(ConfigError, match="FSDP processes, resumed on 1. Only FSDP2"):
        check_world_change("fsdp", 2, 1, "ckpt", fsdp_version=1)
    check_world_change("fsdp", 2, 1, "ckpt", fsdp_version=2)  # resharded on load (tests/test_engines_cpu.py)
    check_world_change("ddp", 2, 1, "ckpt")  # replicated state: allowed
    check_world_change("fsdp", 2, 2, "ckpt")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for processes in (1, 2):
        runs[processes] = tmp_path_factory.mktemp(f"elastic-full{processes}")
        launch(runs[processes], *ELASTIC, processes=processes)
    return runs


def same_run(resumed, reference, total=16):
    a, b = read_metrics(resumed), read_metrics(reference)
    assert a["updates"] == b["updates"] == total and a["optimizer_steps"] == total
    assert a["train_window_examples"] == b["train_window_examples"]  # the same windows
    assert a["train_losses"] == pytest.approx(b["train_losses"], abs=1e-5)
    assert a["lr_after_update"] == pytest.approx(b["lr_after_update"], rel=1e-9)  # the same schedule
    assert max_abs_diff(load_params(resumed), load_params(reference)) <= 1e-5
    # Adam barely sees a gradient's scale (and clipping hides it): compare each update's gradient norm too.
    assert len(a["grad_norms"]) == total and a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-5)
    return a


def from_checkpoint(tmp_path, source, step):
    """A run directory as a job killed right after checkpoint `step` leaves it."""
    run = tmp_path / "run"
    shutil.copytree(source / "checkpoints", run / "checkpoints")
    for later in (run / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    return run


@pytest.mark.slow
def test_two_ranks_killed_mid_epoch_resume_on_one_process_with_double_micro_batch(tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = start(run, *ELASTIC, processes=2)
    wait_for_checkpoint(run, 3, proc)
    signal_tree(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    last = steps(run)[-1]
    launched = launch(run, *ELASTIC, "trainer.micro_batch_size=4", "resume=auto", processes=1)
    m = same_run(run, uninterrupted[2])
    assert m["resumed_from"].endswith(f"step-{last}") and m["world_size"] == 1
    assert m["batch_size_changes"][-1] == {"update": last, "epoch": 0, "reason": "resume on 1 process(es) "
                                           "(checkpoint: 2)", "from": [2, 2], "to": [4, 2]}
    log = launched.stdout + launched.stderr
    assert "world size 2 -> 1, micro-batch 2 -> 4, N 2 -> 2 (effective batch 8)" in log
    assert "the saved RNG states of ranks [1] are dropped" in log


@pytest.mark.slow
@pytest.mark.parametrize("step, epoch", [(5, 0), (8, 1)])  # mid-epoch; at the epoch boundary
def test_one_process_resumes_on_two_ranks(tmp_path, uninterrupted, step, epoch):
    run = from_checkpoint(tmp_path, uninterrupted[1], step)
    launched = launch(run, *ELASTIC, "resume=auto", processes=2)
    m = same_run(run, uninterrupted[1])
    assert m["batch_size_changes"][-1] == {"update": step, "epoch": epoch, "reason": "resume on 2 process(es) "
                                           "(checkpoint: 1)", "from": [2, 4], "to": [2, 2]}
    assert "ranks [1] had no saved RNG state" in launched.stdout + launched.stderr


@pytest.mark.slow
def test_a_change_of_effective_batch_is_still_refused(tmp_path, uninterrupted):
    run = from_checkpoint(tmp_path, uninterrupted[2], 5)
    proc = launch(run, *ELASTIC, "trainer.effective_batch_size=16", "resume=auto", processes=1, check=False)
    assert proc.returncode == 2 and "effective_batch_size: checkpoint 8 -> now 16" in proc.stderr
    assert "world_size" not in proc.stderr  # the world size alone is not a difference
    assert not (run / "metrics.json").exists()


@pytest.mark.slow
def test_verify_float64_passes_through_a_world_change(tmp_path):
    """2 ranks train 3 updates in float64 and checkpoint; scripts/verify_equivalence.py resumes that checkpoint on
    1 process (micro 4 x N 2) and compares all 6 updates with one batch per window from the initial model."""
    config = [*TINY, "data.max_train_samples=37", "trainer.micro_batch_size=2", "trainer.effective_batch_size=8",
              "verify.updates=6"]  # windows of 8, 8, 8, 8, 5, then 8 of the second epoch
    first = tmp_path / "first"
    launch_script(ROOT / "tests" / "dist" / "float64_checkpoint.py", str(first), "3", *config, processes=2)
    proc = launch(tmp_path / "verify", *config, "trainer.micro_batch_size=4",
                  f"resume={first}/checkpoints/step-3", script=ROOT / "scripts" / "verify_equivalence.py")
    assert "world size 2 -> 1, micro-batch 2 -> 4, N 2 -> 2 (effective batch 8)" in proc.stdout + proc.stderr
    assert "windows of 8, 8, 8, 8, 5, 8 examples" in proc.stdout and "float64" in proc.stdout
    assert proc.stdout.strip().endswith("PASS")
