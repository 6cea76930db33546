"""hydra/launcher=accelerate picks CPU ranks by itself when no CUDA device is visible (issue 11, point 9)."""

import pytest

from conftest import CONF


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
