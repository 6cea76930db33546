"""Sweeps and what users read from them: the accelerate launcher, summaries and plots, trackers,
early stopping, prediction."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import _FORK_SERVER, ROOT, TINY, TRAIN, launch, read_metrics, run_script

pytestmark = pytest.mark.slow

SMALL = [*TINY, "trainer.micro_batch_size=4", "trainer.epochs=2"]
# For sweeps over the precision: Hydra refuses a key given twice, and TINY pins trainer.mixed_precision=no.
SMALL_ANY_PRECISION = [o for o in SMALL if not o.startswith("trainer.mixed_precision=")]


def sweep(sweep_dir, *overrides, timeout=400):
    """`python scripts/train.py -m ...`, the sweep's parent a real process. Under hydra/launcher=accelerate each job's
    `accelerate launch` command, as the launcher builds it, runs through tests/forkclient.py
    (hydra.launcher.command_prefix): its ranks fork from the suite's fork server, with the environment Accelerate
    computes from the job's launch arguments. Tests of the processes themselves (signals, timeouts) run real jobs
    (tests/test_launcher.py)."""
    env = sweep_env()
    prefix = []
    if "hydra/launcher=accelerate" in overrides and forked_jobs():
        words = [sys.executable, str(ROOT / "tests" / "forkclient.py"), _FORK_SERVER.socket]
        prefix = ["hydra.launcher.command_prefix=[" + ",".join(f"'{w}'" for w in words) + "]"]
    return subprocess.run([sys.executable, str(TRAIN), "-m", *overrides, *prefix, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def sweep_env() -> dict:
    # No GPU visible and no ACCELERATE_USE_CPU: hydra/launcher=accelerate must pick CPU ranks by itself.
    return {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def forked_jobs() -> bool:
    """Whether the fork server can run a sweep's jobs: it serves their environment (CUDA_VISIBLE_DEVICES="" aside,
    which hides no device on a machine that has none) and this machine has no CUDA device."""
    import torch

    return torch.cuda.device_count() == 0 and _FORK_SERVER.serves(
        {k: v for k, v in sweep_env().items() if k != "CUDA_VISIBLE_DEVICES"})


@pytest.fixture(scope="module")
def two_process_sweep(tmp_path_factory):
    """One sweep of two 2-process jobs that differ in mixed precision (impossible inside one accelerate launch):
    fp16 first, which fails here (it needs CUDA: its ranks say so, so they were launched with fp16), then bf16,
    which must still run. Without hydra.launcher.cpu (auto: no CUDA device visible -> CPU ranks; before, every
    job failed). Returns (sweep dir, the sweep's CompletedProcess)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    proc = sweep(sweep_dir, "hydra/launcher=accelerate", "hydra.launcher.num_processes=2",
                 "trainer.mixed_precision=fp16,bf16", *SMALL_ANY_PRECISION)
    assert "(2 processes on CPU; hydra.launcher.cpu=null: no CUDA device visible)" in proc.stdout + proc.stderr
    return sweep_dir, proc


def test_launcher_runs_each_job_as_its_own_accelerate_launch(two_process_sweep):
    sweep_dir, _ = two_process_sweep
    # two precisions in one sweep, impossible in one process: job 0's ranks ran fp16 (and refused it on a CPU),
    # job 1's bf16
    assert "trainer.mixed_precision=fp16 needs a CUDA GPU" in (sweep_dir / "0" / "launch.log").read_text()
    m = read_metrics(sweep_dir / "1")
    assert m["mixed_precision"] == "bf16" and m["world_size"] == 2 and m["optimizer_steps"] == 16
    assert (sweep_dir / "1" / "launch.log").stat().st_size > 0


def test_failing_job_is_reported_and_the_sweep_goes_on(two_process_sweep):
    sweep_dir, proc = two_process_sweep
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    # (accelerate launch reports a failed worker as exit 1; the worker's own message is in the log)
    assert "job #0 failed (exit 1): trainer.mixed_precision=fp16" in log and str(sweep_dir / "0" / "launch.log") in log
    assert "trainer.mixed_precision=fp16 needs a CUDA GPU" in (sweep_dir / "0" / "launch.log").read_text()
    assert not (sweep_dir / "0" / "metrics.json").exists()
    assert read_metrics(sweep_dir / "1")["updates"] == 16  # the later job completed


