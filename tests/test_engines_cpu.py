"""DeepSpeed ZeRO-1/2 and FSDP2 on 2 CPU ranks, launched as the README shows (accelerate launch --config_file),
against one process on a ragged set (Accelerate's padded duplicates in the last window); killed (SIGKILL) or
preempted (SIGTERM) mid-epoch and resumed; scripts/verify_equivalence.py; the out-of-memory settings each refuses;
a resume on another world size. Real processes, signals and gloo; one uninterrupted run per engine configuration,
shared by the asserts. `pytest -s` prints each launch's wall time and each check's parameter difference."""

import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time

import pytest

from conftest import (ROOT, TINY, TRAIN, config_command, launch, launch_config, load_params, max_abs_diff,
                      first_rank_failure, read_metrics, run_config_command, start_launch)
from test_resume import children, signal_tree, steps

pytestmark = pytest.mark.slow

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install -e '.[dev]')")

# 37 examples, micro 3, 2 epochs, a checkpoint every 3 updates (and at epoch ends; the newest two kept):
# 1 process x N 4 = 2 ranks x N 2 = 12 per update, windows of 12, 12, 12 and 1 real examples: 8 updates.
RAGGED = [*TINY, "data.max_train_samples=37", "trainer.micro_batch_size=3", "trainer.epochs=2",
          "trainer.checkpoint_every=3", "trainer.log_with=none"]
# The same ninja for every load of DeepSpeed's JIT-built shm op (the environment's): another one rewrites
# ninja's log and rebuilds it (Makefile).
# (Not added twice, as the Makefile puts it first already: a PATH unlike the fork server's would launch for real.)
_BIN = os.path.dirname(sys.executable)
BIN_FIRST = {"PATH": os.environ["PATH"] if os.environ["PATH"].split(os.pathsep)[0] == _BIN
             else os.pathsep.join([_BIN, os.environ["PATH"]])}
ENGINES = {  # name: (config file, launcher arguments, environment added to this one's, engine in metrics.json,
    #                overrides: gradient checkpointing under one configuration of each engine, same math)
    # ACCELERATE_USE_CPU=1 kept: the project drops it for DeepSpeed (it would switch DeepSpeed off)
    "zero2": ("deepspeed_zero2", (), {"ACCELERATE_USE_CPU": "1"}, "deepspeed", ()),
    "zero1": ("deepspeed_zero2", ("--zero_stage", "1"), {}, "deepspeed", ("model.gradient_checkpointing=true",)),
    "fsdp_full": ("fsdp", (), {"DIST_GACC_FSDP_ON_CPU": "1"}, "fsdp", ("model.gradient_checkpointing=true",)),
    "fsdp_sharded": ("fsdp", ("--fsdp_state_dict_type", "SHARDED_STATE_DICT"),
                     {"DIST_GACC_FSDP_ON_CPU": "1", "ACCELERATE_USE_CPU": "1"}, "fsdp", ()),
}
TIMES = {}  # launch: wall seconds (noisy: the 2 cores are shared)
RESULTS = {}  # (engine, check): max |parameter difference|


def engine_command(run_dir, name, *overrides, processes=2, script=TRAIN):
    """The engine's `accelerate launch` of RAGGED (micro 3 x N 2 x 2 ranks, or N 4 on 1 process): command, env."""
    config, launch_args, env, _, levers = ENGINES[name]
    base = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return config_command(run_dir, config, *RAGGED, f"trainer.grad_accum_steps={4 // processes}", *levers,
                          *overrides, env={**base, **BIN_FIRST, **env}, script=script,
                          launch_args=("--num_processes", str(processes), *launch_args))


def launch_engine(run_dir, name, *overrides, processes=2, label=None, script=TRAIN, check=True, real=False):
    """Run the engine's launch to its end; its wall time goes into TIMES[label] (printed at the module's end).
    Through the fork server (conftest.run_config_command); `real=True` runs `accelerate launch` itself."""
    cmd, env = engine_command(run_dir, name, *overrides, processes=processes, script=script)
    start = time.perf_counter()
    proc = run_config_command(cmd, env, script, timeout=600, real=real)
    TIMES[label or f"{name}{' resumed' if overrides else ''}"] = time.perf_counter() - start
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    start = time.perf_counter()
    launch(run, *RAGGED, "trainer.grad_accum_steps=4", "trainer.packing=false")  # padded: the engines run packed
    TIMES["one process"] = time.perf_counter() - start
    return run


