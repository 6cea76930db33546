"""Exact accumulation: ragged windows, a change of process count, OOM fallback, LR scaling, BatchNorm."""

import math

import pytest

from conftest import EFF16, ROOT, TINY, launch, launch_script, load_params, max_abs_diff, read_metrics
from dist_gacc.config import OptimConfig, TrainerConfig, batch_plan, scaled_lr
from dist_gacc.errors import ConfigError

RAGGED = [*TINY, "data.max_train_samples=37", "trainer.epochs=1"]


def _run(tmp_path_factory, name, overrides, processes=1):
    run_dir = tmp_path_factory.mktemp(name)
    launch(run_dir, *overrides, processes=processes)
    return run_dir


@pytest.fixture(scope="module")
def ragged_runs(tmp_path_factory):
    return {
        # 37 examples, micro 4 x N 3 x 2 processes: windows of 24 and 13 (3 repeated samples padded in).
        "2x4x3": _run(tmp_path_factory, "r243", [*RAGGED, "trainer.micro_batch_size=4",
                                                 "trainer.grad_accum_steps=3"], processes=2),
        "1x24x1": _run(tmp_path_factory, "r1241", [*RAGGED, "trainer.micro_batch_size=24"]),
        # 1 process x micro 3 x N 4: windows of 12, 12, 12, 1.
        "1x3x4": _run(tmp_path_factory, "r134", [*RAGGED, "trainer.micro_batch_size=3",
                                                 "trainer.grad_accum_steps=4"]),
        "1x12x1": _run(tmp_path_factory, "r1121", [*RAGGED, "trainer.micro_batch_size=12"]),
    }


# eff16_runs (conftest): the EFF16 job on 1 process and on 2 ranks, shared with other modules.


@pytest.mark.slow
@pytest.mark.parametrize("split, reference, steps", [("2x4x3", "1x24x1", 2), ("1x3x4", "1x12x1", 4)])
def test_ragged_windows_equal_one_batch_per_window(ragged_runs, split, reference, steps):
    a, b = read_metrics(ragged_runs[split]), read_metrics(ragged_runs[reference])
    assert a["optimizer_steps"] == b["optimizer_steps"] == steps
    assert a["train_examples_seen"] == b["train_examples_seen"] == 37  # repeats not counted
    assert max_abs_diff(load_params(ragged_runs[split]), load_params(ragged_runs[reference])) <= 1e-5
    assert a["train_losses"] == pytest.approx(b["train_losses"], rel=1e-6)
    # Every update's gradient (norm before clipping; measured within 1.4e-7), the short last window
    # included: plain loss/N gets that window's gradient wrong (4x too small for 1x3x4, see below).
    assert len(a["grad_norms"]) == steps and a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-5)


@pytest.mark.slow
def test_naive_divide_by_n_gets_ragged_windows_wrong(tmp_path, ragged_runs):
    """The same split with Accelerate's plain loss/N: the test above would catch it.

    Windows of 12, 12, 12, 1: on the 3 full windows mean/N over 4 micro-batches of 3 is the mean of
    12, so the first 3 gradients agree; the last window is 1 example in 1 micro-batch, whose mean
    Accelerate still divides by N = 4: a gradient exactly 4 times too small."""
    naive = tmp_path / "naive"
    launch(naive, *RAGGED, "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
           "trainer.loss_normalisation=naive")
    assert max_abs_diff(load_params(naive), load_params(ragged_runs["1x12x1"])) > 1e-4
    wrong, exact = read_metrics(naive)["grad_norms"], read_metrics(ragged_runs["1x12x1"])["grad_norms"]
    assert len(wrong) == len(exact) == 4
    assert wrong[:3] == pytest.approx(exact[:3], rel=1e-5)
    assert wrong[3] == pytest.approx(exact[3] / 4, rel=1e-4)  # measured: 0.2588 = 1.0351 / 4


@pytest.mark.slow
def test_effective_batch_gives_same_updates_on_1_and_2_processes(eff16_runs):
    one, two = read_metrics(eff16_runs[1]), read_metrics(eff16_runs[2])
    assert (one["grad_accum_steps"], two["grad_accum_steps"]) == (4, 2)
    assert one["effective_batch_size"] == two["effective_batch_size"] == 16
    assert one["optimizer_steps"] == two["optimizer_steps"] == 8
    assert max_abs_diff(load_params(eff16_runs[1]), load_params(eff16_runs[2])) <= 1e-5
    assert one["train_losses"] == pytest.approx(two["train_losses"], rel=1e-6)
    # Adam is nearly blind to a gradient's scale (and clipping to max_grad_norm=1 hides it): a wrong factor
    # shows in every update's gradient norm before clipping.
    assert len(one["grad_norms"]) == 8 and one["grad_norms"] == pytest.approx(two["grad_norms"], rel=1e-5)


@pytest.mark.slow
def test_oom_midway_on_one_rank_keeps_every_update(tmp_path, eff16_runs):
    run_dir = tmp_path / "oom"
    launch_script(ROOT / "tests" / "dist" / "faults.py", str(run_dir), "midway", *EFF16)
    m = read_metrics(run_dir)
    assert m["batch_size_changes"] == [{"update": 2, "epoch": 0, "reason": "out of memory", "from": [4, 2], "to": [2, 4]}]
    assert (m["final_micro_batch_size"], m["final_grad_accum_steps"]) == (2, 4)
    assert m["optimizer_steps"] == 8 and m["effective_batch_size"] == 16
    assert max_abs_diff(load_params(run_dir), load_params(eff16_runs[2])) <= 1e-5
    assert m["train_losses"] == pytest.approx(read_metrics(eff16_runs[2])["train_losses"], rel=1e-6)
    assert m["grad_norms"] == pytest.approx(read_metrics(eff16_runs[2])["grad_norms"], rel=1e-5)  # the scale too


