"""The benchmark in quick mode: every table has every row, the three loops do the same math,
gradients are all-reduced once per optimizer update (counted by a DDP communication hook on 2 ranks), time
to F1 has both sides with their real F1s, and every result names its machine.

Functional only: no timing is asserted (quick mode, one run, a shared CPU). Speed is measured by
scripts/bench.py in full mode on a quiet machine (docs/benchmarks.md).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import ROOT, run_script

MACHINE_KEYS = {"cpu_model", "cpu_capability", "native_bf16", "bf16_flags", "cpu_count", "torch_threads", "fp32_gflops", "gpu",
                "torch", "threads_per_process"}


# Every section but data_scale, whose quick pass test_data_scale.py::test_data_scale_section_quick_mode runs
# (the same function, the same rows): the suite ran it twice.
SECTIONS = "speed,math,memory,comm,features,levers,time_to_f1"
# One torch thread per process, as every other launch of the suite (conftest.launch: OMP_NUM_THREADS=1). Quick
# timings mean nothing, and on a loaded 2-core machine 2 threads made the same 7 updates 10-20x slower (measured:
# 1.1-1.3 s at 1 thread, 14-26 s at 2, load 6). A non-default value also checks that --threads is applied.
THREADS = 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # `python scripts/bench.py ...`, forked from the suite's fork server (its own imports done); its workers and
    # launches are real processes
    proc = run_script(ROOT / "scripts" / "bench.py", "--quick", "--sections", SECTIONS, "--threads", str(THREADS),
                      "--out", str(out), "--work-dir", str(out / "work"), timeout=900)
    return json.loads((out / "results.json").read_text()), proc.stdout, out


# conf/model/tiny.yaml as the benchmark builds it: hidden 128, 2 layers, FFN 256, vocabulary 8000.
TINY_PARAMS = (8000 * 128 + 512 * 128 + 2 * 128 + 2 * 128          # word, position, type embeddings; LayerNorm
               + 2 * (4 * (128 * 128 + 128) + 2 * 128                # per layer: Q, K, V, O; LayerNorm
                      + 128 * 256 + 256 + 256 * 128 + 128 + 2 * 128)  # FFN in, out; LayerNorm
               + 128 * 128 + 128 + 2 * 128 + 2)                      # pooler, classifier = 1,371,778
# Training FLOPs per sample the speed table counts (bench_worker.model_flops), rows padded to T = 128:
# 6 x T x encoder Linear weights (2 x (4 x 128^2 + 2 x 128 x 256) = 262,144) + attention 12 x L x T^2 x H
# + 6 x head Linear weights (128^2 + 2 x 128 = 16,640) = 201,326,592 + 50,331,648 + 99,840
FLOPS_PER_SAMPLE = 6 * 128 * 262_144 + 12 * 2 * 128 * 128 * 128 + 6 * 16_640  # 251,758,080


@pytest.mark.slow
def test_every_table_has_every_row(bench):
    """Rows and their arithmetic (no timing is compared: quick mode on a shared CPU measured the three loops
    from 0.45x to 14x of each other). Peak RSS of a quick run: ~600 MB."""
    results, stdout, out = bench
    assert [r["variant"] for r in results["speed"]] == [
        "(a) dist-gacc loop", "(b) hand-written loop", "(c) transformers Trainer"]
    speed = {r["variant"]: r for r in results["speed"]}
    assert speed["(b) hand-written loop"]["ratio_to_hand"] == 1.0
    for row in results["speed"]:
        # the same work (micro 8 x N 4, rows padded to 128 tokens), so the same FLOPs per sample...
        assert row["tokens_per_sample"] == 128 and row["micro x N"] == "8 x 4"
        assert row["model_tflops_per_s"] * 1e12 / row["samples_per_s"] == pytest.approx(FLOPS_PER_SAMPLE, rel=1e-6)
        # the ratio is of this run's speeds, and the ceiling fraction of this run's matmul ceiling
        assert row["ratio_to_hand"] == pytest.approx(
            row["samples_per_s"] / speed["(b) hand-written loop"]["samples_per_s"], rel=1e-9), row
        assert row["fraction_of_matmul_ceiling"] == pytest.approx(
            row["model_tflops_per_s"] / row["matmul_ceiling_tflops"], rel=1e-9), row
        assert row["runs"] == 1 and row["samples_per_s"] > 0
        # peak RSS in MB: above weights, gradients and two Adam moments (4 x 5.2 MB), below 8 GB for a
        # tiny model (ru_maxrss is KiB on Linux: a unit slip would read ~600,000)
        assert 4 * TINY_PARAMS * 4 / 2**20 < row["peak_mb"] < 8192, row

    memory = {r["N"]: r for r in results["memory"]}
    assert list(memory) == [1, 2, 4, 8]
    for n, row in memory.items():
        assert (row["micro"], row["micro_batches"], row["single_batch"]) == (4, 8, 4 * n)
    # Accumulating 8 micro-batches of 4 holds no more than one (measured: 599 MB for every N, in both
    # columns); one batch of 32 does need more (measured 694 MB): accumulation is what saves it.
    assert memory[8]["ratio_to_N1"] <= 1.05 and memory[8]["live_ratio_to_N1"] <= 1.05
    assert memory[8]["accumulated_peak_mb"] < memory[8]["single_batch_peak_mb"]

    comm = results["comm"]
    assert [(r["mode"], r["N"]) for r in comm] == [("accumulate()", 1), ("accumulate()", 4),
                                                   ("sync every micro-batch", 4)]
    # All-reduced gradient bytes: every fp32 parameter once per update, or once per micro-batch.
    assert [r["grad_mb_per_update"] for r in comm] == pytest.approx(
        [TINY_PARAMS * 4 / 2**20] * 2 + [4 * TINY_PARAMS * 4 / 2**20], rel=1e-9)
    assert [r["buckets_per_update"] for r in comm] == [2, 2, 8]

    assert [r["feature"] for r in results["features"]] == [
        "per-batch dynamic padding", "length-grouped batches", "DataLoader workers (2)", "fused AdamW",
        "torch.compile", "fused AdamW (optimizer step alone)", "tokenization cached"]
    features = {r["feature"]: r for r in results["features"]}
    for row in results["features"]:  # speedup > 1 means faster, whichever the unit
        faster = row["on"] / row["off"] if row["unit"] == "samples/s" else row["off"] / row["on"]
        assert row["speedup"] == pytest.approx(faster, rel=1e-9), row
    # Measured in quick mode (not asserted: timings): dynamic padding 3.0x idle, 1.9x under load; cached
    # tokenization 15.8x, 6.3x; fused AdamW's step 9.6x, 9.2x.
    assert all(row["on"] > 0 and row["off"] > 0 for row in features.values())
    # quick mode compiles through the trainer's TorchDynamoPlugin with a backend that generates no code
    assert features["torch.compile"]["setting"] == "trainer.compile=true (quick: backend aot_eager)"
    for section in ("speed", "speed_paired", "math", "memory", "comm", "features", "time_to_f1"):
        assert f"## {section}" in stdout  # the printed table
    assert (out / "memory.png").stat().st_size > 1000 and (out / "tables.md").exists()


@pytest.mark.slow
def test_the_three_loops_do_the_same_math(bench):
    rows = {r["variant"]: r for r in bench[0]["math"]}
    hand = rows["(b) hand-written loop"]
    for variant in ("(a) dist-gacc loop", "(c) transformers Trainer"):
        assert rows[variant]["max_abs_param_diff_vs_hand"] < 1e-6
        assert rows[variant]["first_grad_norm"] == pytest.approx(hand["first_grad_norm"], rel=1e-5)
        assert rows[variant]["first_loss"] == pytest.approx(hand["first_loss"], rel=1e-6)
    # The shipped Trainer does not divide by N = 4 for BERT: its first gradient is 4 times too large.
    assert rows["(c0) Trainer as shipped"]["grad_norm_ratio_to_hand"] == pytest.approx(4.0, rel=1e-4)


@pytest.mark.slow
def test_one_gradient_allreduce_per_update_for_n1_and_n4(bench):
    rows = bench[0]["comm"]
    by_mode = {(r["mode"], r["N"]): r for r in rows}
    for n in (1, 4):
        row = by_mode[("accumulate()", n)]
        assert row["grad_allreduces_per_update"] == [1] * len(row["grad_allreduces_per_update"])
        assert len(row["grad_allreduces_per_update"]) == 3  # warm-up + 2 timed updates
        assert row["scalar_allreduces_per_update"] == 2  # out-of-memory agreement; loss sum, count, stop votes
    each = by_mode[("sync every micro-batch", 4)]
    assert each["grad_allreduces_per_update"] == [4, 4, 4]
    # every backward exchanges gradients, so the out-of-memory vote follows every forward pass (4), + totals
    assert each["scalar_allreduces_per_update"] == 5


@pytest.mark.slow
def test_levers_table_has_every_lever_and_micro_batch(bench):
    """The memory-levers rows (quick: tiny model, one process, so the memory figures are not meaningful):
    every lever x micro-batch, LoRA training a small fraction, checkpointing training everything."""
    results, stdout, _ = bench
    rows = results["levers"]
    assert [(r["lever"], r["micro"]) for r in rows] == [(lever, micro) for micro in (2, 4) for lever in
                                                       ("plain", "checkpointing", "lora", "lora+checkpointing")]
    trainable = {r["lever"]: r["trainable_params"] for r in rows}
    assert trainable["plain"] == trainable["checkpointing"] == TINY_PARAMS
    # LoRA r 8 on query and value of 2 layers: 2 x 2 x (128 x 8 + 8 x 128) = 8,192, plus the head
    # (pooler is frozen; the classifier 128 x 2 + 2 trains): 8,450
    assert trainable["lora"] == trainable["lora+checkpointing"] == 2 * 2 * (128 * 8 + 8 * 128) + 128 * 2 + 2
    assert all(r["samples_per_s"] > 0 and r["live_peak_mb"] > 0 for r in rows)
    fit = {r["lever"]: r for r in results["levers_fit"]}
    assert set(fit) == {"plain", "checkpointing", "lora", "lora+checkpointing"} and "2 GiB" in fit["plain"]


@pytest.mark.slow
def test_paired_speed_ratios(bench):
    """Each repeat's (a)/(b) and (a)/(c) speed ratio; quick mode: one repeat, so the median is that ratio."""
    results = bench[0]
    speed = {r["variant"]: r["samples_per_s"] for r in results["speed"]}
    rows = {r["pair"]: r for r in results["speed_paired"]}
    assert list(rows) == ["(a) / (b)", "(a) / (c)"]
    for pair, other in (("(a) / (b)", "(b) hand-written loop"), ("(a) / (c)", "(c) transformers Trainer")):
        row = rows[pair]
        assert row["repeats"] == 1 and len(row["ratios"]) == 1
        assert row["median_ratio"] == pytest.approx(speed["(a) dist-gacc loop"] / speed[other], rel=1e-9)
        assert row["min_ratio"] <= row["median_ratio"] <= row["max_ratio"] and row["half_iqr"] == 0