# Every configuration forks, with the environment Accelerate's own launcher code computes from its arguments
# (tests/forkserver.py; test_forkserver.py compares it with a real `accelerate launch` of each file). The README's
# commands of these engines run for real, as written, in tests/test_readme_commands.py.


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """{name: run_dir}, each engine launched once (lazily, so a deselected engine costs nothing)."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(name) / "run"
            launch_engine(runs[name], name)
        return runs[name]
    return get


@pytest.fixture(scope="module", autouse=True)
def report():
    """Printed at the module's end (pytest -s): each launch's wall time and each check's parameter difference."""
    yield
    print("\nwall times (s):", {k: round(v, 1) for k, v in TIMES.items()})
    print("max |parameter difference|:", {f"{k[0]}: {k[1]}": f"{v:.1e}" for k, v in RESULTS.items()})


PARAMS = [pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero1", marks=needs_deepspeed),
          "fsdp_full", "fsdp_sharded"]


@pytest.mark.parametrize("name", PARAMS)
def test_two_cpu_ranks_equal_one_process(name, engine_runs, one_process):
    run = engine_runs(name)
    a, b = read_metrics(one_process), read_metrics(run)
    assert (b["engine"], b["world_size"], b["effective_batch_size"]) == (ENGINES[name][3], 2, 12)
    assert a["optimizer_steps"] == b["optimizer_steps"] == 8
    assert b["packing"]["on"] and not a["packing"]["on"]  # packed under the engine = padded on one process
    assert b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-6)
    assert max(a["grad_norms"]) > 1.0  # clipping at trainer.max_grad_norm=1.0 mattered
    assert b["grad_norms"] == pytest.approx(a["grad_norms"], rel=1e-5)  # the norm before clipping
    diff = max_abs_diff(load_params(one_process), load_params(run))
    assert diff <= 1e-5
    RESULTS[name, "2 ranks vs 1 process"] = diff
    checkpointing = "gradient checkpointing on" in (run / "train.log").read_text()
    assert checkpointing == ("model.gradient_checkpointing=true" in ENGINES[name][4])


def interrupt(run_dir, name, sig, *overrides, after=3):
    """Start the engine's launch (forked: conftest.start_launch), send `sig` to its ranks and their children (not
    to the launcher, which then reports each rank's exit code) as soon as checkpoint step-`after` (or a later
    one) is complete, wait for the job to end. Returns (its exit code, the first failed rank's exit code,
    this job's output: appended to <run_dir>.log, after the interrupted launches' output)."""
    started, log = time.perf_counter(), f"{run_dir}.log"
    before = os.path.getsize(log) if os.path.exists(log) else 0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    job = start_launch(*engine_command(run_dir, name, *overrides), TRAIN, log)
    deadline = time.time() + 600
    while not (steps(run_dir) and steps(run_dir)[-1] >= after):
        assert job.poll() is None, f"ended before step-{after}: {open(log).read()[-4000:]}"
        assert time.time() < deadline, f"no checkpoint step-{after}"
        time.sleep(0.01)
    for pid in children(job.pid):
        signal_tree(pid, sig)
    code = job.wait(timeout=300)
    TIMES[f"{name} until {sig.name}{' (resumed)' if overrides else ''}"] = time.perf_counter() - started
    with open(log) as f:
        f.seek(before)
        output = f.read()
    return code, first_rank_failure(job, output), output


def assert_same_run(resumed, reference):
    """The resumed run equals the uninterrupted one: every update's loss and gradient norm, and the parameters
    (measured: bitwise). Returns the resumed run's metrics and the parameter difference."""
    a, b = read_metrics(resumed), read_metrics(reference)
    assert a["updates"] == b["updates"] == 8 and a["optimizer_steps"] == 8
    assert a["train_losses"] == b["train_losses"] and a["grad_norms"] == b["grad_norms"]
    assert a["lr_after_update"] == b["lr_after_update"]
    diff = max_abs_diff(load_params(resumed), load_params(reference))
    assert diff == 0.0
    return a, diff


# ZeRO-1 saves and loads its checkpoint through the same DeepSpeed calls as ZeRO-2 (the stage changes what is
# partitioned, not how a checkpoint is written or read); its training, verify and README runs stay above.
RESUME_PARAMS = [p for p in PARAMS if getattr(p, "values", (p,))[0] != "zero1"]