@pytest.fixture(scope="module")
def one_process_sweep(tmp_path_factory):
    """`python scripts/train.py -m ...` with the basic launcher: two jobs in one process (forked: one process is
    the point), fp32 and bf16. Its sweep directory."""
    sweep_dir = tmp_path_factory.mktemp("basic-sweep")
    run_script(TRAIN, "-m", "trainer.mixed_precision=no,bf16", *SMALL_ANY_PRECISION, f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir


def test_summarize_writes_table_and_plots(one_process_sweep, tmp_path):
    run_script(ROOT / "scripts" / "summarize.py", one_process_sweep, "--out", tmp_path)  # (forked)
    table = pd.read_csv(tmp_path / "summary.csv")
    assert len(table) == 2 and set(table["setting"]) == {"trainer.mixed_precision=no", "trainer.mixed_precision=bf16"}
    assert list(table["effective_batch_size"]) == [4, 4] and list(table["updates"]) == [32, 32]
    assert table["best_val_f1"].between(0, 1).all() and table["test_f1"].between(0, 1).all()
    assert "| rotten_tomatoes |" in (tmp_path / "summary.md").read_text()
    for png in ("val_f1.png", "train_loss.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / png).stat().st_size > 10_000


def test_multirun_inside_accelerate_launch_stops_at_once(tmp_path):
    # 2 gloo ranks of `accelerate launch --multi_gpu ... train.py -m ...` (forked: what the ranks see is the
    # launcher's environment; the command line itself runs for real in test_resume and the sweep launcher)
    proc = launch(tmp_path / "run", "-m", "optim.lr=1e-3,2e-3", *SMALL, f"hydra.sweep.dir={tmp_path}", processes=2,
                  timeout=120, check=False)
    assert proc.returncode != 0 and "hydra/launcher=accelerate" in proc.stderr
    assert not list(tmp_path.glob("*/metrics.json"))


def test_basic_launcher_jobs_may_change_precision_in_one_process(one_process_sweep):
    assert [read_metrics(one_process_sweep / str(i))["mixed_precision"] for i in (0, 1)] == ["no", "bf16"]


def test_early_stopping_stops_at_the_expected_evaluation(tmp_run):
    # An LR of 1e-12 leaves predictions unchanged: F1 never improves after the first evaluation, so
    # patience 2 stops after the third evaluation (update 3) of 16 planned.
    launch(tmp_run, *SMALL, "optim.lr=1e-12", "optim.warmup_ratio=0", "trainer.eval_every=1",
           "trainer.early_stopping_patience=2")
    m = read_metrics(tmp_run)
    assert m["stopped_early"] and m["updates"] == 3 and len(m["history"]) == 3
    assert m["best"]["update"] == 1 and m["model"] == "best"
    assert 0.0 <= m["test"]["f1"] <= 1.0


def test_trackers_log_every_update_and_the_config(equivalent_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = equivalent_runs["2x2x2"]
    name = read_metrics(run_dir)["run_name"]  # the run directory's last two parts: one tracker project per run
    assert name == "_".join(run_dir.parts[-2:]) and [p.name for p in (run_dir / "tensorboard").iterdir()] == [name]
    events = EventAccumulator(str(run_dir / "tensorboard" / name)).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_second", "eval/f1",
                "eval/accuracy"):
        assert tag in tags, tag
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 17))
    assert [round(e.value, 5) for e in losses] == [round(x, 5) for x in read_metrics(run_dir)["train_losses"]]
    assert [e.step for e in events.Scalars("eval/f1")] == [8, 16]
    assert any("hparams" in str(p) or p.name.replace(".", "").isdigit() for p in (run_dir / "tensorboard" / name).iterdir())


def test_predict_prints_one_label_per_input(equivalent_runs, tmp_path):
    model = f"model={equivalent_runs['1x8x1'] / 'model'}"
    script = ROOT / "scripts" / "predict.py"
    out = run_script(script, model, "a gorgeous, moving film", "tedious", "fine").stdout.splitlines()
    assert len(out) == 3 and all(line.split("\t")[0] in ("rotten", "fresh") for line in out)
    assert [line.split("\t")[2] for line in out] == ["a gorgeous, moving film", "tedious", "fine"]
    stdin = run_script(script, model, "batch_size=2", input="one\ntwo\n\nthree\n").stdout.splitlines()
    assert len(stdin) == 3
