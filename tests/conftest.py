"""Shared test set-up: offline Hugging Face libraries, Hydra compose(), CLI launches (1 or 2 ranks)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Offline before any Hugging Face import: a Hub name would otherwise retry for ~23 s before failing.
_HF_HOME = tempfile.mkdtemp(prefix="dist-gacc-hf-")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=_HF_HOME,
                  TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
                  DIST_GACC_CACHE_DIR=os.path.join(_HF_HOME, "dist_gacc"))  # the precision probe's cache

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN = ROOT / "scripts" / "train.py"

# A tiny BERT on a slice of the real Rotten Tomatoes data; dropout off so runs can be compared.
TINY = [
    "model=tiny", "model.dropout=0.0",
    "model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
    "data.max_train_samples=64", "data.max_eval_samples=37", "data.max_length=64",
    "trainer.log_every=1", "optim.lr=1e-3", "optim.warmup_ratio=0.25",
    # fp32 pinned: `auto` (the default) may pick bf16 on a CPU with native bf16, and these runs compare
    # parameters to 1e-5. tests/test_precision.py checks `auto` itself.
    "trainer.mixed_precision=no",
]


def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    import dist_gacc  # noqa: F401  (registers resolvers and hydra/launcher=accelerate, as train.py does)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def launch(run_dir: Path, *overrides: str, processes: int = 1, timeout: int = 300,
           check: bool = True, script: Path = TRAIN, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run scripts/train.py (or another Hydra script) as users do: plain python for 1 process,
    real gloo ranks under accelerate launch otherwise. `env` adds to (or replaces) the defaults."""
    if processes == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([*cmd, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch_script(script: Path, *args: str, processes: int = 2, timeout: int = 300):
    """Run a test helper script: plain python for 1 process, else `accelerate launch` with real CPU ranks."""
    cmd = [sys.executable, str(script), *args] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch_config(run_dir: Path, config: str, *overrides: str, env: dict | None = None, timeout: int = 300,
                  script: Path = TRAIN, launch_args: tuple = ()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file conf/accelerate/<config>.yaml` as the README shows it.
    `env` replaces the defaults (ACCELERATE_USE_CPU=1 for real CPU ranks); the caller checks the result."""
    cmd, env = config_command(run_dir, config, *overrides, env=env, script=script, launch_args=launch_args)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def config_command(run_dir: Path, config: str, *overrides: str, env: dict | None = None, script: Path = TRAIN,
                   launch_args: tuple = ()) -> tuple[list[str], dict]:
    """launch_config's command line and environment (for a test that starts it and signals it)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(CONF / "accelerate" / f"{config}.yaml"),
           "--main_process_port", str(_free_port()), *launch_args, str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           **(env if env is not None else {"ACCELERATE_USE_CPU": "1"})}
    return [*cmd, *overrides, f"hydra.run.dir={run_dir}"], env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def load_params(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture
def tmp_run(tmp_path):
    return tmp_path / "run"


# The same effective batch of 8, split three ways (issue: accumulation equivalence).
SPLITS = {
    "1x8x1": dict(processes=1, micro=8, accum=1),
    "1x2x4": dict(processes=1, micro=2, accum=4),
    "2x2x2": dict(processes=2, micro=2, accum=2),
}


@pytest.fixture(scope="session")
def equivalent_runs(tmp_path_factory):
    """Three fp32 runs of 2 epochs (16 updates) on 64 examples: {name: run_dir}."""
    runs = {}
    for name, s in SPLITS.items():
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        launch(run_dir, *TINY, f"trainer.micro_batch_size={s['micro']}",
               f"trainer.grad_accum_steps={s['accum']}", "trainer.epochs=2", processes=s["processes"])
        runs[name] = run_dir
    return runs


# 64 examples, effective batch 16 (micro 4: N 4 on 1 process, N 2 on 2 ranks), 2 epochs = 8 updates.
EFF16 = [*TINY, "trainer.effective_batch_size=16", "trainer.micro_batch_size=4", "trainer.epochs=2",
         "trainer.log_with=none"]
EFF16_CKPT = ["trainer.checkpoint_every=1", "trainer.keep_checkpoints=20"]


@pytest.fixture(scope="session")
def eff16_runs(tmp_path_factory):
    """The EFF16 job on 1 process (a checkpoint after every update, all kept: a resume can start from any) and
    on 2 ranks: {processes: run_dir}. Shared, read-only, by every module whose reference run it is
    (exact accumulation, memory levers, the core resume), so it is trained once per session."""
    runs = {}
    for processes, extra in ((1, EFF16_CKPT), (2, [])):
        runs[processes] = tmp_path_factory.mktemp(f"eff16-{processes}") / "run"
        launch(runs[processes], *EFF16, *extra, processes=processes)
    return runs