@pytest.mark.parametrize("name", RESUME_PARAMS)
def test_sigterm_then_sigkill_then_resume_auto_equals_uninterrupted(name, engine_runs, tmp_path):
    """One job, interrupted twice in the same folder (one chain per engine saves two launches; each stage keeps
    its own asserts):
    1. SLURM's preemption: SIGTERM to the ranks once step-3 (mid epoch 1 of 2) exists. Each rank finishes the
       update in progress, they checkpoint it together and exit 75 (EX_TEMPFAIL: requeue).
    2. `resume=auto` from that checkpoint, then a real kill -9 of the ranks as soon as a newer checkpoint
       (written by the resumed job) is complete: nothing is finished, whatever it left is ignored.
    3. `resume=auto` from the newest complete checkpoint finishes the run equal to the uninterrupted one,
       across the epoch boundary.
    The ranks are real processes (forked by tests/forkserver.py, which waits for them as torch's launcher does)
    and get real signals; the launcher's own handling of signals is covered by tests/test_resume.py and
    tests/test_multinode.py on real `accelerate launch` commands."""
    full, run = engine_runs(name), tmp_path / "run"
    code, first, output = interrupt(run, name, signal.SIGTERM)
    # The ranks exit 75; the launcher reports the first to end (then ends the other, which is exiting 75 too) and
    # exits 1. (torch's launcher signalled itself, as SLURM does, reports no codes: tests/test_resume.py covers
    # that way on real commands, and 75 on one process.)
    assert code == 1 and "stopped by a signal after a finished update" in output, output[-3000:]
    assert first == 75, (first, output[-3000:])
    stopped = steps(run)[-1]
    newest = run / "checkpoints" / f"step-{stopped}"
    record = json.loads((newest / "trainer_state.json").read_text())
    assert record["position"]["reason"] == "stop signal" and record["world_size"] == 2
    assert 3 <= record["state"]["updates"] == stopped < 8
    assert (newest / "random_states_0.pkl").exists() and (newest / "random_states_1.pkl").exists()
    assert not (run / "metrics.json").exists()

    code, first, output = interrupt(run, name, signal.SIGKILL, "resume=auto", after=stopped + 1)
    assert code == 1 and first == -signal.SIGKILL, (first, output[-3000:])
    assert f"resumed from {newest}: update {stopped}," in output, output[-3000:]
    assert not (run / "metrics.json").exists() and not (run / "model").exists()
    killed = steps(run)[-1]
    assert stopped < killed < 8

    launch_engine(run, name, "resume=auto", label=f"{name} resumed after SIGTERM and SIGKILL")
    m, diff = assert_same_run(run, full)
    assert m["resumed_from"].endswith(f"step-{killed}")
    RESULTS[name, "SIGTERM (exit 75), resume, SIGKILL, resume=auto"] = diff


