"""A Hydra launcher that runs each multirun job as its own `accelerate launch`.

    python scripts/train.py -m hydra/launcher=accelerate hydra.launcher.num_processes=2 \
        trainer.mixed_precision=no,bf16 optim.lr=2e-5,5e-5

Hydra's basic launcher runs jobs one after another inside one process, but Accelerate's state is a
per-process singleton (a job cannot change mixed precision or process count) and a multirun inside
`accelerate launch` would run every job on every rank. So each job becomes a fresh
`accelerate launch` of the same script with the job's overrides, the sweep's --config-path/--config-dir/
--config-name and its own run directory (the command: dist_gacc.launch); a job that fails is reported with its
overrides and log, and the sweep goes on with the next. A stop signal to the sweep (SIGTERM, SIGHUP: a CI
`timeout`, a closed terminal; SIGUSR1) ends the running job as hydra.launcher.timeout_s does, then the sweep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

if TYPE_CHECKING:
    from dist_gacc.launch import Launch

log = logging.getLogger(__name__)


@dataclass
class AccelerateLauncherConf:
    _target_: str = "hydra_plugins.dist_gacc_launcher.accelerate_launcher.AccelerateLauncher"
    num_processes: int = 1          # processes per job (GPUs, or CPU ranks)
    # real CPU ranks (gloo; each engine's environment: dist_gacc.launch). null = auto: CPU ranks when no
    # CUDA device is visible, GPUs otherwise; true/false force it.
    cpu: Optional[bool] = None
    # more `accelerate launch` arguments, e.g. [--config_file, conf/accelerate/deepspeed_zero2.yaml]: a DeepSpeed
    # or FSDP file's distributed_type picks the engine (no --multi_gpu is added next to it)
    extra_args: list = field(default_factory=list)
    # per job; null = none. On timeout the job's ranks get SIGTERM (the trainer finishes its update, checkpoints
    # and exits 75: the job resumes with resume=auto), then whatever is left SIGKILL after timeout_grace_s.
    timeout_s: Optional[int] = None
    timeout_grace_s: int = 30
    # a command each job's `accelerate launch` runs under, e.g. [nice, -n, "10"] or [numactl, --interleave=all]
    command_prefix: list = field(default_factory=list)


ConfigStore.instance().store(group="hydra/launcher", name="accelerate", node=AccelerateLauncherConf,
                             provider="dist_gacc")


def use_cpu(setting: Optional[bool], cuda_available: bool) -> bool:
    """Whether the jobs run as CPU ranks: `hydra.launcher.cpu` if set, else whenever no CUDA device
    is visible (GPU ranks would fail on such a machine)."""
    return (not cuda_available) if setting is None else bool(setting)


def accelerate_command(script: str, overrides: Sequence[str], run_dir: str, launch: "Launch",
                       hydra_args: Sequence[str] = ()) -> list[str]:
    """The job's command: `launch`'s argv of the script, with the sweep's config options (`hydra_args`) and the
    job's overrides. hydra.* overrides configure the sweep, not the job; the job runs once, in its own directory."""
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    return launch.argv(script, *hydra_args, *job_overrides, f"hydra.run.dir={run_dir}", "hydra.mode=RUN")


def config_options(argv: Sequence[str]) -> list[str]:
    """The sweep's --config-path, --config-dir and --config-name (any spelling, read by Hydra's own parser), for
    each job: the job is the same script, so a relative --config-path means the same folder; --config-dir is made
    absolute."""
    from hydra._internal.utils import get_args_parser

    given, _ = get_args_parser().parse_known_args(list(argv))
    options = []
    if given.config_path is not None:
        options += ["--config-path", given.config_path]
    if given.config_dir is not None:
        options += ["--config-dir", os.path.abspath(given.config_dir)]
    if given.config_name is not None:
        options += ["--config-name", given.config_name]
    return options


