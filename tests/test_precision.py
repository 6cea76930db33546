"""trainer.mixed_precision=auto (issue 15, point 1): the probe's arithmetic with a fake clock, the decision on
each kind of machine, the per-machine cache, and a real run that records its choice."""

import json
import platform

import pytest
import torch

from conftest import ROOT, TINY, launch, read_metrics, run_script
from dist_gacc import machine, precision

def fake_machine(seconds_per_step: dict):
    """A clock that only moves when a step runs, by that dtype's cost (a list: one cost per call, the last
    repeated); counts the steps."""
    clock, calls = [0.0], {torch.float32: 0, torch.bfloat16: 0}

    def step_for(dtype):
        def step():
            costs = seconds_per_step[dtype]
            costs = costs if isinstance(costs, list) else [costs]
            clock[0] += costs[min(calls[dtype], len(costs) - 1)]
            calls[dtype] += 1
        return step

    return (lambda: clock[0]), step_for, calls


def test_probe_times_interleaved_steps_and_takes_the_fastest_of_each():
    # warm-up (first cost), then 11 timed steps per side; a busy moment slows some steps of both sides
    fp32 = [0.5, 0.040, 0.100, 0.030, 0.200, 0.031, 0.030, 0.090, 0.030, 0.030, 0.060, 0.030]
    bf16 = [0.9, 0.020, 0.080, 0.024, 0.150, 0.020, 0.021, 0.070, 0.020, 0.050, 0.020, 0.020]
    timer, step_for, calls = fake_machine({torch.float32: fp32, torch.bfloat16: bf16})
    result = precision.probe(step_for=step_for, timer=timer, repeats=11, native=True)
    assert calls == {torch.float32: 12, torch.bfloat16: 12}  # one warm-up each, not timed
    assert result["fp32_ms"] == pytest.approx(30.0) and result["bf16_ms"] == pytest.approx(20.0)
    assert result["speedup"] == pytest.approx(1.5) and result["pairs"] == 11
    assert result["fp32_median_ms"] == pytest.approx(31.0) and result["bf16_median_ms"] == pytest.approx(21.0)
    assert result["spread"] == pytest.approx(1.05)  # bf16's median over its fastest: the larger side's
    assert result["quiet"] and precision.bf16_faster(result) and precision.not_cacheable(result) is None


def test_one_slow_bf16_step_decides_nothing_where_the_cpu_has_bf16_instructions():
    """A busy moment slows the first bf16 step 4.5x (1,089 vs 241 ms). With a bf16 flag the probe goes on: the
    other ten pairs decide. Without one, that first pair ends it, and so short a result is not cached."""
    fp32, bf16 = [0.2, 0.241] + [0.240] * 10, [0.2, 1.089] + [0.160] * 10
    timer, step_for, calls = fake_machine({torch.float32: fp32, torch.bfloat16: bf16})
    native = precision.probe(step_for=step_for, timer=timer, repeats=11, native=True)
    assert calls == {torch.float32: 12, torch.bfloat16: 12} and native["pairs"] == 11
    assert native["speedup"] == pytest.approx(1.5) and precision.verdict(native) == "bf16"
    assert precision.not_cacheable(native) is None

    timer, step_for, calls = fake_machine({torch.float32: fp32, torch.bfloat16: bf16})
    emulated = precision.probe(step_for=step_for, timer=timer, repeats=11, native=False)
    assert calls == {torch.float32: 2, torch.bfloat16: 2} and emulated["pairs"] == 1
    assert emulated["speedup"] == pytest.approx(0.221) and precision.verdict(emulated) == "fp32"
    assert precision.not_cacheable(emulated) == "1 pair, fewer than 5"


