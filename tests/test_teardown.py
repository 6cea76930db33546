"""The ordered end of a 2-rank gloo run (dist_gacc.teardown): without it a finished run can hang forever in
~ProcessGroupGloo (the main thread holds the GIL and joins a gloo worker that waits for the GIL). Real ranks."""

import re

import pytest

from conftest import ROOT, TINY, launch_script

pytestmark = pytest.mark.slow
FAULTS = ROOT / "tests" / "dist" / "faults.py"


@pytest.mark.parametrize("mode", ["ended", "verify-ended"])
def test_training_and_verify_release_the_ddp_reducer_before_the_group_ends(tmp_path, mode):
    """run() and verify() hand their DDP model to teardown.shutdown: on CPU ranks Accelerate does not keep the
    DDP wrapper in accelerator._models, so shutdown(acc) alone released nothing (verify hung 1 run in 8)."""
    proc = launch_script(FAULTS, str(tmp_path / "run"), mode, *TINY, "trainer.micro_batch_size=4",
                         "trainer.max_steps=1", "verify.updates=1", "trainer.log_with=none", timeout=120)
    lines = sorted(re.findall(r"rank \d: teardown released .*", proc.stdout))
    assert lines == [f"rank {r}: teardown released 1 DDP reducer(s); 0 still held after it" for r in (0, 1)]


def test_a_gloo_worker_that_needs_the_gil_at_the_end_does_not_hang_the_exit():
    """scripts/teardown_probe.py --gil-work: a gloo worker still needs the GIL while the main thread ends the
    run (with --ending none that hangs every time). After the ordered shutdown both ranks exit, and the group's
    worker threads are gone once its last owner is."""
    proc = launch_script(ROOT / "scripts" / "teardown_probe.py", "--ending", "shutdown", "--gil-work", timeout=60)
    ends = re.findall(r"probe rank (\d): gloo worker threads (\d+) -> (\d+) after destroy_process_group -> (\d+)",
                      proc.stdout)
    assert sorted(r for r, *_ in ends) == ["0", "1"]
    assert all(int(before) > 0 and final == "0" for _, before, _, final in ends)
