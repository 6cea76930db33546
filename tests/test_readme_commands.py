"""The commands a user types, each run for real (not forked) exactly as README.md writes it: the test reads the
command from the README (a code block's line with its continuations, or a table's inline code), puts the test's
overrides where the README says `[overrides]` and its paths where it says `<run>` or names a sweep, and runs it
with bash from the checkout. A README edit that breaks a command fails here.

One module, so its launches run one after another: the README's multi-process commands use Accelerate's default
rendezvous port (every other test launch picks a free port)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, read_metrics

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
# A tiny BERT and a few updates: what each command does, not what it learns.
TINY_RUN = ["model=tiny", "model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
            "data.max_train_samples=32", "data.max_eval_samples=16", "data.max_length=32", "trainer.micro_batch_size=4",
            "trainer.max_steps=2", "trainer.log_with=none", "trainer.baseline=false", "trainer.mixed_precision=no"]


def readme_commands() -> list[str]:
    """Every command of the README: each line of a ``` block (continuations joined, a `$ ` prompt and a trailing
    `# comment` dropped), then each inline `code` span."""
    text, commands = README.read_text(), []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.removeprefix("$ ")).strip()
            if line:
                commands.append(line)
    return commands + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def readme_command(start: str) -> str:
    found = [c for c in readme_commands() if c.startswith(start)]
    assert found, f"README.md has no command starting {start!r}"
    return found[0]


def run(command: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """The command line, run by bash from the checkout as a user's shell would (the environment's `python` and
    `accelerate` first on PATH)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": path, **env})
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def with_overrides(command: str, *overrides: str) -> str:
    assert command.endswith("[overrides]"), command
    return command.removesuffix("[overrides]") + " ".join(shlex.quote(o) for o in overrides)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """`python scripts/train.py [overrides]` with debug=default (the smoke run: a tiny model, 8 updates), to the end
    (fp32: the precision probe is tests/test_precision.py's)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run(with_overrides(readme_command("python scripts/train.py [overrides]"), "debug=default",
                       "trainer.mixed_precision=no", f"hydra.run.dir={run_dir}"), OMP_NUM_THREADS="1")
    return run_dir


def test_train_py_writes_model_metrics_baseline_and_card(one_process):
    m = read_metrics(one_process)
    assert (m["updates"], m["world_size"], m["engine"]) == (8, 1, "single")
    assert set(m["baseline"]) >= {"validation", "test"} and 0 <= m["baseline"]["validation"]["f1"] <= 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (one_process / "model" / name).is_file(), name
    card = (one_process / "model" / "README.md").read_text()
    assert "python scripts/train.py debug=default" in card  # its reproduce command


def test_predict_py_labels_each_text(one_process):
    command = readme_command("python scripts/predict.py model=outputs/<date>/<time>/model")
    command = command.replace("outputs/<date>/<time>/model", shlex.quote(str(one_process / "model")))
    lines = run(command).stdout.splitlines()
    labels = set(json.loads((one_process / "model" / "config.json").read_text())["id2label"].values())
    assert [line.split("\t")[2] for line in lines] == ["a gorgeous, moving film", "tedious"]
    assert {line.split("\t")[0] for line in lines} <= labels and all(0 < float(line.split("\t")[1]) <= 1
                                                                     for line in lines)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The README's 2-rank CPU config file: `ACCELERATE_USE_CPU=1 accelerate launch --config_file
    conf/accelerate/cpu_2proc.yaml scripts/train.py [overrides]`."""
    run_dir = tmp_path_factory.mktemp("cpu_2proc") / "run"
    command = readme_command("ACCELERATE_USE_CPU=1 accelerate launch --config_file conf/accelerate/cpu_2proc.yaml")
    run(with_overrides(command, *TINY_RUN, f"hydra.run.dir={run_dir}"), OMP_NUM_THREADS="1")
    return run_dir


def test_the_cpu_config_file_trains_on_two_ranks(two_ranks):
    m = read_metrics(two_ranks)
    assert (m["world_size"], m["engine"], m["updates"]) == (2, "ddp", 2)


@pytest.mark.parametrize("start, engine_state", [
    ("DIST_GACC_FSDP_ON_CPU=1 accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 2",
     {"name": "fsdp", "distributed_type": "FSDP", "fsdp_version": 2}),
    ("accelerate launch --config_file conf/accelerate/deepspeed_zero2.yaml --num_processes 2 --zero_stage 1",
     {"name": "deepspeed", "distributed_type": "DEEPSPEED", "zero_stage": 1}),
], ids=["fsdp2", "zero1"])
def test_the_engine_commands_on_cpu_ranks_run_their_engine(start, engine_state, tmp_path):
    """FSDP2 and DeepSpeed ZeRO-1 on 2 CPU ranks, as the README's "DeepSpeed and FSDP on CPU ranks" writes them (the
    ZeRO-2 line is the same command without --zero_stage 1; its ranks fork in tests/test_engines_cpu.py)."""
    if engine_state["name"] == "deepspeed":
        pytest.importorskip("deepspeed")
    run(with_overrides(readme_command(start), *TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}"), OMP_NUM_THREADS="1")
    m = read_metrics(tmp_path / "run")
    assert m["world_size"] == 2 and m["updates"] == 2
    assert {k: m["engine_state"][k] for k in engine_state} == engine_state


def test_verify_equivalence_prints_the_readmes_table():
    """The README's verify_equivalence command, its overrides included, prints the split line the README shows and
    passes."""
    command = readme_command("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
                             "--mixed_precision no --dynamo_backend no scripts/verify_equivalence.py")
    out = run(command, OMP_NUM_THREADS="1").stdout
    shown = re.search(r"^split: .*$", README.read_text(), flags=re.M).group(0)
    assert shown == ("split: micro-batch 4 x N 3 x processes 2 = effective 24; 2 updates; windows of 24, 13 examples; "
                     "normalisation exact; task single_label_classification; packed micro-batches; float64")
    assert shown in out.splitlines() and re.search(r"^max \S+ vs tolerance 1\.0e-09: PASS$", out, flags=re.M)


def test_summarize_py_tables_a_sweep(one_process, two_ranks, tmp_path):
    """`python scripts/summarize.py <sweep> --out <folder>` over two finished runs as a sweep's jobs."""
    sweep = tmp_path / "sweep"
    for job, run_dir in enumerate((one_process, two_ranks)):
        shutil.copytree(run_dir, sweep / str(job), ignore=shutil.ignore_patterns("model", "checkpoints"))
    command = readme_command("python scripts/summarize.py multirun/seed_table_cpu --out docs/results")
    run(command.replace("multirun/seed_table_cpu", shlex.quote(str(sweep)))
        .replace("docs/results", shlex.quote(str(tmp_path / "out"))))
    table = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(table) == 3 and (tmp_path / "out" / "val_f1.png").stat().st_size > 1000