@pytest.mark.parametrize("fp32_ms, bf16_ms, pairs, spread, why", [
    ([30] * 11, [20] * 11, 11, 1.0, None),
    ([30] * 4, [20] * 4, 4, 1.0, "4 pairs, fewer than 5"),
    ([30] * 5, [20] * 5, 5, 1.0, None),
    ([30] * 6 + [60] * 5, [20] * 11, 11, 1.0, None),            # fp32's median is still its fastest
    ([30] * 5 + [60] * 6, [20] * 11, 11, 2.0, "spread 2 over 1.5: the machine was busy"),
    ([30] * 11, [20] * 5 + [31] * 6, 11, 1.55, "spread 1.55 over 1.5: the machine was busy"),  # bf16's side
])
def test_what_a_measurement_must_show_to_be_cached(fp32_ms, bf16_ms, pairs, spread, why):
    result = precision.summarize([ms / 1e3 for ms in fp32_ms], [ms / 1e3 for ms in bf16_ms])
    assert (result["pairs"], result["spread"]) == (pairs, pytest.approx(spread))
    assert result["speedup"] == pytest.approx(1.5) and precision.not_cacheable(result) == why
    assert result["quiet"] is (spread <= precision.NOISY)


def test_a_busy_machine_is_measured_but_not_cached(tmp_path):
    fp32 = [0.5, 0.030] + [0.100] * 10   # median fp32 step 3.3x the fastest: the machine was busy
    timer, step_for, _ = fake_machine({torch.float32: fp32, torch.bfloat16: 0.020})
    result = precision.probe(step_for=step_for, timer=timer, repeats=11, native=True)
    assert not result["quiet"] and result["speedup"] == pytest.approx(1.5)
    assert result["spread"] == pytest.approx(3.333)
    path, runs = tmp_path / "precision_probe.json", []

    def measure():
        runs.append(1)
        return result
    first = precision.cached_probe(measure, path, native=True)
    assert first["cached"] is False and not path.exists()
    assert first["not_cached"] == "spread 3.333 over 1.5: the machine was busy"
    precision.cached_probe(measure, path, native=True)
    assert len(runs) == 2  # measured again: a busy moment is not kept forever
    assert "; not cached: spread 3.333 over 1.5: the machine was busy)" in precision.figures(first)


@pytest.mark.parametrize("fp32_s, bf16_s, faster", [(0.01, 0.005, True), (0.01, 0.0095, False), (0.01, 0.7, False),
                                                    (0.011, 0.01, True)])
def test_bf16_must_beat_fp32_by_the_margin(fp32_s, bf16_s, faster):
    timer, step_for, _ = fake_machine({torch.float32: fp32_s, torch.bfloat16: bf16_s})
    result = precision.probe(step_for=step_for, timer=timer, repeats=5, native=True)
    assert precision.bf16_faster(result) is faster


def test_the_real_probe_times_a_training_step_in_both_precisions():
    result = precision.probe(repeats=2)
    assert result["fp32_ms"] > 0 and result["bf16_ms"] > 0
    assert result["pairs"] in (1, 2) and result["spread"] >= 1
    assert result["workload"] == "forward+backward of a transformer layer 8x64x384x1536"


def measured(fp32_ms, bf16_ms, calls=None):
    def measure():
        if calls is not None:
            calls.append(1)
        return {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "speedup": round(fp32_ms / bf16_ms, 3), "pairs": 11,
                "spread": 1.02, "quiet": True, "cached": False}
    return measure


def test_auto_on_a_cpu_measured_slow_for_bf16_is_fp32_and_says_why():
    calls = []
    choice = precision.resolve("auto", "cpu", capability="AVX512", arch="x86_64", native=False,
                               measure=measured(30.0, 2000.0, calls))
    assert (choice.requested, choice.resolved, len(calls)) == ("auto", "no", 1)
    assert "bf16 2000 vs fp32 30 ms per layer step (0.015x; fastest of 11 pairs, spread 1.02)" in \
        choice.reason
    assert choice.warning is None and choice.record()["probe"]["bf16_ms"] == 2000.0


def test_auto_on_a_cpu_measured_fast_for_bf16_is_bf16():
    choice = precision.resolve("auto", "cpu", capability="AVX512", arch="x86_64", native=True,
                               measure=measured(24.0, 18.0))
    assert choice.resolved == "bf16" and "bf16 18 vs fp32 24 ms per layer step (1.333x" in choice.reason


