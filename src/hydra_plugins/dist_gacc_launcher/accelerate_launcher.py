"""A Hydra launcher that runs each multirun job as its own `accelerate launch`.

    python scripts/train.py -m hydra/launcher=accelerate hydra.launcher.num_processes=2 \
        trainer.mixed_precision=no,bf16 optim.lr=2e-5,5e-5

Hydra's basic launcher runs jobs one after another inside one process, but Accelerate's state is a
per-process singleton (a job cannot change mixed precision or process count) and a multirun inside
`accelerate launch` would run every job on every rank. So each job becomes a fresh
`accelerate launch` of the same script with the job's overrides and its own run directory; a job
that fails is reported with its overrides and log, and the sweep goes on with the next.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class AccelerateLauncherConf:
    _target_: str = "hydra_plugins.dist_gacc_launcher.accelerate_launcher.AccelerateLauncher"
    num_processes: int = 1          # processes per job (GPUs, or CPU ranks)
    # real CPU ranks (gloo): ACCELERATE_USE_CPU=1 with --multi_gpu. null = auto: CPU ranks when no
    # CUDA device is visible, GPUs otherwise; true/false force it.
    cpu: Optional[bool] = None
    extra_args: list = field(default_factory=list)  # more `accelerate launch` arguments, e.g. [--config_file, x.yaml]
    # per job; null = none. On timeout every process of the job gets SIGTERM (the trainer finishes its update,
    # checkpoints and exits 75: the job resumes with resume=auto), then SIGKILL after timeout_grace_s.
    timeout_s: Optional[int] = None
    timeout_grace_s: int = 30


ConfigStore.instance().store(group="hydra/launcher", name="accelerate", node=AccelerateLauncherConf,
                             provider="dist_gacc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cpu(setting: Optional[bool], cuda_available: bool) -> bool:
    """Whether the jobs run as CPU ranks: `hydra.launcher.cpu` if set, else whenever no CUDA device
    is visible (GPU ranks would fail on such a machine)."""
    return (not cuda_available) if setting is None else bool(setting)


def launcher_precision(mixed_precision) -> str:
    """accelerate launch's --mixed_precision. The trainer passes its own (resolved) precision to the
    Accelerator, which wins over the launcher's; `auto` is resolved in the job, so the launcher says no."""
    value = "no" if mixed_precision in (False, None) else str(mixed_precision)
    return "no" if value == "auto" else value


def accelerate_command(script: str, overrides: Sequence[str], run_dir: str, num_processes: int,
                       mixed_precision: str, extra_args: Sequence[str]) -> list[str]:
    flags = ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision",
             mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    if num_processes > 1:
        flags.insert(0, "--multi_gpu")
    # hydra.* overrides configure the sweep, not the job; the job runs once, in its own directory.
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, *extra_args, script, *job_overrides,
            f"hydra.run.dir={run_dir}", "hydra.mode=RUN"]