@pytest.mark.slow
def test_verify_float64_passes_through_the_oom_fallback(tmp_run):
    """The float64 check (scripts/verify_equivalence.py) with rank 1 out of memory from update 3: the updates
    after the fallback (micro 2 x N 4) equal one batch per window to rounding."""
    proc = launch_script(ROOT / "tests" / "dist" / "faults.py", str(tmp_run), "verify-midway", *EFF16,
                         "verify.updates=4")
    assert "out of memory at update 2: micro-batch 4 x N 2 -> 2 x 4" in proc.stdout + proc.stderr
    assert "split: micro-batch 2 x N 4 x processes 2 = effective 16; 4 updates" in proc.stdout
    assert "float64" in proc.stdout and proc.stdout.strip().endswith("PASS")


@pytest.mark.slow
def test_auto_micro_batch_probes_down_and_keeps_the_effective_batch(tmp_path, eff16_runs):
    run_dir = tmp_path / "auto"
    overrides = [o for o in EFF16 if not o.startswith("trainer.micro_batch_size")]
    launch_script(ROOT / "tests" / "dist" / "faults.py", str(run_dir), "auto", *overrides,
                  "trainer.micro_batch_size=auto", "trainer.auto_micro_batch_cap=16", processes=1)
    m = read_metrics(run_dir)
    assert (m["micro_batch_size"], m["grad_accum_steps"], m["effective_batch_size"]) == (4, 4, 16)
    assert max_abs_diff(load_params(run_dir), load_params(eff16_runs[1])) <= 1e-5


def test_effective_batch_that_does_not_divide_names_the_numbers():
    with pytest.raises(ConfigError, match=r"effective_batch_size=30 is not divisible by "
                                          r"trainer.micro_batch_size=4 x world size 2 = 8"):
        batch_plan(TrainerConfig(effective_batch_size=30, micro_batch_size=4), 2, 4)
    assert batch_plan(TrainerConfig(effective_batch_size=32, micro_batch_size=4), 2, 4) == (4, 32)
    assert batch_plan(TrainerConfig(micro_batch_size=4, grad_accum_steps=3), 2, 4) == (3, 24)


def test_lr_scaling_rules():
    assert scaled_lr(OptimConfig(lr=2e-5, lr_scaling="linear", reference_batch_size=20), 60) == pytest.approx(6e-5)
    assert scaled_lr(OptimConfig(lr=2e-5, lr_scaling="sqrt", reference_batch_size=20), 60) == pytest.approx(
        2e-5 * math.sqrt(3))
    assert scaled_lr(OptimConfig(lr=2e-5), 60) == 2e-5
    with pytest.raises(ConfigError, match="optim.lr_scaling=linear needs optim.reference_batch_size"):
        OptimConfig(lr_scaling="linear")


@pytest.mark.slow
@pytest.mark.parametrize("rule, expected", [("linear", 6e-5), ("sqrt", 3.4641016e-5)])
def test_lr_in_effect_is_written_to_metrics(tmp_run, rule, expected):
    launch(tmp_run, *TINY, "trainer.micro_batch_size=20", "trainer.grad_accum_steps=3", "trainer.max_steps=1",
           "data.max_train_samples=60", "optim.lr=2e-5", f"optim.lr_scaling={rule}",
           "optim.reference_batch_size=20", "optim.warmup_ratio=0")
    m = read_metrics(tmp_run)
    assert m["effective_batch_size"] == 60 and m["lr"] == pytest.approx(expected, rel=1e-6)
    assert "lr in effect" in (tmp_run / "train.log").read_text()


VERIFY = ROOT / "scripts" / "verify_equivalence.py"


# The 2-rank pass (micro 4 x N 3 x 2 ranks, windows of 24 and 13): the README's own command, run as written in
# tests/test_readme_commands.py.


@pytest.mark.slow
def test_verify_equivalence_fails_for_naive_normalisation(tmp_run):
    proc = launch(tmp_run, *RAGGED, "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
                  "trainer.loss_normalisation=naive", script=VERIFY, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "windows of 12, 12, 12, 1 examples" in proc.stdout and proc.stdout.strip().endswith("FAIL")


@pytest.mark.slow
def test_oom_with_sync_each_batch_agrees_every_micro_batch_and_keeps_every_update(tmp_path, eff16_runs):
    """With sync_each_batch every backward all-reduces gradients: a vote held only at the window's end
    would meet a peer's gradient all-reduce and hang. Voting after every forward pass keeps it exact."""
    run_dir = tmp_path / "oom-sync-each"
    launch_script(ROOT / "tests" / "dist" / "faults.py", str(run_dir), "midway", *EFF16,
                  "trainer.sync_each_batch=true", timeout=180)
    m = read_metrics(run_dir)
    assert m["batch_size_changes"] == [{"update": 2, "epoch": 0, "reason": "out of memory", "from": [4, 2],
                                        "to": [2, 4]}]
    assert m["optimizer_steps"] == 8 and m["sync_each_batch"] is True
    assert max_abs_diff(load_params(run_dir), load_params(eff16_runs[2])) <= 1e-5


@pytest.mark.slow
def test_verify_equivalence_passes_with_length_grouped_batches(tmp_run):
    """The grouped order is drawn per effective batch, so the replayed windows are the trained ones."""
    proc = launch(tmp_run, *RAGGED, "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
                  "trainer.group_by_length=true", script=VERIFY, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "windows of 12, 12, 12, 1 examples" in proc.stdout and proc.stdout.strip().endswith("PASS")
