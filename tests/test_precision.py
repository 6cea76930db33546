"""trainer.mixed_precision=auto (issue 15, point 1): the probe's arithmetic with a fake clock, the decision on
each kind of machine, the per-machine cache, and a real run that records its choice."""

import json

import pytest
import torch

from conftest import TINY, launch, read_metrics
from dist_gacc import machine, precision

M, K, N = precision.PROBE_SHAPE
FLOP = 2 * M * K * N


def fake_machine(seconds_per_product: dict):
    """A clock that only moves when a product runs, by that dtype's cost; counts the products."""
    clock, calls = [0.0], {torch.float32: 0, torch.bfloat16: 0}

    def matmul(a, b):
        assert a.shape == (M, K) and b.shape == (K, N) and a.dtype == b.dtype
        clock[0] += seconds_per_product[a.dtype]
        calls[a.dtype] += 1

    return (lambda: clock[0]), matmul, calls


def test_probe_computes_gflops_from_the_timer_and_stops_after_min_seconds():
    timer, matmul, calls = fake_machine({torch.float32: 0.01, torch.bfloat16: 0.5})
    result = precision.probe(timer=timer, matmul=matmul, min_seconds=0.1)
    assert result["fp32_gflops"] == pytest.approx(FLOP / 0.01 / 1e9, abs=0.01)   # 60.4
    assert result["bf16_gflops"] == pytest.approx(FLOP / 0.5 / 1e9, abs=0.01)    # 1.21
    # warm-up + products until 0.1 s: fp32 1 + 10 (or 11 with float rounding), bf16 1 + 1 (one 0.5 s product)
    assert calls[torch.float32] in (11, 12) and calls[torch.bfloat16] == 2
    assert result["shape"] == [M, K, N] and not precision.bf16_faster(result)


@pytest.mark.parametrize("fp32_s, bf16_s, faster", [(0.01, 0.005, True), (0.01, 0.0095, False), (0.01, 0.7, False)])
def test_bf16_must_beat_fp32_by_the_margin(fp32_s, bf16_s, faster):
    timer, matmul, _ = fake_machine({torch.float32: fp32_s, torch.bfloat16: bf16_s})
    assert precision.bf16_faster(precision.probe(timer=timer, matmul=matmul, min_seconds=0.05)) is faster


def measured(fp32_gflops, bf16_gflops, calls=None):
    def measure():
        if calls is not None:
            calls.append(1)
        return {"fp32_gflops": fp32_gflops, "bf16_gflops": bf16_gflops, "shape": [M, K, N], "cached": False}
    return measure


def test_auto_on_a_cpu_measured_slow_for_bf16_is_fp32_and_says_why():
    calls = []
    choice = precision.resolve("auto", "cpu", capability="AVX512", arch="x86_64", native=False,
                               measure=measured(60.0, 0.9, calls))
    assert (choice.requested, choice.resolved, len(calls)) == ("auto", "no", 1)
    assert "bf16 0.9 vs fp32 60 GFLOP/s" in choice.reason and choice.warning is None
    assert choice.record()["probe"]["bf16_gflops"] == 0.9


def test_auto_on_a_cpu_measured_fast_for_bf16_is_bf16():
    choice = precision.resolve("auto", "cpu", capability="AVX512", arch="x86_64", native=True,
                               measure=measured(190.0, 400.0))
    assert choice.resolved == "bf16" and "bf16 400 vs fp32 190" in choice.reason


def test_auto_on_avx2_needs_no_probe():
    def never():
        raise AssertionError("AVX2 is conclusive: no probe")
    choice = precision.resolve("auto", "cpu", capability="AVX2", arch="x86_64", native=False, measure=never)
    assert choice.resolved == "no" and "AVX2" in choice.reason and choice.probe is None
    # the same capability on ARM is not conclusive: measured
    assert precision.resolve("auto", "cpu", capability="DEFAULT", arch="aarch64", native=False,
                             measure=measured(50.0, 120.0)).resolved == "bf16"


def test_explicit_bf16_on_a_slow_cpu_is_honoured_with_both_figures_in_a_warning():
    choice = precision.resolve("bf16", "cpu", capability="AVX2", arch="x86_64", native=False,
                               measure=measured(62.8, 0.9))
    assert choice.resolved == "bf16"
    assert "bf16 0.9 vs fp32 62.8 GFLOP/s" in choice.warning and "trainer.mixed_precision=auto" in choice.warning
    fast = precision.resolve("bf16", "cpu", capability="AVX512", arch="x86_64", native=True,
                             measure=measured(190.0, 400.0))
    assert fast.resolved == "bf16" and fast.warning is None


def test_cuda_and_explicit_choices():
    assert precision.resolve("auto", "cuda", cuda_bf16=lambda: True).resolved == "bf16"
    assert precision.resolve("auto", "cuda", cuda_bf16=lambda: False).resolved == "fp16"
    for requested in ("no", "fp16"):
        choice = precision.resolve(requested, "cpu", measure=measured(1.0, 1.0, calls := []))
        assert choice.resolved == requested and not calls


def test_the_probe_is_cached_per_machine(tmp_path, monkeypatch):
    path, runs = tmp_path / "cache" / "precision_probe.json", []
    first = precision.cached_probe(measured(60.0, 0.9, runs), path)
    again = precision.cached_probe(measured(1.0, 1.0, runs), path)
    assert (first["cached"], again["cached"], len(runs)) == (False, True, 1) and again["fp32_gflops"] == 60.0
    monkeypatch.setattr(precision, "machine_key", lambda: "another machine")
    other = precision.cached_probe(measured(190.0, 400.0, runs), path)
    assert (other["cached"], len(runs)) == (False, 2)
    assert len(json.loads(path.read_text())) == 2  # both machines kept


def test_launcher_passes_no_for_auto():
    from hydra_plugins.dist_gacc_launcher.accelerate_launcher import launcher_precision
    assert [launcher_precision(p) for p in ("auto", "no", False, "bf16")] == ["no", "no", "no", "bf16"]


def test_machine_record_names_cpu_capability_threads_and_ceiling():
    timer, matmul, _ = fake_machine({torch.float32: 0.02, torch.bfloat16: 1.0})
    assert machine.matmul_gflops(torch.float32, (M, K, N), timer=timer, matmul=matmul) == pytest.approx(
        FLOP / 0.02 / 1e9)
    info = machine.describe(measure=False)
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads() and info["cpu_model"]
    assert f"capability {info['cpu_capability']}" in machine.label(info)


@pytest.mark.slow
def test_a_run_with_auto_records_and_logs_its_choice(tmp_run):
    launch(tmp_run, *TINY, "trainer.mixed_precision=auto", "trainer.max_steps=2", "trainer.micro_batch_size=8")
    m = read_metrics(tmp_run)
    expected = precision.resolve("auto", "cpu")  # this machine's answer (same probe cache as the run)
    assert m["precision"]["requested"] == "auto"
    assert m["mixed_precision"] == m["precision"]["resolved"] == expected.resolved
    if expected.probe is None:  # decided by the CPU's capability: the same sentence
        assert m["precision"]["reason"] == expected.reason and m["precision"]["probe"] is None
    else:  # measured once by the run, then read from the cache here: the same figures
        assert {k: m["precision"]["probe"][k] for k in ("fp32_gflops", "bf16_gflops")} == \
            {k: expected.probe[k] for k in ("fp32_gflops", "bf16_gflops")} and expected.probe["cached"]
    assert f"precision auto -> {expected.resolved} (" in (tmp_run / "train.log").read_text()
