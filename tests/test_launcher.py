"""hydra/launcher=accelerate picks CPU ranks by itself when no CUDA device is visible (issue 11, point 9)."""

import os
import subprocess
import sys

import pytest

from conftest import CONF, ROOT, TINY, TRAIN, read_metrics


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


@pytest.mark.slow
def test_two_process_sweep_without_cpu_flag_runs_on_cpu_ranks(tmp_path):
    """No hydra.launcher.cpu and no ACCELERATE_USE_CPU, with every CUDA device hidden: before the
    auto default, accelerate launch --multi_gpu started GPU ranks that failed."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(TRAIN), "-m", "hydra/launcher=accelerate",
                           "hydra.launcher.num_processes=2", *TINY, "trainer.micro_batch_size=2",
                           "trainer.grad_accum_steps=2", "trainer.max_steps=2", "optim.lr=1e-3",
                           f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    launch_log = tmp_path / "0" / "launch.log"
    assert proc.returncode == 0, log[-3000:] + (launch_log.read_text()[-3000:] if launch_log.exists() else "")
    assert "(2 processes on CPU; hydra.launcher.cpu=null: no CUDA device visible)" in log
    m = read_metrics(tmp_path / "0")
    assert (m["world_size"], m["effective_batch_size"], m["optimizer_steps"]) == (2, 8, 2)