@pytest.mark.slow
def test_time_to_f1_both_sides(bench):
    """The default job (quick: tiny) by scripts/train.py and by the Trainer, the same number of repeats, each
    with its final validation F1; ours is the F1 its run wrote to metrics.json, the Trainer's the one
    trainer_baseline.json holds, and the timed line was the run's final evaluation."""
    results = bench[0]
    runs = results["time_to_f1_runs"]
    sides = [r["side"] for r in runs]
    assert sides.count("dist_gacc") == sides.count("hf_trainer") == 1  # quick: one repeat
    for run in runs:
        assert 0 <= run["f1"] <= 1 and run["f1_lines"] == 1, run
        assert 0 < run["seconds_to_f1"] <= run["process_seconds"], run
        assert math.isfinite(run["child_clock_seconds_to_f1"])
        if run["side"] == "dist_gacc":
            metrics = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
            assert run["f1"] == metrics["eval"]["f1"] == metrics["history"][-1]["f1"]
            assert run["update"] == metrics["updates"] == metrics["history"][-1]["update"]
            assert run["logged_f1"] == pytest.approx(metrics["eval"]["f1"], abs=5e-5)
        else:
            record = json.loads((Path(run["run_dir"]) / "trainer_baseline.json").read_text())
            assert run["f1"] == record["f1"] and record["updates"] == record["total_updates"] == run["update"]
    ours = next(r for r in runs if r["side"] == "dist_gacc")
    theirs = next(r for r in runs if r["side"] == "hf_trainer")
    assert ours["update"] == theirs["update"]  # the same number of updates: the same job
    table = results["time_to_f1"]
    assert [row["repeat"] for row in table] == [0, "median"]
    assert table[0]["ours_f1"] == ours["f1"] and table[0]["trainer_f1"] == theirs["f1"]
    assert table[0]["ratio_ours_to_trainer"] == pytest.approx(ours["seconds_to_f1"] / theirs["seconds_to_f1"])


