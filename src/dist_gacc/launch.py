"""Every `accelerate launch` command the project writes: the Hydra launcher's jobs, the model card's reproduce
command, the SLURM scripts and scripts/gpu_check.sh (through `python -m dist_gacc.launch`), the benchmark's and
the tests' launches.

A `Launch` says what to start (processes, machines, CPU ranks or GPUs, a config file, more arguments) and gives
the argv and the environment. The engine is the one `accelerate launch` sets up from them (its
`_validate_launch_command`): an explicit --multi_gpu / --use_deepspeed / --use_fsdp, else the config file's
distributed_type. So --multi_gpu is added only when nothing else picks an engine: next to a DeepSpeed or FSDP
file it makes `accelerate launch` ignore the file's distributed_type and train plain DDP.

On CPU ranks each engine needs its own environment (engines.process_group_setup): ACCELERATE_USE_CPU=1 for DDP
(and one process), nothing for DeepSpeed (the trainer drops that variable: it would switch DeepSpeed off),
DIST_GACC_FSDP_ON_CPU=1 for FSDP2.

    python -m dist_gacc.launch --num_processes 16 --num_machines 2 --machine_rank 0 --main_process_ip HOST \\
        [--config_file conf/accelerate/fsdp.yaml] [--cpu] [-- more accelerate launch arguments]

prints the `accelerate launch` arguments, one a line (then the environment it adds, as `env NAME=value` lines
only with --env).
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import socket
import sys
from dataclasses import dataclass

from .errors import ConfigError

FSDP_ON_CPU = "DIST_GACC_FSDP_ON_CPU"  # the rehearsal switch: FSDP2 on CPU ranks (README, "FSDP and DeepSpeed")
# The project's config file of each sharded engine: the card's reproduce command selects the engine with it.
ENGINE_CONFIGS = {"deepspeed": "conf/accelerate/deepspeed_zero2.yaml", "fsdp": "conf/accelerate/fsdp.yaml"}
# What these files set that a run may have changed on the command line (`accelerate launch` flags).
FILE_DEFAULTS = {"zero_stage": 2, "fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT"}
ENGINE_OF_TYPE = {"DEEPSPEED": "deepspeed", "FSDP": "fsdp", "NO": "single"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_precision(mixed_precision) -> str:
    """accelerate launch's --mixed_precision. The trainer passes its own (resolved) precision to the
    Accelerator, which wins over the launcher's; `auto` is resolved in the job, so the launcher says no."""
    value = "no" if mixed_precision in (False, None) else str(mixed_precision)
    return "no" if value == "auto" else value


@dataclass(frozen=True)
class Launch:
    processes: int | None = 1          # in all, over every machine (None: the config file's)
    cpu: bool = False                  # CPU ranks (gloo) rather than GPUs
    config_file: str | None = None     # an Accelerate config file (its distributed_type picks the engine)
    args: tuple = ()                   # more `accelerate launch` arguments, e.g. ("--zero_stage", "1")
    mixed_precision: str | None = "no"  # --mixed_precision (None: not given)
    port: int | None = None            # --main_process_port (None: Accelerate's default)
    machines: int = 1
    machine_rank: int | str = 0        # (a str: a placeholder in a command shown to users)
    main_address: str | None = None    # machine 0's address, with several machines
    cwd: str | None = None             # where the command runs: a relative config file is read from there

    @classmethod
    def from_args(cls, args, **kwargs) -> "Launch":
        """A launch of `accelerate launch` arguments (e.g. hydra.launcher.extra_args): --config_file taken out."""
        args, config = [str(a) for a in args], None  # Hydra gives `[--zero_stage,1]`'s 1 as a number
        for i, arg in enumerate(args):
            if arg == "--config_file" and i + 1 < len(args):
                config = args[i + 1]
                del args[i:i + 2]
                break
            if arg.startswith("--config_file="):
                config = arg.split("=", 1)[1]
                del args[i]
                break
        return cls(config_file=config, args=tuple(args), **kwargs)

    @functools.cached_property
    def _parsed(self) -> argparse.Namespace:
        """These arguments as `accelerate launch`'s own parser reads them (ConfigError where it refuses them).
        Without arguments there is nothing to read, and the parser's import (torch's) is skipped: the SLURM
        scripts call `python -m dist_gacc.launch` on every node start."""
        if not self.args:
            return argparse.Namespace(use_deepspeed=False, use_fsdp=False, multi_gpu=False, cpu=False)
        from accelerate.commands.launch import launch_command_parser

        given = [*(["--config_file", self.config_file] if self.config_file else []), *self.args]
        try:
            parsed, unknown = launch_command_parser().parse_known_args([*given, "script.py"])
        except SystemExit:
            raise ConfigError(f"accelerate launch refuses the arguments {given} (its message is above)") from None
        if unknown:
            raise ConfigError(f"accelerate launch has no arguments {unknown} (given: {given})")
        return parsed

    @functools.cached_property
    def engine(self) -> str:
        """ddp | deepspeed | fsdp | single: what `accelerate launch` sets up from these arguments, in its order
        (an engine flag, else the config file's distributed_type, read by Accelerate's loader)."""
        parsed = self._parsed
        if parsed.use_deepspeed:
            return "deepspeed"
        if parsed.use_fsdp:
            return "fsdp"
        if parsed.multi_gpu:
            return "ddp"
        if parsed.cpu:
            return "single"  # `accelerate launch --cpu` starts one process whatever --num_processes says
        if self.config_file:
            return config_engine(os.path.join(self.cwd or "", self.config_file))
        return "ddp" if (self.processes or 1) > 1 or self.machines > 1 else "single"

    def _picks_engine(self) -> bool:
        """A config file or an engine flag decides the engine (no --multi_gpu to add)."""
        p = self._parsed
        return bool(self.config_file or p.use_deepspeed or p.use_fsdp or p.multi_gpu or p.cpu)

    def launcher_args(self) -> list[str]:
        """`accelerate launch`'s arguments, without the script."""
        self.engine  # noqa: B018  (checks the arguments and the file first)
        flags = []
        if not self._picks_engine() and self.engine == "ddp":
            flags.append("--multi_gpu")
        if self.config_file:
            flags += ["--config_file", self.config_file]
        if self.processes is not None:
            flags += ["--num_processes", str(self.processes)]
        if self.machines > 1:
            if not self.main_address:
                raise ConfigError(f"a launch on {self.machines} machines needs machine 0's address (main_process_ip)")
            flags += ["--num_machines", str(self.machines), "--machine_rank", str(self.machine_rank),
                      "--main_process_ip", str(self.main_address), "--rdzv_backend", "static", "--same_network"]
        elif not self.config_file:
            flags += ["--num_machines", "1"]
        if self.mixed_precision is not None:
            flags += ["--mixed_precision", self.mixed_precision]
        flags += ["--dynamo_backend", "no"]
        if self.port is not None:
            flags += ["--main_process_port", str(self.port)]
        return [*flags, *self.args]

    def env_vars(self) -> dict[str, str]:
        """The variables this engine's ranks need on top of the caller's environment."""
        if not self.cpu:
            return {}
        return {"deepspeed": {}, "fsdp": {FSDP_ON_CPU: "1"}}.get(self.engine, {"ACCELERATE_USE_CPU": "1"})

    def env(self, base: dict | None = None) -> dict[str, str]:
        """The ranks' whole environment: `base` (default os.environ) and env_vars()."""
        return {**(os.environ if base is None else base), **self.env_vars()}

    def argv(self, script, *script_args, python: str = sys.executable) -> list[str]:
        """[python, -m, accelerate.commands.launch, launcher args..., script, script args...]."""
        return [python, "-m", "accelerate.commands.launch", *self.launcher_args(), str(script),
                *map(str, script_args)]

    def shell(self, script, *script_args) -> str:
        """The command a user types: `NAME=value accelerate launch ... script args`, or `python script args` for
        one process without a config file or other arguments."""
        if self.engine == "single" and not self.config_file and not self.args:
            words = ["python", str(script)]
        else:
            words = [*(f"{k}={v}" for k, v in self.env_vars().items()), "accelerate", "launch", *self.launcher_args(),
                     str(script)]
        return " ".join(shlex.quote(w) for w in [*words, *map(str, script_args)])