def test_fsdp_parameters_are_really_sharded(engine_runs):
    """Guards the relabelling (engines.relabel_for_fsdp) against an Accelerate that trains DDP instead: the
    SHARDED checkpoint holds each weight matrix as 2 chunks, one per rank, written by torch.distributed.checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    run = engine_runs("fsdp_sharded")
    assert "tensors sharded over 2 ranks" in (run / "train.log").read_text()
    folder = run / "checkpoints" / "step-6" / "pytorch_model_fsdp_0"
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    weights = {k: v for k, v in metadata.items() if k.endswith("attention.self.query.weight")}
    assert weights and all(len(m.chunks) == 2 for m in weights.values()), weights
    assert all(m.size[0] == 32 and {c.sizes[0] for c in m.chunks} == {16} for m in weights.values())


def test_fsdp_on_cpu_switch_refuses_other_launches(tmp_path):
    """The ranks exit 2 (the ConfigError) with the message, before training. Forked: the fork server reports the
    first failed rank's exit code, as torch's launcher would."""
    proc = launch_config(tmp_path / "ddp", "cpu_2proc", *TINY, env={"ACCELERATE_USE_CPU": "1", "DIST_GACC_FSDP_ON_CPU": "1"})
    assert proc.returncode != 0 and first_rank_failure(proc) == 2, proc.stderr[-3000:]
    assert "DIST_GACC_FSDP_ON_CPU=1 rehearses an FSDP launch on CPU ranks, but this launch does not ask" in proc.stderr
    proc = launch_config(tmp_path / "fsdp1", "fsdp", *TINY, env={"DIST_GACC_FSDP_ON_CPU": "1"},
                         launch_args=("--num_processes", "2", "--fsdp_version", "1"))
    assert proc.returncode != 0 and first_rank_failure(proc) == 2, proc.stderr[-3000:]
    assert "DIST_GACC_FSDP_ON_CPU=1 supports FSDP2 only" in proc.stderr
    assert not (tmp_path / "ddp" / "metrics.json").exists() and not (tmp_path / "fsdp1" / "metrics.json").exists()


def test_fsdp2_bf16_reduces_in_fp32_and_matches_bf16_ddp(tmp_path):
    """Accelerate's FSDP2 policy would reduce (and accumulate within a window) in bf16; engines.configure_fsdp
    makes it fp32, as DDP's .grad. Measured here: FSDP2 bf16 vs DDP bf16 differ by 7.4e-4 in the parameters
    with the fp32 reduce, 1.0e-3 with Accelerate's bf16 one, 8.6e-4 with fp32 parameters (no policy): bf16
    compute dominates at this size, so the bound checks agreement, the log checks the policy."""
    bf16 = [*RAGGED, "trainer.mixed_precision=bf16", "trainer.grad_accum_steps=2"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch(ddp, *bf16, processes=2)
    proc = launch_config(fsdp, "fsdp", *bf16, env={"DIST_GACC_FSDP_ON_CPU": "1"}, launch_args=("--num_processes", "2"))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "param_dtype=torch.bfloat16, reduce_dtype=torch.float32" in (fsdp / "train.log").read_text()
    a, b = read_metrics(ddp), read_metrics(fsdp)
    assert (a["mixed_precision"], b["mixed_precision"], b["engine"]) == ("bf16", "bf16", "fsdp")
    assert b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-3)
    assert max_abs_diff(load_params(ddp), load_params(fsdp)) <= 2e-3


@needs_deepspeed
def test_deepspeed_resume_on_another_world_size_is_refused(engine_runs, tmp_path):
    """The same effective batch (1 x 3 x 4), so only the world size changes; refused before any update, naming
    DeepSpeed's way out (ZeRO-1 and ZeRO-2 share the check: elastic.check_world_change)."""
    run = tmp_path / "run"
    shutil.copytree(engine_runs("zero2"), run, ignore=shutil.ignore_patterns("model", "metrics.json"))
    proc = launch_engine(run, "zero2", "resume=auto", processes=1, label="zero2 2 -> 1 refused", check=False)
    assert proc.returncode != 0 and ("written by 2 DeepSpeed processes, resumed on 1. DeepSpeed's ZeRO checkpoints are "
                                     "partitioned by rank; convert it to a universal checkpoint first "
                                     "(deepspeed.checkpoint.ds_to_universal)") in proc.stderr, proc.stderr[-4000:]
    assert not (run / "metrics.json").exists()


def assert_same_updates(run, reference):
    """Equal to the uninterrupted run up to the order of sums (another world size): returns the difference."""
    a, b = read_metrics(run), read_metrics(reference)
    assert a["updates"] == b["updates"] == 8 and a["train_window_examples"] == b["train_window_examples"]
    assert a["train_losses"] == pytest.approx(b["train_losses"], rel=1e-6)
    assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-5)
    assert a["lr_after_update"] == pytest.approx(b["lr_after_update"], rel=1e-9)
    diff = max_abs_diff(load_params(run), load_params(reference))
    assert diff <= 1e-5
    return diff