@pytest.mark.slow
def test_results_name_their_machine(bench):
    results, stdout, out = bench
    record = results["machine"]
    assert set(record) == MACHINE_KEYS
    assert record["torch_threads"] == record["threads_per_process"] == results["args"]["threads"] == THREADS
    assert record["fp32_gflops"] > 0 and record["cpu_model"] and record["cpu_capability"]
    from dist_gacc import machine

    label = machine.label(record)
    assert results["machine_label"] == label
    assert next(line for line in stdout.splitlines() if line.startswith("machine: ")).startswith(f"machine: {label}")
    assert (out / "tables.md").read_text().startswith(f"machine: {label}")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_new_machine_gets_its_own_results_folder(tmp_path):
    """Default: docs/benchmarks/<cpu model>-<capability>-<threads>t; an --out holding another machine's
    results (or the one-line record of old runs) gets a per-machine subfolder, the same machine's is reused."""
    bench = _bench_module()
    here = {"cpu_model": "AMD EPYC", "cpu_capability": "AVX2", "torch_threads": 2, "gpu": None, "fp32_gflops": 60.0}
    assert bench.machine_slug(here) == "amd-epyc-avx2-2t"
    assert bench.output_folder(None, here) == ROOT / "docs" / "benchmarks" / "amd-epyc-avx2-2t"
    assert bench.output_folder(str(tmp_path), here) == tmp_path  # nothing there yet
    (tmp_path / "results.json").write_text(json.dumps({"machine": "AMD EPYC, 2 cores, no GPU, torch 2.13.0+cpu"}))
    assert bench.output_folder(str(tmp_path), here) == tmp_path / "amd-epyc-avx2-2t"  # the old one-line record
    (tmp_path / "results.json").write_text(json.dumps({"machine": {**here, "fp32_gflops": 70.0}}))
    assert bench.output_folder(str(tmp_path), here) == tmp_path  # the same machine: its tables are updated
    (tmp_path / "results.json").write_text(json.dumps({"machine": {**here, "cpu_capability": "AVX512"}}))
    assert bench.output_folder(str(tmp_path), here) == tmp_path / "amd-epyc-avx2-2t"
    # same name, capability and threads, but a third of the fp32 ceiling: another machine
    (tmp_path / "results.json").write_text(json.dumps({"machine": {**here, "fp32_gflops": 190.0}}))
    assert bench.output_folder(str(tmp_path), here) == tmp_path / "amd-epyc-avx2-2t"
    gpu = {**here, "gpu": "NVIDIA H100 80GB HBM3"}
    assert bench.machine_slug(gpu) == "amd-epyc-avx2-2t-nvidia-h100-80gb-hbm3"


