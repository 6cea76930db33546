"""The benchmark in quick mode: every table has every row, the three loops do the same math, and
gradients are all-reduced once per optimizer update (counted by a DDP communication hook on 2 ranks).

Speed itself is measured by scripts/bench.py in full mode (docs/benchmarks.md); here timings are only
compared where the margin is wide (quick mode, one run, a shared 2-core CPU): same-work loops within 5x
of each other, and features that remove most of the work.
"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(out),
                           "--work-dir", str(out / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
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
    """Rows and their arithmetic; timings only where a 2-core CPU in quick mode keeps a wide margin.
    Measured in two quick runs, the machine idle / shared with two test suites (load 5 on 2 cores):
    (a) 114 / 7.6, (b) 120 / 17.0, (c) 120 / 18.3 samples/s; ceiling fraction 0.27 / 0.02; peak 600 MB."""
    results, stdout, out = bench
    assert [r["variant"] for r in results["speed"]] == [
        "(a) dist-gacc loop", "(b) hand-written loop", "(c) transformers Trainer"]
    speed = {r["variant"]: r for r in results["speed"]}
    assert speed["(b) hand-written loop"]["ratio_to_hand"] == 1.0
    for row in results["speed"]:
        # the same work (micro 8 x N 4, rows padded to 128 tokens), so the same FLOPs per sample...
        assert row["tokens_per_sample"] == 128 and row["micro x N"] == "8 x 4"
        assert row["model_tflops_per_s"] * 1e12 / row["samples_per_s"] == pytest.approx(FLOPS_PER_SAMPLE, rel=1e-6)
        # ...at a comparable speed (ratio to (b) measured 0.94-1.07 idle, 0.45 under load, 14 once with a
        # MiniLM training run competing for the 2 cores): a factor of 30 either way is a regression, not noise
        assert 1 / 30 < row["ratio_to_hand"] < 30, row
        assert 0 < row["fraction_of_matmul_ceiling"] < 1.5, row  # a model cannot beat a bare matmul by far
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
    # Padding each batch to its longest row instead of 128 removes most of the work (measured 3.0x idle,
    # 1.9x under load); a cached tokenization skips the tokenizer (15.8x, 6.3x); fused AdamW's step
    # (9.6x, 9.2x).
    assert features["per-batch dynamic padding"]["speedup"] > 1.2
    assert features["tokenization cached"]["speedup"] > 2
    assert features["fused AdamW (optimizer step alone)"]["speedup"] > 1.5
    for section in ("speed", "math", "memory", "comm", "features"):
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
