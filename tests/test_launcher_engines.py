"""The engine asked for is the engine that runs: a sweep through hydra/launcher=accelerate with a DeepSpeed or an
FSDP config file (hydra.launcher.extra_args, as the README shows) trains that engine in every job, on 2 real CPU
ranks, and says so in metrics.json (read from Accelerate's state after prepare); the model card's reproduce
command sets up the same engine again."""

import importlib.util
import os
import shlex
import sys

import pytest

from conftest import TINY, TRAIN, _free_port, read_metrics, run_config_command
from test_experiments import forked_jobs, sweep

pytestmark = pytest.mark.slow

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed (pip install -e '.[dev]')")
# engine: (config file, what metrics.json's engine_state must say besides the name)
ENGINES = {
    "deepspeed": ("deepspeed_zero2", {"distributed_type": "DEEPSPEED", "zero_stage": 2, "wrapper": "DeepSpeedEngine",
                                      "machines": 1}),
    "fsdp": ("fsdp", {"distributed_type": "FSDP", "fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT",
                      "wrapper": "FSDPBertForSequenceClassification", "machines": 1}),
}
PARAMS = [pytest.param("deepspeed", marks=needs_deepspeed), "fsdp"]
# Two jobs of one update each (16 examples, micro 4 x 2 ranks), differing in the learning rate.
SMALLEST = [*(o for o in TINY if not o.startswith(("data.max_train_samples=", "data.max_eval_samples=", "optim.lr="))),
            "data.max_train_samples=16", "data.max_eval_samples=8", "trainer.micro_batch_size=4", "trainer.max_steps=1",
            "trainer.baseline=false", "trainer.log_with=none", "optim.lr=1e-3,2e-3"]


@pytest.fixture(scope="module")
def engine_sweeps(tmp_path_factory):
    """engine -> (sweep dir, the sweep's CompletedProcess): each swept once, when a test first asks for it."""
    sweeps = {}

    def get(engine):
        if engine not in sweeps:
            sweep_dir = tmp_path_factory.mktemp(f"sweep-{engine}")
            config = f"conf/accelerate/{ENGINES[engine][0]}.yaml"
            sweeps[engine] = sweep_dir, sweep(sweep_dir, "hydra/launcher=accelerate", "hydra.launcher.num_processes=2",
                                              f"hydra.launcher.extra_args=[--config_file,{config}]", *SMALLEST)
        return sweeps[engine]
    return get


@pytest.mark.parametrize("engine", PARAMS)
def test_each_job_of_a_sweep_with_an_engine_file_runs_that_engine(engine, engine_sweeps):
    sweep_dir, proc = engine_sweeps(engine)
    assert proc.returncode == 0, proc.stderr[-3000:] + (sweep_dir / "0" / "launch.log").read_text()[-3000:]
    for job, lr in ((0, 1e-3), (1, 2e-3)):
        m = read_metrics(sweep_dir / str(job))
        assert (m["engine"], m["world_size"], m["optimizer_steps"], m["lr"]) == (engine, 2, 1, lr)
        assert m["engine_state"] == {"name": engine, **ENGINES[engine][1]}
    assert f"engine {engine} (2 processes on CPU" in proc.stdout + proc.stderr  # the sweep's log says so too
    if forked_jobs():  # hydra.launcher.command_prefix: the jobs ran under tests/forkclient.py
        assert "each job's accelerate launch runs under: " in proc.stdout + proc.stderr and "forkclient.py" in \
            proc.stdout + proc.stderr


def card_command(model_dir) -> tuple[dict, list[str]]:
    """(environment, words) of the reproduce command in model/README.md (the line after `git checkout`)."""
    block = (model_dir / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    words = shlex.split(next(line for line in block.splitlines() if not line.startswith("git checkout")))
    env = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


@pytest.mark.parametrize("engine", PARAMS)
def test_the_cards_reproduce_command_sets_up_the_same_engine(engine, engine_sweeps, tmp_path):
    """The card's command of job 1, run as written from the checkout (forked: the ranks get the environment
    Accelerate's own launcher code computes from these arguments; tests/forkserver.py), plus a free port (the
    default one may be taken by a parallel test) and a run directory."""
    sweep_dir, _ = engine_sweeps(engine)
    job = read_metrics(sweep_dir / "1")
    env, words = card_command(sweep_dir / "1" / "model")
    assert words[:4] == ["accelerate", "launch", "--config_file", f"conf/accelerate/{ENGINES[engine][0]}.yaml"]
    assert "--multi_gpu" not in words and "optim.lr=0.002" in words
    at = words.index("scripts/train.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *words[2:at], "--main_process_port", str(_free_port()),
           str(TRAIN), *words[at + 1:], f"hydra.run.dir={tmp_path / 'again'}"]
    proc = run_config_command(cmd, {**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = read_metrics(tmp_path / "again")
    assert again["engine_state"] == job["engine_state"] and again["engine"] == engine
    assert again["train_losses"] == pytest.approx(job["train_losses"], rel=1e-6)  # the same job