def test_auto_on_avx2_needs_no_probe():
    def never():
        raise AssertionError("AVX2 is conclusive: no probe")
    choice = precision.resolve("auto", "cpu", capability="AVX2", arch="x86_64", native=False, measure=never)
    assert choice.resolved == "no" and "AVX2" in choice.reason and choice.probe is None
    # the same capability on ARM is not conclusive: measured
    assert precision.resolve("auto", "cpu", capability="DEFAULT", arch="aarch64", native=False,
                             measure=measured(120.0, 50.0)).resolved == "bf16"


def test_explicit_bf16_on_a_slow_cpu_is_honoured_with_both_figures_in_a_warning():
    choice = precision.resolve("bf16", "cpu", capability="AVX2", arch="x86_64", native=False,
                               measure=measured(30.0, 2000.0))
    assert choice.resolved == "bf16"
    assert "bf16 2000 vs fp32 30 ms per layer step" in choice.warning and "trainer.mixed_precision=auto" in choice.warning
    fast = precision.resolve("bf16", "cpu", capability="AVX512", arch="x86_64", native=True,
                             measure=measured(24.0, 18.0))
    assert fast.resolved == "bf16" and fast.warning is None


def test_cuda_and_explicit_choices():
    assert precision.resolve("auto", "cuda", cuda_bf16=lambda: True).resolved == "bf16"
    assert precision.resolve("auto", "cuda", cuda_bf16=lambda: False).resolved == "fp16"
    for requested in ("no", "fp16"):
        choice = precision.resolve(requested, "cpu", measure=measured(1.0, 1.0, calls := []))
        assert choice.resolved == requested and not calls


def test_the_probe_is_cached_per_machine(tmp_path, monkeypatch):
    path, runs = tmp_path / "cache" / "precision_probe.json", []
    first = precision.cached_probe(measured(60.0, 0.9, runs), path, native=True)
    again = precision.cached_probe(measured(1.0, 1.0, runs), path, native=True)
    assert (first["cached"], again["cached"], len(runs)) == (False, True, 1) and again["fp32_ms"] == 60.0
    assert again["key"] == precision.machine_key()
    monkeypatch.setattr(precision, "machine_key", lambda: "another machine")
    other = precision.cached_probe(measured(190.0, 400.0, runs), path, native=True)
    assert (other["cached"], len(runs)) == (False, 2)
    assert len(json.loads(path.read_text())) == 2  # both machines kept


def record(speedup: float, **changes) -> dict:
    """A cache record as cached_probe() writes it: 11 quiet pairs unless `changes` say otherwise."""
    return {"fp32_ms": 30.0, "bf16_ms": round(30.0 / speedup, 3), "speedup": speedup, "pairs": 11,
            "spread": 1.1, "quiet": True, "confirmed": False, **changes}


# The cache an EPYC held for 2 threads: one bf16 step of 1,089 ms against 241 ms in fp32, kept after one pair.
EPYC_GUESS = {"fp32_ms": 241.0, "bf16_ms": 1089.0, "speedup": 0.221, "repeats": 1, "quiet": True}


@pytest.mark.parametrize("native, cached, why", [
    (True, record(1.4), None),                 # bf16 faster on a CPU with a bf16 flag: used
    (False, record(0.5), None),                # fp32 on one without: used
    (True, record(0.9, confirmed=True), None),  # against the flags, but a second probe confirmed it
    (True, EPYC_GUESS, "no pair count and spread recorded (an older format)"),
    (True, record(1.4, pairs=1), "1 pair, fewer than 5"),
    (True, record(1.4, spread=1.8), "spread 1.8 over 1.5: the machine was busy"),
    (True, record(0.221),
     "its verdict fp32 contradicts the CPU's flags (a bf16 instruction flag) and no second probe "
     "confirmed it"),
    (False, record(1.4),
     "its verdict bf16 contradicts the CPU's flags (no bf16 instruction flag) and no second probe "
     "confirmed it"),
])
def test_a_cached_verdict_is_used_only_with_enough_quiet_pairs_that_agree_with_the_flags(tmp_path, native,
                                                                                        cached, why):
    path, key, runs = tmp_path / "precision_probe.json", precision.machine_key(), []
    path.write_text(json.dumps({key: cached}))

    def measure():
        runs.append(1)
        return record(1.45, spread=1.05)
    result = precision.cached_probe(measure, path, native=native)
    assert precision.distrust(cached, native) == why
    if why is None:
        assert (result["cached"], result["speedup"], len(runs)) == (True, cached["speedup"], 0)
    else:
        assert (result["cached"], result["remeasured"], result["speedup"], len(runs)) == (False, why, 1.45, 1)
        assert precision.read_cache(path)[key]["speedup"] == 1.45  # the new measurement replaced it


