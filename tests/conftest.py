"""Shared test set-up: offline Hugging Face libraries, Hydra compose(), CLI launches (1 or 2 ranks)."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# One folder for the temporary files of this process and of every process it starts (TMPDIR: torch's launcher's
# torchelastic_* folders, the benchmark's work folders, the launches' output files), removed when this process
# ends: a full run once left ~3,000 folders in /tmp. The same root here as in the children (torch derives
# TORCHINDUCTOR_CACHE_DIR from it, and the fork server compares that variable); pytest's tmp_path folders stay
# under the usual root (PYTEST_DEBUG_TEMPROOT), the last 3 runs kept.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
SESSION_TMP = tempfile.mkdtemp(prefix="dist-gacc-tests-")
atexit.register(shutil.rmtree, SESSION_TMP, ignore_errors=True)
tempfile.tempdir = os.environ["TMPDIR"] = SESSION_TMP

# Offline before any Hugging Face import: a Hub name would otherwise retry for ~23 s before failing.
_HF_HOME = tempfile.mkdtemp(prefix="hf-home-")
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
    # The pool as measured figures below were taken on: the 12,752 distinct snippets (the 56 exact copies of
    # the file dropped; Rotten Tomatoes has no conflicting ones). tests/test_data_rows.py covers keeping them.
    "data.drop_duplicates=true",
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
           check: bool = True, script: Path = TRAIN, env: dict | None = None,
           real: bool = False) -> subprocess.CompletedProcess:
    """Run scripts/train.py (or another Hydra script) as users do: plain python for 1 process,
    real gloo ranks under accelerate launch otherwise. `env` adds to (or replaces) the defaults.

    The ranks come from the session's fork server (tests/forkserver.py: the same script, environment and ranks,
    without ~5 s of imports each); `real=True` runs the commands themselves, for tests about the processes
    (signals, kill -9, the launcher's command line). DIST_GACC_TEST_REAL=1 makes every launch real."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = _run(script, [*overrides, f"hydra.run.dir={run_dir}"], env, _multi_gpu_args(processes), timeout, real)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# Read by libraries when they are imported (the Hub's offline switch, thread counts, DeepSpeed's accelerator,
# the paths of tools), so a forked rank inherits the server's values: a launch that sets others runs for real.
IMPORT_TIME_ENV = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "DS_", "TORCH", "OMP_", "MKL_", "KMP_", "PYTHON",
                   "CUDA", "LD_", "XDG_", "PATH")


class ForkServer:
    """The client of tests/forkserver.py: started on the first launch() that can use it, ended with pytest."""

    def __init__(self):
        self.proc = None
        self.env = None
        self.failed = os.environ.get("DIST_GACC_TEST_REAL") == "1"
        self.set_by_imports = {}  # variables the server's imports set (a real process's imports set them too)

    def serves(self, env: dict) -> bool:
        if self.failed:
            return False
        if self.proc is None:
            self.start()
        return not self.failed and self.import_env(env) == self.import_env(self.env)

    def import_env(self, env: dict) -> dict:
        """The variables a forked rank must share with the server. PYTHONPATH may add entries (the rank puts them
        first on sys.path, as an interpreter would), so it is compared as the server's entries it keeps."""
        imports = self.set_by_imports  # equal whether a launch has them (after this process imported the same
        # libraries, e.g. DeepSpeed sets TORCHINDUCTOR_CACHE_DIR) or not: the rank's imports would set them
        shared = {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV) and k != "PYTHONPATH"
                  and not (k in imports and imports[k] == v)}
        server = self.env.get("PYTHONPATH", "").split(os.pathsep) if self.env else []
        return {**shared, "PYTHONPATH": [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p in server]}

    def start(self, env: dict | None = None) -> None:
        """`env`: the server's environment (default: launch()'s)."""
        if env is None:
            env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # launch()'s defaults
        folder = tempfile.mkdtemp(prefix="forkserver-")
        self.socket, self.env = os.path.join(folder, "socket"), env
        with open(os.path.join(folder, "server.log"), "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py"), self.socket],
                                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        atexit.register(self.proc.kill)
        lines = iter(self.proc.stdout.readline, "")  # libraries may print while they are imported
        ready = next((line for line in lines if line.startswith("ready ")), None)
        self.set_by_imports = json.loads(ready[len("ready "):]) if ready else {}
        if ready is None:  # the server could not import: run for real
            self.failed = True
            print(f"fork server failed to start; launches run for real (see {folder}/server.log)", file=sys.stderr)

    def run(self, cmd: list, script: Path, args: list, env: dict, launcher: list, timeout: float,
            input: str | None = None) -> subprocess.CompletedProcess:
        folder = tempfile.mkdtemp(prefix="launch-")
        out, err, stdin = (os.path.join(folder, name) for name in ("stdout", "stderr", "stdin"))
        if input is not None:
            with open(stdin, "w") as f:
                f.write(input)
        job = self.start_job(cmd, script, args, env, launcher, out, err, timeout, stdin if input is not None else None)
        try:
            job.wait(timeout)
        except subprocess.TimeoutExpired:
            raise subprocess.TimeoutExpired(cmd, timeout, _read(out), _read(err)) from None
        proc = subprocess.CompletedProcess(cmd, job.returncode, _read(out), _read(err))
        proc.first_failure = job.first_failure
        return proc

    def start_job(self, cmd: list, script: Path, args: list, env: dict, launcher: list, stdout: str, stderr: str,
                  timeout: float | None = None, stdin: str | None = None) -> "ForkedJob":
        """The job, started (output appended to the files; they may be one; stdin: a file, or /dev/null): its
        ForkedJob."""
        request = {"script": str(script), "args": args, "env": env, "cwd": str(ROOT), "launch_args": launcher,
                   "stdout": stdout, "stderr": stderr, "stdin": stdin}
        for path in (stdout, stderr):
            open(path, "a").close()
        return ForkedJob(cmd, self.socket, request, timeout)


