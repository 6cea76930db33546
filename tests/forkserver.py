"""A pre-imported launcher for the suite's training runs (tests/conftest.py `launch` starts it once a session).

    python tests/forkserver.py <socket path>

Each training process the suite starts used to spend ~5 s of its ~8 s importing torch, transformers, datasets,
evaluate, accelerate, DeepSpeed and Hydra. This server imports them once, then for each request forks a job
process (its own session, so a timeout can kill it whole) that forks the ranks: 1 rank is `python script
args...`; N ranks get the environment `accelerate launch --multi_gpu` or `--config_file` (DeepSpeed, FSDP)
computes (Accelerate's own validation and prepare_multi_gpu_env / prepare_deepspeed_cmd_env) plus what torchrun gives each worker (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).
A rank runs the script as `python script` would (runpy, __main__), with stdout/stderr on files, and exits
through the interpreter's shutdown steps (threads joined, atexit: logging's flush), then os._exit.

Fork is safe here because this process never initialises CUDA, a process group, OpenMP's pool (one thread:
OMP_NUM_THREADS=1 before torch is imported) or the tokenizers' thread pool; it checks CUDA before each fork.
Environment variables that libraries read at import time must match the server's, so the client falls back to
a real subprocess when they differ (conftest.IMPORT_TIME_ENV).

Protocol (one JSON line each way per connection): request {script, args, env, cwd, launch_args (none: plain
python), stdout, stderr, stdin (a file to read, or none: /dev/null), module (optional: `python -m module args`,
plain python only; script then names the module)}; replies {"pgid": n} once the job process runs (its pid: it leads its own session), then
{"returncode": n, "first_failure": the exit code of the first rank to fail (-N for a signal; torch's launcher's
"Root Cause": the others may then end by its SIGTERM's -15), or null}.
"""

import json
import os
import signal
import socket
import sys
import time

# Measured: the modules one tiny training run has in sys.modules at its exit, less what these import anyway.
PRELOAD = (
    "accelerate", "accelerate.commands.launch", "datasets", "evaluate", "hydra", "sklearn.metrics", "torch",
    "torch.distributed.run", "torch.distributed.algorithms.ddp_comm_hooks", "torch.utils.tensorboard",
    "tensorboard.plugins.hparams.metadata", "transformers", "transformers.models.bert.modeling_bert",
    "deepspeed",  # Accelerate's Accelerator imports it when it is installed
    "matplotlib.pyplot", "hydra._internal.logging_config", "omegaconf._impl", "pandas.io.formats.csvs",
    "xml.parsers.expat", "antlr4.LL1Analyzer",
    "dist_gacc", "dist_gacc.run", "dist_gacc.data", "dist_gacc.engines", "dist_gacc.verify",
)


# What importing DeepSpeed adds to os.environ (its __init__: PYTORCH_NVML_BASED_CUDA_CHECK=1). accelerate launch's
# deepspeed_launcher imports it before it copies os.environ for the ranks; here it was imported before the request.
DEEPSPEED_IMPORT_ENV = {}


def preload() -> None:
    """Import what the ranks would, so they import ~nothing."""
    import importlib
    import pkgutil

    import matplotlib

    matplotlib.use("Agg")  # as dist_gacc.metrics and summary do before they plot
    for name in PRELOAD:
        before = dict(os.environ)
        importlib.import_module(name)
        if name == "deepspeed":  # (nothing before it in PRELOAD imports it: measured)
            DEEPSPEED_IMPORT_ENV.update({k: v for k, v in os.environ.items() if k not in before})
    from hydra._internal import core_plugins  # Hydra imports each of its plugins' modules to discover them

    for m in pkgutil.iter_modules(core_plugins.__path__):
        importlib.import_module(f"{core_plugins.__name__}.{m.name}")
    import torch
    import transformers

    transformers.AutoModelForSequenceClassification  # noqa: B018  (resolves the lazy module)
    assert torch.get_num_threads() == 1, "OMP_NUM_THREADS=1 must be set before torch is imported"
    warm_caches()


def warm_caches() -> None:
    """Fill once the caches every rank would fill on its own (measured: a tiny 2-epoch forked run, 0.93 -> 0.76 CPU
    s, medians of 8): Hydra's and OmegaConf's parsers (ANTLR's DFA cache, re's) by one compose of conf/train.yaml,
    transformers' table of checkpoint conversions (built on a process's first save_pretrained / from_pretrained)
    and the embedded Rotten Tomatoes rows (dist_gacc.data reads its bz2 file once per process). Values only:
    what a rank computes from them is unchanged."""
    from hydra import compose, initialize_config_dir
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from dist_gacc import data

    data.rotten_tomatoes_pool()

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        compose(config_name="train", overrides=["model=tiny"])
    get_checkpoint_conversion_mapping("bert")