def test_the_epyc_guess_no_longer_decides_auto_or_warns_about_bf16(tmp_path):
    """The old cache's one-pair guess on a CPU with bf16 instructions: measured again, and the quiet probe
    (11 pairs, bf16 1.4x faster) decides: auto is bf16, an explicit bf16 is not warned about."""
    path, key = tmp_path / "precision_probe.json", precision.machine_key()
    path.write_text(json.dumps({key: EPYC_GUESS}))

    def measure():
        return precision.cached_probe(lambda: record(1.4), path, native=True)
    auto = precision.resolve("auto", "cpu", capability="AVX512", arch="x86_64", native=True, measure=measure)
    assert auto.resolved == "bf16" and "measured again: no pair count and spread recorded" in auto.reason
    explicit = precision.resolve("bf16", "cpu", capability="AVX512", arch="x86_64", native=True,
                                 measure=measure)
    assert explicit.warning is None and explicit.probe["cached"] is True


def test_a_verdict_against_the_flags_is_cached_once_a_second_probe_confirms_it(tmp_path):
    path, key, runs = tmp_path / "precision_probe.json", precision.machine_key(), []

    def measure(speedup):
        def run():
            runs.append(speedup)
            return record(speedup)
        return run
    first = precision.cached_probe(measure(0.9), path, native=True)  # bf16 not faster on a CPU with AMX
    assert first["cached"] is False and precision.read_cache(path)[key]["confirmed"] is False
    second = precision.cached_probe(measure(0.95), path, native=True)
    assert second["cached"] is False and "contradicts" in second["remeasured"]
    stored = precision.read_cache(path)[key]
    assert stored["confirmed"] is True and stored["speedup"] == 0.95
    third = precision.cached_probe(measure(2.0), path, native=True)
    assert third["cached"] is True and third["speedup"] == 0.95 and runs == [0.9, 0.95]
    # An unconfirmed contradiction that the next probe does not repeat is replaced by that probe's verdict.
    path.write_text(json.dumps({key: record(0.9)}))
    precision.cached_probe(measure(1.4), path, native=True)
    assert precision.read_cache(path)[key]["speedup"] == 1.4
    assert precision.cached_probe(measure(0.5), path, native=True)["cached"] is True