def test_order_balanced_time_to_f1_ratio():
    """Each order's geometric mean, then their geometric mean: a first-of-pair slowdown cancels out."""
    bench = _bench_module()
    # measured pattern: ours first 426.8 vs 407.9 (x2), Trainer first 411.4 vs 429.1
    rows = [{"first": "ours", "ratio_ours_to_trainer": 426.8 / 407.9},
            {"first": "Trainer", "ratio_ours_to_trainer": 411.4 / 429.1},
            {"first": "ours", "ratio_ours_to_trainer": 426.8 / 407.9}]
    expected = math.sqrt((426.8 / 407.9) * (411.4 / 429.1))
    assert bench.order_balanced_ratio(rows) == pytest.approx(expected, rel=1e-12)  # 1.0014; the median is 1.046
    assert bench.order_balanced_ratio(rows[:1]) is None  # one order only: nothing to balance


def test_accumulation_peers_rows_are_ratios_of_n4_to_n1():
    """The accumulation_peers table from worker results (no run: the section itself is
    `scripts/bench.py --sections accumulation_peers`, docs/benchmarks.md §11): one row per case and variant, in
    their order, the logged loss and first gradient norm at N = 1 and N = 4 and each ratio N=4 / N=1."""
    bench = _bench_module()

    def result(case, variant, n, loss, norm):
        return {"spec": {"case": case, "variant": variant, "accum": n, "micro": 16 // n},
                "logged_loss": loss, "first_grad_norm": norm}

    results = [result("single-label", "dist_gacc", 1, 0.8161, 7.6), result("single-label", "dist_gacc", 4, 0.8161, 7.6),
               result("single-label", "hf_trainer_stock", 1, 0.8161, 7.6),
               result("single-label", "hf_trainer_stock", 4, 3.2644, 30.4),
               result("regression", "dist_gacc", 1, 2.0, 3.0), result("regression", "dist_gacc", 4, 2.0, 3.0)]
    rows = bench.peer_rows(results)
    assert [(r["case"], r["variant"]) for r in rows] == [
        ("single-label", "dist-gacc"), ("single-label", "Trainer as shipped"), ("regression", "dist-gacc")]
    assert rows[1]["loss_N4"] == 3.2644 and rows[1]["grad_norm_N1"] == 7.6
    assert rows[1]["loss_ratio"] == pytest.approx(4.0) and rows[1]["grad_norm_ratio"] == pytest.approx(4.0)
    assert rows[0]["loss_ratio"] == rows[0]["grad_norm_ratio"] == rows[2]["loss_ratio"] == 1.0