# The checkout the card's reproduce command runs in (its paths: scripts/train.py, conf/accelerate/...).
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_engine(path: str) -> str:
    """The engine a config file's distributed_type asks for (Accelerate's loader; a missing file named)."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not os.path.isfile(path):
        raise ConfigError(f"accelerate config file not found: {path}")
    kind = load_config_from_file(path).distributed_type
    return ENGINE_OF_TYPE.get(getattr(kind, "value", str(kind)), "ddp")


def for_run(engine_state: dict, world_size: int, device: str, mixed_precision: str | None = "no") -> Launch:
    """The launch that sets up a finished run's engine again (its record, engines.engine_record): the project's
    config file of a sharded engine, plus a flag for each of its values the run changed."""
    name = engine_state.get("name", "ddp" if world_size > 1 else "single")
    args: list[str] = []
    if name == "deepspeed" and engine_state.get("zero_stage", 2) != FILE_DEFAULTS["zero_stage"]:
        args += ["--zero_stage", str(engine_state["zero_stage"])]
    if name == "fsdp":
        if engine_state.get("fsdp_version", 2) != FILE_DEFAULTS["fsdp_version"]:
            args += ["--fsdp_version", str(engine_state["fsdp_version"])]
        if engine_state.get("state_dict_type", "FULL_STATE_DICT") != FILE_DEFAULTS["state_dict_type"]:
            args += ["--fsdp_state_dict_type", engine_state["state_dict_type"]]
    machines = engine_state.get("machines", 1)
    return Launch(processes=world_size, cpu=device == "cpu", config_file=ENGINE_CONFIGS.get(name), args=tuple(args),
                  mixed_precision=launcher_precision(mixed_precision), cwd=CHECKOUT, machines=machines,
                  machine_rank=f"<0..{machines - 1}: this machine>", main_address="<address of machine 0>")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_gacc.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=1, help="in all, over every machine")
    parser.add_argument("--num_machines", type=int, default=1)
    parser.add_argument("--machine_rank", type=int, default=0)
    parser.add_argument("--main_process_ip")
    parser.add_argument("--main_process_port", type=int)
    parser.add_argument("--config_file", help="an Accelerate config file (empty: none)")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (gloo)")
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--env", action="store_true", help="also print the variables the ranks need")
    parser.add_argument("rest", nargs="*", help="more accelerate launch arguments (after --)")
    a = parser.parse_args(argv)
    launch = Launch(processes=a.num_processes, cpu=a.cpu, config_file=a.config_file or None, args=tuple(a.rest),
                    mixed_precision=a.mixed_precision, port=a.main_process_port, machines=a.num_machines,
                    machine_rank=a.machine_rank, main_address=a.main_process_ip)
    try:
        lines = launch.launcher_args()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.env:
        lines += [f"env {k}={v}" for k, v in launch.env_vars().items()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