class AccelerateLauncher(Launcher):
    def __init__(self, num_processes: int = 1, cpu: Optional[bool] = None, extra_args: Sequence[str] = (),
                 timeout_s: Optional[int] = None, timeout_grace_s: int = 30) -> None:
        self.num_processes, self.cpu_setting = num_processes, cpu
        self.cpu = False  # decided in launch(), where torch is imported only once a sweep runs
        self.extra_args, self.timeout_s, self.timeout_grace_s = list(extra_args), timeout_s, timeout_grace_s
        self.config: Optional[DictConfig] = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.script = os.path.abspath(sys.argv[0])  # the entry script, run again for each job

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        import torch

        cuda = torch.cuda.is_available()
        self.cpu = use_cpu(self.cpu_setting, cuda)
        why = (f"hydra.launcher.cpu={str(self.cpu_setting).lower()}" if self.cpu_setting is not None
               else f"hydra.launcher.cpu=null: {'a CUDA device is' if cuda else 'no CUDA device'} visible")
        log.info("Launching %d jobs, each with accelerate launch (%d process%s on %s; %s)", len(job_overrides),
                 self.num_processes, "es" if self.num_processes > 1 else "", "CPU" if self.cpu else "GPUs", why)
        results, failed = [], []
        for offset, overrides in enumerate(job_overrides):
            num = initial_job_idx + offset
            result = self._launch_one(num, list(overrides))
            results.append(result)
            if result.status == JobStatus.FAILED:
                failed.append(num)
        if failed:
            log.error("%d of %d jobs failed: %s (the others completed)", len(failed), len(job_overrides),
                      ", ".join(f"#{n}" for n in failed))
        return results

    def _launch_one(self, num: int, overrides: list[str]) -> JobReturn:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = num
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # A job may ask for its own process count with the task key num_processes (sweepable).
        processes = int(sweep_config.get("num_processes") or sweep_config.hydra.launcher.num_processes)
        cmd = accelerate_command(self.script, overrides, str(run_dir), processes,
                                 launcher_precision(sweep_config.trainer.mixed_precision), self.extra_args)
        env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if self.cpu else {})}
        log_path = run_dir / "launch.log"
        shown = " ".join(filter_overrides(overrides))
        log.info("\t#%d : %s", num, shown)
        with open(log_path, "w") as out:
            # Its own session: the job's processes are signalled without touching the sweep's.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                left = end_job(proc, self.timeout_grace_s)
                log.error("job #%d ran past hydra.launcher.timeout_s=%s: its processes were sent SIGTERM (SIGKILL "
                          "after %s s)%s", num, self.timeout_s, self.timeout_grace_s,
                          f"; could not end {[p.pid for p in left]}" if left else "; none is left")
                code = "timeout"
            except BaseException:  # Ctrl-C or an error in the sweep: its job (own session) must not outlive it
                end_job(proc, self.timeout_grace_s)
                raise
        job = JobReturn(overrides=overrides, cfg=sweep_config, hydra_cfg=sweep_config, working_dir=str(run_dir),
                        task_name=str(sweep_config.hydra.job.name))
        if code == 0:
            job.status, job.return_value = JobStatus.COMPLETED, _job_metric(run_dir)
        else:
            log.error("job #%d failed (exit %s): %s\n\tlog: %s", num, code, shown, log_path)
            job.status = JobStatus.FAILED
            job._return_value = RuntimeError(f"job #{num} ({shown}) failed with exit {code}; log: {log_path}")
        return job


def process_tree(pid: int) -> list:
    """The process `pid` and every process below it. torch's launcher starts each worker in a session of its
    own, so neither the launcher's process group nor its death reaches them: they are found by ancestry
    (psutil), before anything is signalled (an orphan loses its parent link)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def living(processes: list) -> list:
    """Those still running (a zombie has ended: only its parent's wait is missing)."""
    import psutil

    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _signal(processes: list, sig: int) -> None:
    """`sig` to each process and to its process group (a worker's DataLoader workers share its group)."""
    import psutil

    own_group = os.getpgrp()
    for p in processes:
        try:
            if not p.is_running():  # ended, its pid maybe reused: not ours to signal
                continue
            group = os.getpgid(p.pid)
            if group != own_group:  # never the sweep's own group
                os.killpg(group, sig)
            p.send_signal(sig)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass


def _wait_gone(processes: list, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    while (alive := living(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def end_job(proc: subprocess.Popen, grace_s: float) -> list:
    """End every process of a job: SIGTERM (the trainer finishes its update, checkpoints and exits 75), then
    SIGKILL after `grace_s` seconds to whatever is left, and to processes started meanwhile (collected again
    each round). Returns the processes that could not be ended (none, barring an unkillable state)."""
    processes = process_tree(proc.pid)
    _signal(processes, signal.SIGTERM)
    alive = _wait_gone(processes, grace_s)
    for _ in range(10):
        if not alive:
            break
        seen = {p.pid for p in alive}
        alive += [c for p in list(alive) for c in process_tree(p.pid)[1:] if c.pid not in seen]
        _signal(alive, signal.SIGKILL)
        alive = _wait_gone(alive, 5)
    proc.wait()  # reap accelerate launch
    return alive


def _job_metric(run_dir: Path) -> Optional[float]:
    """The job's objective for sweepers, as dist_gacc.main returns it: the validation trainer.metric of the model in
    model/ (`eval`: the best model with save_best or early stopping, else the final one)."""
    import json

    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics["eval"][metrics.get("metric", "f1")]  # trainer.metric (older runs: f1)
