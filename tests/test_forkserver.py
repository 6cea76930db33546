"""The fork server's ranks (tests/forkserver.py) are what the real commands give a rank: the suite's other
runs rely on it."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import (
    _FORK_SERVER,
    ROOT,
    ForkServer,
    config_command,
    launch_script,
    run_config_command,
    running,
)

pytestmark = pytest.mark.slow
RANK_ENV = ROOT / "tests" / "dist" / "rank_env.py"
# Differ by design or by run: the port is picked per launch; torchrun's agent hosts the store (the server's
# rank 0 does) and writes its error file; the server adds no NCCL or reference-counting knobs of its own.
DIFFERENT = {"MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
             "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHELASTIC_RUN_ID"}


def ranks(out, processes):
    return [json.loads(out.with_name(f"{out.name}.{r}.json").read_text()) for r in range(processes)]


@pytest.mark.parametrize("processes", [1, 2])
def test_forked_ranks_get_what_python_and_accelerate_launch_give(tmp_path, processes):
    real, forked = tmp_path / "real", tmp_path / "forked"
    launch_script(RANK_ENV, str(real), processes=processes, real=True)
    launch_script(RANK_ENV, str(forked), processes=processes)
    assert _FORK_SERVER.proc is not None and _FORK_SERVER.proc.poll() is None  # it served this launch
    for r, (a, b) in enumerate(zip(ranks(real, processes), ranks(forked, processes), strict=True)):
        assert b["env"].get("RANK") == a["env"].get("RANK") == (str(r) if processes > 1 else None)
        differ = {k for k in a["env"].keys() | b["env"].keys() if a["env"].get(k) != b["env"].get(k)}
        assert differ <= DIFFERENT, {k: (a["env"].get(k), b["env"].get(k)) for k in differ - DIFFERENT}
        assert a["argv"] == [str(RANK_ENV), str(real)] and b["argv"] == [str(RANK_ENV), str(forked)]
        for key in ("path0", "cwd", "threads", "main"):
            assert a[key] == b[key], key
        assert b["threads"] == 1 and b["path0"] == str(RANK_ENV.parent)
    # torch's seed: each process its own, as a fresh interpreter's (not the server's, shared by every rank)
    seeds = [rank["seed"] for rank in ranks(real, processes) + ranks(forked, processes)]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("config, env", [("deepspeed_zero2", {}), ("fsdp", {"DIST_GACC_FSDP_ON_CPU": "1"}),
                                         ("cpu_2proc", {"ACCELERATE_USE_CPU": "1"})])
def test_forked_config_file_ranks_get_what_accelerate_launch_gives(tmp_path, config, env):
    """`accelerate launch --config_file conf/accelerate/<config>.yaml --num_processes 2` (tests/test_engines_cpu.py's
    launches, the README's 2-rank CPU command): Accelerate's variables for the file (ACCELERATE_USE_DEEPSPEED, its
    ZeRO fields, FSDP's), torchrun's."""
    outs = {}
    for kind in ("real", "forked"):
        outs[kind] = tmp_path / kind
        cmd, full_env = config_command(outs[kind], config, str(outs[kind]), env={**os.environ, **env},
                                       script=RANK_ENV, launch_args=("--num_processes", "2"))
        assert kind == "real" or _FORK_SERVER.serves(full_env)  # no import-time variable differs: it is forked
        run_config_command(cmd, full_env, RANK_ENV, timeout=300, real=kind == "real").check_returncode()
    for r, (a, b) in enumerate(zip(ranks(outs["real"], 2), ranks(outs["forked"], 2), strict=True)):
        assert b["env"]["RANK"] == a["env"]["RANK"] == str(r)
        key = {"deepspeed_zero2": "ACCELERATE_USE_DEEPSPEED", "fsdp": "ACCELERATE_USE_FSDP"}.get(config)
        assert key is None or a["env"][key] == b["env"][key] == "true"
        assert b["env"]["WORLD_SIZE"] == a["env"]["WORLD_SIZE"] == "2"
        differ = {k for k in a["env"].keys() | b["env"].keys() if a["env"].get(k) != b["env"].get(k)}
        assert differ <= DIFFERENT, {k: (a["env"].get(k), b["env"].get(k)) for k in differ - DIFFERENT}
        assert [x.replace(str(outs["forked"]), str(outs["real"])) for x in b["argv"]] == a["argv"]
        for key in ("path0", "cwd", "threads", "main"):
            assert a[key] == b[key], key


def test_a_launch_past_its_timeout_is_killed_whole(tmp_path):
    """As subprocess.run(timeout=...) does: TimeoutExpired, and no rank is left running."""
    out = tmp_path / "sleeping"
    with pytest.raises(subprocess.TimeoutExpired):
        launch_script(RANK_ENV, str(out), "sleep", processes=2, timeout=8)
    pids = [rank["pid"] for rank in ranks(out, 2)]  # both had started (forked ranks write within a second)
    for _ in range(100):  # SIGKILL is delivered at once; init reaps the orphans a moment later
        alive = [pid for pid in pids if running(pid)]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive


def test_launches_before_and_after_this_process_imported_deepspeed_are_forked():
    """Importing DeepSpeed (as tests that load a model do) sets TORCHINDUCTOR_CACHE_DIR and
    PYTORCH_NVML_BASED_CUDA_CHECK in this process: later launches inherit them, earlier ones lacked them, and a
    real rank's own imports set the same, so either way is forked (measured: they had made ~20 launches of
    tests/test_engines_cpu.py run for real). A server of its own, started with this process's environment as it
    was before DeepSpeed's import (the session's may have started after it)."""
    import deepspeed  # noqa: F401
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()  # what DeepSpeed's import calls (sets TORCHINDUCTOR_CACHE_DIR), even if it was imported before
    after = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # launch()'s
    before = {k: v for k, v in after.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK")}
    server = ForkServer()
    try:
        server.start(env=before)
        assert server.proc.poll() is None and not server.failed
        assert server.set_by_imports["TORCHINDUCTOR_CACHE_DIR"] == after["TORCHINDUCTOR_CACHE_DIR"]
        assert server.set_by_imports["PYTORCH_NVML_BASED_CUDA_CHECK"] == after["PYTORCH_NVML_BASED_CUDA_CHECK"]
        assert server.serves(before) and server.serves(after)
        assert not server.serves({**after, "TORCHINDUCTOR_CACHE_DIR": "/elsewhere"})  # a value of the caller's own
    finally:
        if server.proc is not None:
            server.proc.kill()
            server.proc.wait()


def test_the_command_line_client_runs_a_launch_and_ends_it_when_signalled(tmp_path):
    """tests/forkclient.py (`accelerate launch` in gpu_check's dry run, port 0 as the script passes it): the ranks
    run forked (their output reaching the client's: the step summaries test_gpu_check reads); SIGTERM to the
    client, as `timeout` sends it, kills the job's ranks and exits 143."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    assert _FORK_SERVER.serves(env)  # started, and this environment is its
    out = tmp_path / "sleeping"
    client = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkclient.py"), _FORK_SERVER.socket,
                               "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                               "--num_machines", "1", "--main_process_port", "0", str(RANK_ENV), str(out), "sleep"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all(out.with_name(f"{out.name}.{r}.json").exists() for r in (0, 1)):
        assert client.poll() is None and time.time() < deadline, client.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # both have written their file (a partial read would fail below)
    pids = [rank["pid"] for rank in ranks(out, 2)]
    assert all(running(pid) for pid in pids)
    assert int(ranks(out, 2)[0]["env"]["MASTER_PORT"]) > 0  # port 0: one free port, the same for both ranks
    assert len({rank["env"]["MASTER_PORT"] for rank in ranks(out, 2)}) == 1
    client.terminate()
    client.communicate(timeout=30)
    assert client.returncode == 128 + 15
    for _ in range(100):
        alive = [pid for pid in pids if running(pid)]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive


def test_the_command_line_client_runs_python_dash_m_as_the_interpreter_does(tmp_path):
    """`forkclient.py <socket> -m module args` (gpu_check's dry run forks `python -m pytest` so) is `python -m
    module args`: the module runs as __main__, found from the working folder (first on sys.path), its file in
    sys.argv[0]."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    assert _FORK_SERVER.serves(env)
    client = [sys.executable, str(ROOT / "tests" / "forkclient.py"), _FORK_SERVER.socket]
    outs = {"real": tmp_path / "real", "forked": tmp_path / "forked"}
    for kind, head in (("real", [sys.executable]), ("forked", client)):
        subprocess.run([*head, "-m", RANK_ENV.stem, str(outs[kind])], cwd=RANK_ENV.parent, env=env, check=True,
                       capture_output=True, timeout=120)
    (a,), (b,) = ranks(outs["real"], 1), ranks(outs["forked"], 1)
    assert a["argv"] == [str(RANK_ENV), str(outs["real"])] and b["argv"] == [str(RANK_ENV), str(outs["forked"])]
    for key in ("path0", "cwd", "main", "threads"):
        assert a[key] == b[key], key
    assert b["path0"] == b["cwd"] == str(RANK_ENV.parent)
    differ = {k for k in a["env"].keys() | b["env"].keys() if a["env"].get(k) != b["env"].get(k)}
    assert not differ, {k: (a["env"].get(k), b["env"].get(k)) for k in differ}