@pytest.mark.parametrize("name", ["fsdp_sharded", "fsdp_full"])
def test_fsdp2_checkpoint_resumes_on_another_world_size(name, engine_runs, tmp_path):
    """2 ranks -> 1 process -> 2 ranks. The 2-rank run's step-4 (epoch end) resumes on 1 process (micro 3 x N 4),
    which writes step-6 mid epoch 2 and finishes; that step-6 resumes on 2 ranks. Both finish as the uninterrupted
    2-rank run (which equals one process: test_two_cpu_ranks_equal_one_process). A fresh Adam state would move
    each parameter by about the LR (~3e-4 here), so the bound also shows the optimizer state was resharded."""
    full, one, two = engine_runs(name), tmp_path / "one", tmp_path / "two"
    shutil.copytree(full / "checkpoints" / "step-4", one / "checkpoints" / "step-4")
    proc = launch_engine(one, name, "resume=auto", processes=1, label=f"{name} 2 -> 1 resumed")
    log = proc.stdout + proc.stderr
    assert "update 4, epoch 1, window 0 | world size 2 -> 1, micro-batch 3 -> 3, N 2 -> 4 (effective batch 12)" in log
    assert read_metrics(one)["engine"] == "fsdp" and read_metrics(one)["world_size"] == 1
    RESULTS[name, "resume 2 ranks -> 1 process"] = assert_same_updates(one, full)
    step6 = one / "checkpoints" / "step-6"
    assert json.loads((step6 / "trainer_state.json").read_text())["world_size"] == 1
    shutil.copytree(step6, two / "checkpoints" / "step-6")
    proc = launch_engine(two, name, "resume=auto", label=f"{name} 1 -> 2 resumed")
    log = proc.stdout + proc.stderr
    assert "update 6, epoch 1, window 2 | world size 1 -> 2, micro-batch 3 -> 3, N 4 -> 2 (effective batch 12)" in log
    assert read_metrics(two)["world_size"] == 2
    RESULTS[name, "resume 1 process -> 2 ranks"] = assert_same_updates(two, full)


@pytest.mark.parametrize("name", PARAMS)
def test_verify_equivalence_passes(name, tmp_path):
    """scripts/verify_equivalence.py under the engine's launch: 4 updates of ragged windows against one batch per
    window on one process, in float64. FSDP2 gathers its shards for the comparison (get_state_dict); DeepSpeed's
    ZeRO optimizer steps fp32 master weights, so there the table says so and the tolerance is 1e-6 (the naive
    normalisation differs by 3.8e-4 on these windows: verify.DEEPSPEED_FLOAT64_TOLERANCE)."""
    proc = launch_engine(tmp_path / "run", name, script=ROOT / "scripts" / "verify_equivalence.py",
                         label=f"{name} verify_equivalence", check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-4000:]
    assert ("split: micro-batch 3 x N 2 x processes 2 = effective 12; 4 updates; windows of 12, 12, 12, 1 examples; "
            "normalisation exact") in out
    deepspeed = ENGINES[name][3] == "deepspeed"
    assert ("; packed micro-batches; float64 with DeepSpeed's fp32 master weights (verify.tolerance 1.0e-09 raised "
            "to 1e-06)\n" if deepspeed else "; packed micro-batches; float64\n") in out  # packed = padded reference
    worst, tolerance = map(float, re.search(r"max (\S+) vs tolerance (\S+): PASS$", out.strip()).groups())
    assert tolerance == (1e-6 if deepspeed else 1e-9) and worst <= tolerance
    RESULTS[name, "verify_equivalence (max diff vs 1-process float64 reference)"] = worst


@pytest.mark.parametrize("name, override, message", [
    pytest.param("zero2", "trainer.micro_batch_size=auto", "trainer.micro_batch_size=auto is not supported under "
                 "DeepSpeed: DeepSpeed fixes train_micro_batch_size_per_gpu when it starts", marks=needs_deepspeed),
    pytest.param("zero1", "trainer.oom_fallback=true", "trainer.oom_fallback=true is not supported under deepspeed: "
                 "DeepSpeed fixes train_micro_batch_size_per_gpu and gradient_accumulation_steps", marks=needs_deepspeed),
    ("fsdp_full", "trainer.micro_batch_size=auto", "trainer.micro_batch_size=auto is not supported under fsdp: "
     "FSDP's forward passes all-gather parameters"),
    ("fsdp_sharded", "trainer.oom_fallback=true", "trainer.oom_fallback=true is not supported under fsdp: FSDP's "
     "forward passes all-gather parameters"),
])
def test_oom_settings_the_engine_cannot_honour_are_refused_before_training(name, override, message, tmp_path):
    """oom.policy / engines.check_supported: the ranks print the message naming the key and exit 2, before any
    data or model is built. (The stage and the state dict type do not enter these checks: one launch per refusal,
    spread over the four configurations.) Forked: tests/forkserver.py reports the first failed rank's exit code
    and exits 1, as torch's launcher does (whose report tests/test_resume.py reads on a real launch)."""
    run = tmp_path / "run"
    proc = launch_engine(run, name, override, label=f"{name} {override} refused", check=False)
    assert proc.returncode == 1 and first_rank_failure(proc) == 2, proc.stderr[-3000:]
    assert f"error: {message}" in proc.stderr
    assert "updates:" not in proc.stderr and "effective batch" not in proc.stderr  # build.log_plan never ran
    assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("name", PARAMS)
