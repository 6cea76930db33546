"""dist_gacc.launch, which writes every `accelerate launch` of the project: the engine a config file asks for is the
engine Accelerate's own launcher sets up from the arguments (no --multi_gpu next to a DeepSpeed or FSDP file), each
engine's CPU environment, the card's reproduce launch, the SLURM scripts' and the docstrings' commands. The sweeps
that run them: tests/test_launcher_engines.py."""

import os
import re

import pytest

from conftest import CONF, ROOT

from dist_gacc.errors import ConfigError
from dist_gacc.launch import FSDP_ON_CPU, Launch, for_run, main


def accelerate_sets_up(launch: Launch) -> str:
    """What `accelerate launch` itself decides from the launch's arguments (its parser and its validation, which
    reads the config file): deepspeed | fsdp | ddp | other."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args([*launch.launcher_args(), "x.py"])
    if launch.config_file:
        parsed.config_file = os.path.join(launch.cwd or "", launch.config_file)
    args, *_ = _validate_launch_command(parsed)
    return "deepspeed" if args.use_deepspeed else "fsdp" if args.use_fsdp else "ddp" if args.multi_gpu else "other"


@pytest.mark.parametrize("config, engine, cpu_env", [
    ("deepspeed_zero2", "deepspeed", {}),  # the trainer drops ACCELERATE_USE_CPU for DeepSpeed
    ("fsdp", "fsdp", {FSDP_ON_CPU: "1"}),
    ("cpu_2proc", "ddp", {"ACCELERATE_USE_CPU": "1"}),
    (None, "ddp", {"ACCELERATE_USE_CPU": "1"}),
])
def test_the_engine_asked_for_is_the_one_accelerate_sets_up(config, engine, cpu_env):
    extra = ["--config_file", str(CONF / "accelerate" / f"{config}.yaml")] if config else []
    launch = Launch.from_args(extra, processes=2, cpu=True, port=29555)
    args = launch.launcher_args()
    assert launch.engine == accelerate_sets_up(launch) == engine
    assert ("--multi_gpu" in args) == (config is None)  # next to a file it would override its distributed_type
    assert args[args.index("--num_processes") + 1] == "2" and args[args.index("--main_process_port") + 1] == "29555"
    assert launch.env_vars() == cpu_env and Launch.from_args(extra, processes=2).env_vars() == {}  # GPUs: nothing


def test_an_explicit_engine_flag_wins_over_the_file_as_in_accelerate():
    ds = str(CONF / "accelerate" / "deepspeed_zero2.yaml")
    forced = Launch.from_args(["--multi_gpu", "--config_file", ds], processes=2)
    assert forced.engine == accelerate_sets_up(forced) == "ddp" and forced.launcher_args().count("--multi_gpu") == 1


def test_bad_launch_arguments_and_a_missing_file_are_named_before_any_job():
    with pytest.raises(ConfigError, match="accelerate config file not found: conf/accelerate/nope.yaml"):
        Launch.from_args(["--config_file", "conf/accelerate/nope.yaml"], processes=2).engine
    with pytest.raises(ConfigError, match=r"has no arguments \['--num_gpus'\]"):
        Launch.from_args(["--num_gpus", "1"], processes=2).launcher_args()


@pytest.mark.parametrize("record, device, command", [
    ({"name": "deepspeed", "zero_stage": 1}, "cpu",
     "accelerate launch --config_file conf/accelerate/deepspeed_zero2.yaml --num_processes 2 --mixed_precision bf16 "
     "--dynamo_backend no --zero_stage 1 scripts/train.py a=1"),
    ({"name": "fsdp", "fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}, "cpu",
     f"{FSDP_ON_CPU}=1 accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 2 --mixed_precision "
     "bf16 --dynamo_backend no --fsdp_state_dict_type SHARDED_STATE_DICT scripts/train.py a=1"),
    ({"name": "ddp"}, "cuda", "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision "
     "bf16 --dynamo_backend no scripts/train.py a=1"),
    ({"name": "ddp", "machines": 2}, "cuda", "accelerate launch --multi_gpu --num_processes 2 --num_machines 2 "
     "--machine_rank '<0..1: this machine>' --main_process_ip '<address of machine 0>' --rdzv_backend static "
     "--same_network --mixed_precision bf16 --dynamo_backend no scripts/train.py a=1"),
])
def test_a_runs_record_gives_the_launch_of_its_engine(record, device, command):
    launch = for_run(record, 2, device, "bf16")
    assert launch.shell("scripts/train.py", "a=1") == command and launch.cwd == str(ROOT)  # run in the checkout
    assert launch.engine == record["name"]
    if launch.machines == 1:  # (placeholders for the machine rank and address otherwise)
        assert accelerate_sets_up(launch) == record["name"]


def test_the_cli_prints_the_slurm_nodes_arguments(capsys):
    assert main(["--config_file", "conf/accelerate/fsdp.yaml", "--num_processes", "16", "--num_machines", "2",
                 "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]) == 0
    assert capsys.readouterr().out.split() == [
        "--config_file", "conf/accelerate/fsdp.yaml", "--num_processes", "16", "--num_machines", "2", "--machine_rank",
        "1", "--main_process_ip", "10.0.0.1", "--rdzv_backend", "static", "--same_network", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "29500"]
    assert main(["--num_processes", "2", "--cpu", "--env"]) == 0
    out = capsys.readouterr().out.split()
    assert out[0] == "--multi_gpu" and out[-2:] == ["env", "ACCELERATE_USE_CPU=1"]
    assert main(["--config_file", "nope.yaml", "--num_processes", "2"]) == 2


@pytest.mark.parametrize("script", ["train.py", "verify_equivalence.py", "teardown_probe.py"])
def test_the_scripts_two_rank_commands_are_the_modules(script):
    """The commands the scripts' docstrings show (line breaks aside) are the ones the module writes."""
    text = re.sub(r"\\\\\n\s*", "", (ROOT / "scripts" / script).read_text())
    assert Launch(2, cpu=True).shell(f"scripts/{script}") in text