class SweepStopped(BaseException):
    """A stop signal reached the sweep (a BaseException, as KeyboardInterrupt: no `except Exception` keeps it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The signals that end a sweep as hydra.launcher.timeout_s ends a job: a CI `timeout`, a closed terminal, a
# batch system's warning. (Ctrl-C's SIGINT reaches the sweep as KeyboardInterrupt, ended the same way.)
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


class AccelerateLauncher(Launcher):
    def __init__(self, num_processes: int = 1, cpu: Optional[bool] = None, extra_args: Sequence[str] = (),
                 timeout_s: Optional[int] = None, timeout_grace_s: int = 30,
                 command_prefix: Sequence[str] = ()) -> None:
        self.num_processes, self.cpu_setting = num_processes, cpu
        self.cpu = False  # decided in launch(), where torch is imported only once a sweep runs
        self.extra_args, self.timeout_s, self.timeout_grace_s = list(extra_args), timeout_s, timeout_grace_s
        self.command_prefix = [str(word) for word in command_prefix]
        self.config: Optional[DictConfig] = None
        self.hydra_context: Any = None
        self.job: Optional[subprocess.Popen] = None  # the running job's `accelerate launch`
        self.stop_signal: Optional[int] = None       # a stop signal the sweep got
        self.ending = False                          # a job's processes are being ended: a signal waits

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.script = os.path.abspath(sys.argv[0])  # the entry script, run again for each job
        self.hydra_args = config_options(sys.argv[1:])  # its config, as the sweep was given it

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        import torch

        cuda = torch.cuda.is_available()
        self.cpu = use_cpu(self.cpu_setting, cuda)
        why = (f"hydra.launcher.cpu={str(self.cpu_setting).lower()}" if self.cpu_setting is not None
               else f"hydra.launcher.cpu=null: {'a CUDA device is' if cuda else 'no CUDA device'} visible")
        # (dist_gacc.launch imported here, not at the top: `python -m dist_gacc.launch` imports this module first)
        from dist_gacc.launch import Launch

        engine = Launch.from_args(self.extra_args, processes=self.num_processes).engine  # bad arguments: now
        log.info("Launching %d jobs, each with accelerate launch, engine %s (%d process%s on %s; %s)",
                 len(job_overrides), engine, self.num_processes, "es" if self.num_processes > 1 else "",
                 "CPU" if self.cpu else "GPUs", why)
        if self.command_prefix:
            log.info("each job's accelerate launch runs under: %s", " ".join(self.command_prefix))
        results, failed = [], []
        with self.ended_by_signals():
            for offset, overrides in enumerate(job_overrides):
                num = initial_job_idx + offset
                if self.stop_signal is not None:  # it came between two jobs
                    raise SweepStopped(self.stop_signal)
                result = self._launch_one(num, list(overrides))
                results.append(result)
                if result.status == JobStatus.FAILED:
                    failed.append(num)
            if self.stop_signal is not None:  # it came after the last job
                raise SweepStopped(self.stop_signal)
        if failed:
            log.error("%d of %d jobs failed: %s (the others completed)", len(failed), len(job_overrides),
                      ", ".join(f"#{n}" for n in failed))
        return results

    def _launch_one(self, num: int, overrides: list[str]) -> JobReturn:
        from dist_gacc.launch import Launch, free_port, launcher_precision

        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = num
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # A job may ask for its own process count with the task key num_processes (sweepable).
        processes = int(sweep_config.get("num_processes") or sweep_config.hydra.launcher.num_processes)
        launch = Launch.from_args(self.extra_args, processes=processes, cpu=self.cpu, port=free_port(),
                                  mixed_precision=launcher_precision(sweep_config.trainer.mixed_precision))
        cmd = [*self.command_prefix, *accelerate_command(self.script, overrides, str(run_dir), launch, self.hydra_args)]
        shown = " ".join(filter_overrides(overrides))
        log.info("\t#%d : %s", num, shown)
        log_path = run_dir / "launch.log"
        code = self._run_job(num, cmd, launch.env(), log_path)
        job = JobReturn(overrides=overrides, cfg=sweep_config, hydra_cfg=sweep_config, working_dir=str(run_dir),
                        task_name=str(sweep_config.hydra.job.name))
        if code == 0:
            job.status, job.return_value = JobStatus.COMPLETED, _job_metric(run_dir)
        else:
            log.error("job #%d failed (exit %s): %s\n\tlog: %s", num, code, shown, log_path)
            job.status = JobStatus.FAILED
            job._return_value = RuntimeError(f"job #{num} ({shown}) failed with exit {code}; log: {log_path}")
        return job

    def _run_job(self, num: int, cmd: list, env: dict, log_path: Path):
        """Run one job to its end: its exit code, or "timeout"."""
        with open(log_path, "w") as out:
            try:
                # Its own session: the job's processes are signalled without touching the sweep's.
                self.job = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                if self.stop_signal is not None:  # it came while the job was starting
                    raise SweepStopped(self.stop_signal)
                return self.job.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                left = self._end(self.job)
                log.error("job #%d ran past hydra.launcher.timeout_s=%s: its processes were sent SIGTERM (SIGKILL "
                          "after %s s)%s", num, self.timeout_s, self.timeout_grace_s, _left(left))
                return "timeout"
            except BaseException as err:  # a signal, Ctrl-C or an error in the sweep: its job must not outlive it
                if self.job is not None:
                    left = self._end(self.job)
                    if isinstance(err, SweepStopped):
                        log.error("job #%d: the sweep got %s: the job's processes were sent SIGTERM (SIGKILL after "
                                  "%s s)%s", num, err, self.timeout_grace_s, _left(left))
                raise
            finally:
                self.job = None

    def _end(self, proc: subprocess.Popen) -> list:
        """end_job, which a stop signal arriving meanwhile does not interrupt (it is kept: the sweep then ends)."""
        self.ending = True
        try:
            return end_job(proc, self.timeout_grace_s)
        finally:
            self.ending = False

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.job is not None and not self.ending:
            raise SweepStopped(signum)

    @contextlib.contextmanager
    def ended_by_signals(self):
        """While the jobs run, a stop signal ends the running job (SIGTERM to its processes: the trainer
        checkpoints; SIGKILL after timeout_grace_s) and then the sweep, by the same signal. A signal the sweep
        ignores (nohup's SIGHUP) stays ignored."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in ENDING_SIGNALS}
        for sig, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(sig, self._on_signal)
        try:
            yield
        except SweepStopped as stop:
            log.error("the sweep got %s: it ends here (rerun the stopped job with resume=auto)", stop)
            for handler in logging.getLogger().handlers:
                handler.flush()
            signal.signal(stop.signum, signal.SIG_DFL)
            os.kill(os.getpid(), stop.signum)  # ended by the signal, as it would have been without this launcher
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _left(processes: list) -> str:
    return f"; could not end {[p.pid for p in processes]}" if processes else "; none is left"


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


def _signal(processes: list, sig: int, spared_group: Optional[int] = None) -> None:
    """`sig` to each process and to its process group (a worker's DataLoader workers share its group), except the
    sweep's own group and `spared_group`."""
    import psutil

    own_group = os.getpgrp()
    for p in processes:
        try:
            if not p.is_running():  # ended, its pid maybe reused: not ours to signal
                continue
            group = os.getpgid(p.pid)
            if group not in (own_group, spared_group):
                os.killpg(group, sig)
            p.send_signal(sig)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass


def _group(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _wait_gone(processes: list, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    while (alive := living(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def end_job(proc: subprocess.Popen, grace_s: float) -> list:
    """End every process of a job: SIGTERM (the trainer finishes its update, checkpoints and exits 75), then
    SIGKILL after `grace_s` seconds to whatever is left, and to processes started meanwhile (collected again
    each round). Returns the processes that could not be ended (none, barring an unkillable state).

    SIGTERM goes to the processes below `accelerate launch` (the ranks and what they started), not to it or its
    group: it ends when they do. Signalled itself, Accelerate's one-process launcher kills its child 5 s later and
    closes the pipe of the child's stderr, so the run could not finish its update and checkpoint."""
    processes = process_tree(proc.pid)
    if processes[1:]:
        _signal(processes[1:], signal.SIGTERM, spared_group=_group(proc.pid))
    else:  # no rank started yet
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