def test_model_loads_in_a_pipeline_and_reproduces_the_validation_predictions(name, engine_runs, one_process):
    """model/ is whole (DeepSpeed's partitions and FSDP's DTensors gathered by get_state_dict): the run's own
    validation predictions, and the one-process model's scores (the tiny model predicts mostly one class and its
    scores vary by ~4e-5 across texts, hence the tight bound; the parameters themselves are compared in
    test_two_cpu_ranks_equal_one_process)."""
    import pandas as pd
    from transformers import pipeline

    run = engine_runs(name)
    saved = pd.read_csv(run / "validation_predictions.csv")
    texts = saved["text"].tolist()
    out = pipeline("text-classification", model=str(run / "model"), device="cpu")(texts, truncation=True,
                                                                                  max_length=64)
    assert len(saved) == 37 and [o["label"] for o in out] == saved["prediction"].tolist()
    reference = pipeline("text-classification", model=str(one_process / "model"), device="cpu")(
        texts, truncation=True, max_length=64)
    assert [o["label"] for o in out] == [o["label"] for o in reference]
    assert [o["score"] for o in out] == pytest.approx([o["score"] for o in reference], abs=1e-6)


# --- settings once refused under these engines because nothing could test them (issue 21) --------------
# Each variant is launched once on one process (N 4) and once on 2 ranks of its engine (N 2), lazily.
LIFTED = {
    # label 1 ("fresh") weighs 3: a window's normaliser is its sum of weights, not its count, and DeepSpeed's
    # pre-scale must carry it (the last window of each epoch: 1 real example on rank 0, a padded duplicate on 1)
    "weighted": ("zero2", ("trainer.class_weights=[1.0,3.0]",)),
    # At lr 1e-2 the model predicts "fresh" everywhere (validation F1 0.679) until update 13, then "rotten" (F1 0):
    # early stopping (6 evaluations without gain) ends the run at update 14, and the best model is update 2's.
    "best": ("fsdp_full", ("trainer.epochs=4", "trainer.eval_every=2", "trainer.early_stopping_patience=6",
                           "optim.lr=1e-2")),
    # LoRA on the query/value projections (no dropout: ranks draw other masks). ZeRO-1/2 keep every parameter
    # whole on every rank (they partition gradients and optimizer state): model/ is written as under DDP.
    "lora": ("zero2", ("peft=lora", "peft.dropout=0.0")),
    # FSDP2 shards frozen and trainable parameters alike: model/ is merged from a whole copy on rank 0, and the
    # best adapter (update 2's: the F1 never improves on it) goes back into the shards through that copy.
    "lora_best": ("fsdp_full", ("peft=lora", "peft.dropout=0.0", "trainer.save_best=true", "trainer.eval_every=2")),
}


@pytest.fixture(scope="module")
def lifted_runs(tmp_path_factory):
    """(variant, processes) -> run_dir, each launched once."""
    runs = {}

    def get(variant, processes):
        if (variant, processes) not in runs:
            run = runs[variant, processes] = tmp_path_factory.mktemp(f"{variant}-{processes}") / "run"
            engine, overrides = LIFTED[variant]
            if processes == 1:
                start = time.perf_counter()
                launch(run, *RAGGED, "trainer.grad_accum_steps=4", *overrides)
                TIMES[f"one process {variant}"] = time.perf_counter() - start
            else:
                launch_engine(run, engine, *overrides, label=f"{engine} {variant}")
        return runs[variant, processes]
    return get