@pytest.mark.slow  # the command, forked
def test_the_cache_command_shows_and_clears_the_cache(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the command's key, with OMP_NUM_THREADS=1
    try:
        key = precision.machine_key()
    finally:
        torch.set_num_threads(threads)
    other = "v3|AVX512|no bf16|threads=4|torch 2.13.0"
    path = tmp_path / "precision_probe.json"
    path.write_text(json.dumps({key: EPYC_GUESS, other: record(0.5)}))
    proc = run_script(ROOT / "scripts" / "precision_cache.py", "--show", "--clear", check=False,
                      env={"DIST_GACC_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout.splitlines()
    assert shown[0].startswith(f"{path}: 2 entries; this process's key {key} (CPU flags: ")
    assert shown[1:] == [
        f"  {key}: fp32 (bf16 1089 vs fp32 241 ms per layer step (0.221x; pairs not recorded)) -- "
        "measured again: no pair count and spread recorded (an older format)",
        f"  {other}: fp32 (bf16 60 vs fp32 30 ms per layer step (0.5x; fastest of 11 pairs, spread 1.1)) -- "
        "another machine, thread count or version",
        f"cleared {path} (2 entries)"]
    assert not path.exists()


def test_the_cache_key_is_what_decides_the_answer_not_the_model_string(monkeypatch):
    key = precision.machine_key()
    assert key.startswith(f"v{precision.PROBE_VERSION}|{torch.backends.cpu.get_cpu_capability()}|")
    assert f"threads={torch.get_num_threads()}" in key and machine.cpu_model() not in key
    monkeypatch.setattr(machine, "bf16_flags", lambda: ["avx512_bf16", "amx_bf16", "amx_tile"])
    assert "|avx512_bf16,amx_bf16,amx_tile|" in precision.machine_key()
    monkeypatch.setattr(machine, "bf16_flags", lambda: [])
    assert "|no bf16|" in precision.machine_key()


def test_launcher_passes_no_for_auto():
    from dist_gacc.launch import launcher_precision

    assert [launcher_precision(p) for p in ("auto", "no", False, "bf16")] == ["no", "no", "no", "bf16"]


def test_machine_record_names_cpu_capability_threads_and_ceiling():
    clock = [0.0]

    def matmul(a, b):
        clock[0] += 0.02
    assert machine.matmul_gflops(torch.float32, (512, 384, 1536), timer=lambda: clock[0], matmul=matmul) == \
        pytest.approx(2 * 512 * 384 * 1536 / 0.02 / 1e9)
    info = machine.describe(measure=False)
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads() and info["cpu_model"]
    assert f"capability {info['cpu_capability']}" in machine.label(info)


@pytest.mark.slow
def test_a_run_with_auto_records_its_choice_and_a_resume_keeps_it(tmp_path):
    """The run (1 thread, as launch() sets it) records and logs its choice; a resume from its checkpoint with
    2 threads, whose cache entry says the opposite, keeps the checkpoint's precision and is not refused."""
    first, second = tmp_path / "first", tmp_path / "second"
    launch(first, *TINY, "trainer.mixed_precision=auto", "trainer.max_steps=2", "trainer.micro_batch_size=8",
           "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2")
    m = read_metrics(first)
    choice = m["precision"]
    assert choice["requested"] == "auto" and m["mixed_precision"] == choice["resolved"]
    probe = choice["probe"]
    if probe is None:  # decided by the CPU's capability, without measuring
        assert precision.cpu_without_bf16(torch.backends.cpu.get_cpu_capability(), platform.machine(),
                                          machine.native_bf16())
        assert choice["reason"] == precision.resolve("auto", "cpu", measure=None).reason
    else:  # measured with the run's thread count; the decision follows from the figures
        assert "|threads=1|" in probe["key"]
        assert choice["resolved"] == ("bf16" if precision.bf16_faster(probe) else "no")
        assert precision.figures(probe) in choice["reason"]
        if precision.not_cacheable(probe) is None:
            cached = precision.read_cache()[probe["key"]]
            assert (cached["fp32_ms"], cached["bf16_ms"]) == (probe["fp32_ms"], probe["bf16_ms"])
    assert f"precision auto -> {choice['resolved']} (" in (first / "train.log").read_text()

    # 2 threads: a cache entry that would pick the other precision
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        key = precision.machine_key()
    finally:
        torch.set_num_threads(threads)
    entries = precision.read_cache()
    speedup = 0.5 if choice["resolved"] == "bf16" else 2.0
    entries[key] = {"fp32_ms": 10.0, "bf16_ms": 10.0 / speedup, "speedup": speedup, "pairs": 11,
                    "spread": 1.0, "quiet": True, "confirmed": True}
    precision.cache_file().parent.mkdir(parents=True, exist_ok=True)
    precision.cache_file().write_text(json.dumps(entries))
    launch(second, *TINY, "trainer.mixed_precision=auto", "trainer.max_steps=2", "trainer.micro_batch_size=8",
           "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2",
           f"resume={first / 'checkpoints' / 'step-1'}", env={"OMP_NUM_THREADS": "2"})
    resumed = read_metrics(second)
    assert resumed["resumed_from"].endswith("step-1") and resumed["updates"] == 2
    assert resumed["mixed_precision"] == choice["resolved"]
    assert resumed["precision"]["reason"].startswith(f"resume: the checkpoint trained in {choice['resolved']}")
    assert resumed["train_losses"] == pytest.approx(m["train_losses"], abs=1e-6)  # the same run, continued