class ForkedJob:
    """A running job of the fork server, as a Popen of its command would be: `pid` is the job process (torch's
    launcher's place: the ranks are its children; it leads its own process group), poll() and wait() give its
    exit code, and `first_failure` the first failed rank's (negative: the signal that ended it) once it has
    ended."""

    def __init__(self, cmd: list, server_socket: str, request: dict, timeout: float | None):
        import socket

        self.cmd, self.returncode, self.first_failure, self._buffer = cmd, None, None, b""
        self._conn = socket.socket(socket.AF_UNIX)
        self._conn.connect(server_socket)
        self._conn.sendall((json.dumps(request) + "\n").encode())
        self._conn.settimeout(timeout)
        try:
            self.pid = self._reply()["pgid"]
        except TimeoutError:
            raise subprocess.TimeoutExpired(cmd, timeout) from None

    def poll(self) -> int | None:
        import select

        if self.returncode is None and (b"\n" in self._buffer or select.select([self._conn], [], [], 0)[0]):
            self._ended(self._reply())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._ended(self._reply())
            except TimeoutError:
                os.killpg(self.pid, 9)  # as subprocess.run kills its child on a timeout
                raise subprocess.TimeoutExpired(self.cmd, timeout) from None
        return self.returncode

    def _reply(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = self._conn.recv(4096)
            if not chunk:  # the job process itself was killed: nobody is left to report
                raise RuntimeError(f"fork server job {getattr(self, 'pid', '?')} ended without a reply")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _ended(self, reply: dict) -> None:
        self.returncode, self.first_failure = reply["returncode"], reply["first_failure"]
        self._conn.close()


def _read(path: str) -> str:
    with open(path, errors="replace") as f:  # text=True's universal newlines
        return f.read()


_FORK_SERVER = ForkServer()


def launch_script(script: Path, *args: str, processes: int = 2, timeout: int = 300, real: bool = False):
    """Run a test helper script: plain python for 1 process, else `accelerate launch` with real CPU ranks.
    Through the fork server as launch() does; `real=True` for tests about the processes themselves."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = _run(script, list(args), env, _multi_gpu_args(processes), timeout, real)
    if proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _multi_gpu_args(processes: int) -> list[str]:
    """accelerate launch's arguments for `processes` gloo CPU ranks on this machine (none for one process):
    dist_gacc.launch's, as every launch the project writes."""
    from dist_gacc.launch import Launch

    if processes == 1:
        return []
    return Launch(processes, cpu=True, port=_free_port()).launcher_args()


def _run(script: Path, args: list, env: dict, launcher: list, timeout: float, real: bool,
         input: str | None = None) -> subprocess.CompletedProcess:
    """`python script args` (no launcher arguments) or `accelerate launch <launcher> script args`: forked from the
    fork server, or the command itself when `real` or when the server cannot serve `env`. `input`: its stdin."""
    cmd = [sys.executable, *(["-m", "accelerate.commands.launch", *launcher] if launcher else []), str(script), *args]
    if real or not _FORK_SERVER.serves(env):
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
    return _FORK_SERVER.run(cmd, script, args, env, launcher, timeout, input)


def run_script(script: Path, *args: str, input: str | None = None, timeout: float = 300,
               check: bool = True, env: dict | None = None, real: bool = False) -> subprocess.CompletedProcess:
    """`python script args` as a user runs a CLI (scripts/predict.py, ...), forked from the fork server like
    launch(); `input` is its stdin, `env` adds to the environment. With check, a failure raises with its output.
    `real=True` runs the command itself (tests of the command a user types)."""
    proc = _run(script, [str(a) for a in args], {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, [], timeout,
                real, input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch_config(run_dir: Path, config: str, *overrides: str, env: dict | None = None, timeout: int = 300,
                  script: Path = TRAIN, launch_args: tuple = (), real: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file conf/accelerate/<config>.yaml` as the README shows it.
    `env` replaces the defaults (ACCELERATE_USE_CPU=1 for real CPU ranks); the caller checks the result.
    Through the fork server as launch() is (the ranks get the environment Accelerate computes from the file);
    `real=True` for tests about the commands themselves or torch's launcher's output (its exit code report)."""
    cmd, env = config_command(run_dir, config, *overrides, env=env, script=script, launch_args=launch_args)
    return run_config_command(cmd, env, script, timeout, real)


def run_config_command(cmd: list, env: dict, script: Path = TRAIN, timeout: float = 300,
                       real: bool = False) -> subprocess.CompletedProcess:
    """Run config_command's launch: forked (Accelerate's environment for the file), or for real."""
    launcher, args = _split_command(cmd, script)
    return _run(script, args, env, launcher, timeout, real)


def _split_command(cmd: list, script: Path) -> tuple[list, list]:
    """[python, (-m accelerate.commands.launch, launcher args...,) script, args...] -> (launcher args, args)."""
    at = cmd.index(str(script))
    return (cmd[3:at] if cmd[1:3] == ["-m", "accelerate.commands.launch"] else []), cmd[at + 1:]


def start_launch(cmd: list, env: dict, script: Path, log: str, real: bool = False):
    """Start a launch (a command as config_command or _run build it) without waiting, its output appended to `log`:
    a ForkedJob from the fork server, or (`real`, or an environment it cannot serve) the Popen of the command, in a
    process group of its own. Either way `pid`'s children are the ranks, and poll()/wait() give the exit code."""
    if real or not _FORK_SERVER.serves(env):
        with open(log, "a") as out:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
    launcher, args = _split_command(cmd, script)
    return _FORK_SERVER.start_job(cmd, script, args, env, launcher, log, log)


def first_rank_failure(proc, output: str | None = None) -> int | None:
    """The exit code of the first rank of a multi-rank launch to fail (negative: the signal that ended it; the
    other ranks may then end by the launcher's SIGTERM): the fork server's report, or torch's launcher's "Root
    Cause" in `output` (default: the launch's stderr). None: no rank failed."""
    import re

    if hasattr(proc, "first_failure"):
        return proc.first_failure
    found = re.search(r"Root Cause[^=]*?exitcode\s*:\s*(-?\d+)", proc.stderr if output is None else output)
    return int(found.group(1)) if found else None


def config_command(run_dir: Path, config: str, *overrides: str, env: dict | None = None, script: Path = TRAIN,
                   launch_args: tuple = ()) -> tuple[list[str], dict]:
    """launch_config's command line (dist_gacc.launch's, the file's process count unless launch_args give one) and
    environment (for a test that starts it and signals it)."""
    from dist_gacc.launch import Launch

    launch = Launch(processes=None, cpu=True, config_file=str(CONF / "accelerate" / f"{config}.yaml"),
                    args=tuple(launch_args), mixed_precision=None, port=_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           **(env if env is not None else {"ACCELERATE_USE_CPU": "1"})}
    return launch.argv(script, *overrides, f"hydra.run.dir={run_dir}"), env


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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
    """Three fp32 runs of 2 epochs (16 updates) on 64 examples: {name: run_dir}. 2x2x2 is the README's 2-rank CPU
    command (`accelerate launch --config_file conf/accelerate/cpu_2proc.yaml`). All fork (tests/forkserver.py);
    real processes reproduce their numbers in tests/test_multinode.py (two real "nodes" of the SLURM script,
    preempted and requeued, 2x2x2 to 1e-6; two real machines, 1x8x1 to 1e-5)."""
    runs = {}
    for name, s in SPLITS.items():
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        split = [*TINY, f"trainer.micro_batch_size={s['micro']}", f"trainer.grad_accum_steps={s['accum']}",
                 "trainer.epochs=2"]
        if s["processes"] == 1:
            launch(run_dir, *split)
        else:
            proc = launch_config(run_dir, "cpu_2proc", *split)
            assert proc.returncode == 0, proc.stderr[-6000:]
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


# --- Two workers (pytest-xdist; `-n 2` in pyproject's addopts, `-n 0` for one process) --------------------------
# Most of the suite's time is one process on one of the two cores (a tiny run's imports, a 1-rank run, waits for
# signals and timeouts): measured CPU busy 64 % serial. A worker takes a whole test file at a time (its module
# fixtures' runs are made once), and the files that share a session fixture's runs go together; the costliest
# units first, so the last one to finish is short.
SHARED_RUNS = {  # session fixture -> the files that use it
    "eff16_runs": ("test_core_runs.py", "test_exact_accumulation.py", "test_memory_levers.py"),
    "equivalent_runs": ("test_accumulation.py", "test_e2e.py", "test_engines.py", "test_experiments.py",
                        "test_multinode.py"),
}
_UNIT_OF_FILE = {file: fixture for fixture, files in SHARED_RUNS.items() for file in files}


def work_unit(nodeid: str) -> str:
    """The unit a test runs in: its file, or the shared fixture its file is grouped under."""
    file = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return _UNIT_OF_FILE.get(file, file)


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling, with work_unit as the scope. (Not --dist loadgroup: with pytest 9.2 xdist's group
    suffix on the node id no longer takes effect, measured: module fixtures ran on both workers.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunsScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SharedRunsScheduling(config, log)


def _shared_fixtures(item):
    """(name, definition) of this suite's module- and session-scoped fixtures the test uses."""
    for name in item.fixturenames:
        for fixture in item._fixtureinfo.name2fixturedefs.get(name, ()):
            if fixture.scope != "function" and getattr(fixture.func, "__module__", "").startswith(("conftest", "test_")):
                yield name, fixture


def _check_shared_runs(items) -> None:
    """A session fixture of this suite used in two units would make its runs twice: keep SHARED_RUNS whole."""
    units: dict[str, set] = {}
    for item in items:
        for name, fixture in _shared_fixtures(item):
            if fixture.scope == "session":
                units.setdefault(name, set()).add(work_unit(item.nodeid))
    split = {name: sorted(u) for name, u in units.items() if len(u) > 1}
    if split:
        raise pytest.UsageError(f"tests/conftest.py SHARED_RUNS: these session fixtures are used in several work "
                                f"units (add their files): {split}")


# Wall seconds of each unit on two workers (the sums of a full run's test durations on M4), for the longest-first
# order (with rough estimates alone, long files ran last while the other worker idled). Only the order depends on
# them; a unit missing here (a new file) is estimated by _cost.
UNIT_SECONDS = {"test_engines_cpu.py": 140, "equivalent_runs": 144, "test_readme_commands.py": 100, "test_bench.py": 79,
                "eff16_runs": 72, "test_launcher.py": 48, "test_resume.py": 47, "test_gpu_check.py": 35,
                "test_forkserver.py": 40, "test_launcher_engines.py": 24, "test_decoders.py": 12, "test_elastic.py": 18,
                "test_data_scale.py": 20, "test_tasks_runs.py": 12, "test_precision.py": 12, "test_regression_runs.py": 7,
                "test_baseline.py": 8, "test_data.py": 6, "test_teardown.py": 4, "test_config.py": 4,
                "test_regression.py": 5, "test_sync.py": 2, "test_summary.py": 2, "test_packing.py": 22}


def _cost(unit: str, items: list) -> float:
    """A unit's expected wall seconds, for longest-first order: measured (UNIT_SECONDS), else estimated from its
    tests (a slow test ~4 s, a fast one ~0.2 s, each module or session fixture's runs ~15 s: orders of magnitude
    measured in this suite, not a promise)."""
    if unit in UNIT_SECONDS:
        return UNIT_SECONDS[unit]
    fixtures = {(name, item.module.__name__ if f.scope == "module" else "") for item in items
                for name, f in _shared_fixtures(item)}
    return sum(4 if item.get_closest_marker("slow") else 0.2 for item in items) + 15 * len(fixtures)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # xdist's workers: every worker orders alike (the collections must match)
        return
    _check_shared_runs(items)
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(work_unit(item.nodeid), []).append(item)
    items[:] = [item for unit, its in sorted(units.items(), key=lambda kv: -_cost(*kv)) for item in its]