def rank_main(req: dict, env: dict, out: int, err: int) -> None:
    """The rank: the process `python <script> <args>` would be, from the point its imports were done."""
    import atexit
    import random
    import runpy
    import threading

    import numpy
    import torch

    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    stdin = os.open(req.get("stdin") or os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(req["cwd"])
    # A fresh interpreter's random states, each its own (measured: torch's too), not the server's.
    random.seed()
    numpy.random.seed()
    torch.seed()
    # sys.path as the interpreter builds it: the script's folder, then PYTHONPATH (entries the server's lacks
    # come first: the client sends only requests whose PYTHONPATH includes the server's), then the rest.
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in _SERVER_PYTHONPATH]
    module = req.get("module")  # `python -m module`: the working folder first on sys.path, as -m puts it
    sys.path[:1] = [os.getcwd() if module else os.path.dirname(os.path.abspath(req["script"])), *extra]
    sys.argv = [req["script"], *req["args"]]
    code = 0
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(req["script"], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (as the interpreter reports any uncaught exception)
        import traceback

        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # what Py_FinalizeEx does first: join non-daemon threads
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def rank_envs(req: dict) -> list[dict]:
    """Each rank's environment: the request's for plain `python script`; else what accelerate launch hands
    torchrun (its own code, for --multi_gpu or a config file), plus what torchrun gives each worker."""
    if not req["launch_args"]:
        return [req["env"]]
    os.environ.clear()
    os.environ.update(req["env"])  # Accelerate's prepare_*_env start from os.environ, as in accelerate launch
    os.chdir(req["cwd"])  # prepare_deepspeed_cmd_env adds the working folder to PYTHONPATH
    args, env = launcher_env(req)
    from torch.distributed.run import get_args_parser

    base = {**env,  # torchrun exports its default --signals-to-handle to the workers
            "TORCHELASTIC_SIGNALS_TO_HANDLE": get_args_parser().get_default("signals_to_handle")}
    n = args.num_processes
    port = args.main_process_port or _free_port()  # 0: any free port (torchrun's agent picks one)
    return [{**base, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0", "ROLE_RANK": str(r),
             "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(n), "WORLD_SIZE": str(n), "GROUP_WORLD_SIZE": "1",
             "ROLE_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none",
             "TORCHELASTIC_USE_AGENT_STORE": "False"} for r in range(n)]


def launcher_env(req: dict):
    """accelerate launch's launch_command up to torchrun: the same validation (it reads --config_file into the
    arguments) and environment (deepspeed_launcher's or multi_gpu_launcher's). Only single-machine torchrun
    launches are forked; the client sends no others."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args([*req["launch_args"], req["script"], *req["args"]])
    args, defaults, mp_from_config_flag = _validate_launch_command(args)
    if args.num_machines != 1 or args.cpu:
        raise ValueError("the fork server runs single-machine torchrun launches only")
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config.keys()) if defaults else []  # as launch_command sets them
        if mp_from_config_flag:
            fields.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        for key, value in DEEPSPEED_IMPORT_ENV.items():
            os.environ.setdefault(key, value)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        raise ValueError("the fork server runs --multi_gpu, DeepSpeed and FSDP launches only")
    return args, env


def job_main(conn: socket.socket, req: dict) -> None:
    """Fork the ranks and wait. As torchrun does: a failed rank stops the others; the code is then 1."""
    os.setsid()
    conn.sendall((json.dumps({"pgid": os.getpgid(0)}) + "\n").encode())
    code, first = 1, None
    try:
        envs = rank_envs(req)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND  # ranks share the files, as they share a launcher's
        out, err = os.open(req["stdout"], flags, 0o644), os.open(req["stderr"], flags, 0o644)
        pids = []
        for env in envs:
            pid = os.fork()
            if pid == 0:
                conn.close()
                rank_main(req, env, out, err)
            pids.append(pid)
        codes, first = wait_ranks(pids)
        code = codes[0] if len(codes) == 1 else (0 if not any(codes) else 1)
    except BaseException:  # noqa: BLE001  (the client reads the job's failure in its stderr)
        import traceback

        with open(req["stderr"], "a") as f:
            traceback.print_exc(file=f)
    finally:
        try:
            conn.sendall((json.dumps({"returncode": code, "first_failure": first}) + "\n").encode())
        finally:
            os._exit(0)


def wait_ranks(pids: list[int]) -> tuple[list[int], int | None]:
    """Each rank's exit code, and the first failed rank's (None: none failed)."""
    codes = {}
    first = None
    while len(codes) < len(pids):
        pid, status = os.wait()
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0:
            first = codes[pid]
            for other in pids:  # torchrun: SIGTERM to the rest, SIGKILL after its grace period (30 s)
                if other not in codes:
                    _signal(other, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while len(codes) < len(pids):
                done, status = os.waitpid(-1, os.WNOHANG)
                if done:
                    codes[done] = os.waitstatus_to_exitcode(status)
                elif time.monotonic() > deadline:
                    for other in pids:
                        if other not in codes:
                            _signal(other, signal.SIGKILL)
                    deadline = float("inf")
                else:
                    time.sleep(0.05)
    return [codes[p] for p in pids], first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def serve(path: str, set_by_imports: dict) -> None:
    import torch

    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    server.settimeout(1.0)
    print("ready", json.dumps(set_by_imports), flush=True)  # the client compares requests without these
    while os.getppid() == parent:  # ends with the pytest process that started it
        try:
            os.waitpid(-1, os.WNOHANG)  # reap finished job processes
        except ChildProcessError:
            pass
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        req = json.loads(conn.makefile().readline())
        if torch.cuda.is_initialized():  # never fork a CUDA context
            conn.sendall(b'{"error": "CUDA initialised in the fork server"}\n')
            conn.close()
            continue
        if os.fork() == 0:
            server.close()
            job_main(conn, req)
        conn.close()


if __name__ == "__main__":
    _SERVER_PYTHONPATH = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    started_with = dict(os.environ)
    preload()
    # Variables the imports themselves set (torch's TORCHINDUCTOR_CACHE_DIR, DeepSpeed's NVML switch): a real
    # process sets the same when it imports them, so a request that has them (the suite's own process imported
    # DeepSpeed) or not is served alike.
    serve(sys.argv[1], {k: v for k, v in os.environ.items() if started_with.get(k) != v})