@needs_deepspeed
def test_deepspeed_class_weights_equal_one_process(lifted_runs, one_process):
    """DeepSpeed steps inside the window's last backward, so its pre-scale divides by the window's sum of class
    weights, read from the epoch's order before the first forward pass (windows.TrainBatches)."""
    a, b = read_metrics(lifted_runs("weighted", 1)), read_metrics(lifted_runs("weighted", 2))
    assert (b["engine"], b["world_size"], b["class_weights"]) == ("deepspeed", 2, {"rotten": 1.0, "fresh": 3.0})
    assert a["train_window_examples"] == b["train_window_examples"] == [12, 12, 12, 1] * 2
    assert a["optimizer_steps"] == b["optimizer_steps"] == 8
    assert b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-6)
    assert b["grad_norms"] == pytest.approx(a["grad_norms"], rel=1e-5)
    assert max_abs_diff(load_params(lifted_runs("weighted", 1)), load_params(lifted_runs("weighted", 2))) <= 1e-5
    unweighted = read_metrics(one_process)  # the weights changed the updates (a count normaliser would not match)
    assert a["train_losses"] != pytest.approx(unweighted["train_losses"], rel=1e-3)
    assert max_abs_diff(load_params(lifted_runs("weighted", 2)), load_params(one_process)) > 1e-4


def test_fsdp_best_model_reload_equals_one_process(lifted_runs):
    """Early stopping under FSDP2: model/ holds update 2's model (save_model gathers the shards), and finish
    reloads it into the sharded parameters (outputs.load_saved_model_fsdp) before scoring validation and test:
    metrics.json's eval is the best model's F1, not the final model's 0."""
    one, two = lifted_runs("best", 1), lifted_runs("best", 2)
    a, b = read_metrics(one), read_metrics(two)
    assert (b["engine"], b["world_size"], b["model"], b["stopped_early"]) == ("fsdp", 2, "best", True)
    assert b["best"]["update"] == a["best"]["update"] == 2 and b["updates"] == a["updates"] == 14
    assert [h["f1"] for h in b["history"]] == pytest.approx([h["f1"] for h in a["history"]], abs=1e-12)
    assert b["history"][-1]["f1"] == 0.0  # the final (sharded) model's score; the reloaded one's below
    assert b["eval"]["f1"] == b["best"]["f1"] == pytest.approx(0.6786, abs=1e-4)
    assert b["test"]["f1"] == a["test"]["f1"] and b["test"]["accuracy"] == a["test"]["accuracy"]
    assert b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-6)
    assert max_abs_diff(load_params(one), load_params(two)) <= 1e-5


@pytest.mark.parametrize("variant", [pytest.param("lora", marks=needs_deepspeed), "lora_best"])
def test_lora_equals_one_process_and_its_merged_model_loads(variant, lifted_runs):
    """The trained adapter (model/adapter/) and the merged model (model/) as on one process; the merged model is a
    plain transformers folder that reproduces the run's validation predictions (scored after the best-model
    reload for lora_best)."""
    import pandas as pd
    from safetensors.torch import load_file
    from transformers import pipeline

    one, two = lifted_runs(variant, 1), lifted_runs(variant, 2)
    a, b = read_metrics(one), read_metrics(two)
    assert (b["engine"], b["world_size"], b["peft"]) == (ENGINES[LIFTED[variant][0]][3], 2, "lora")
    assert b["trainable_parameters"] == a["trainable_parameters"] < b["total_parameters"] / 10
    assert a["optimizer_steps"] == b["optimizer_steps"] == 8
    assert b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-6)
    assert b["grad_norms"] == pytest.approx(a["grad_norms"], rel=1e-5)
    assert (b["model"], b["best"]["update"]) == (("best", 2) if variant == "lora_best" else ("final", a["best"]["update"]))
    assert b["eval"]["f1"] == a["eval"]["f1"] and b["test"]["f1"] == a["test"]["f1"]
    adapters = [load_file(str(run / "model" / "adapter" / "adapter_model.safetensors")) for run in (one, two)]
    moved = max(t.abs().max().item() for k, t in adapters[1].items() if "lora_B" in k)  # B starts at 0
    assert moved > (1e-4 if variant == "lora_best" else 1e-3)  # after 2 updates (best) or 8
    assert max_abs_diff(*adapters) <= 1e-5
    assert max_abs_diff(load_params(one), load_params(two)) <= 1e-5
    saved = pd.read_csv(two / "validation_predictions.csv")
    out = pipeline("text-classification", model=str(two / "model"), device="cpu")(saved["text"].tolist(),
                                                                                truncation=True, max_length=64)
    assert [o["label"] for o in out] == saved["prediction"].tolist()
