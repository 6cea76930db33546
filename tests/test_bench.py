"""The benchmark in quick mode: every table has every row, the three loops do the same math, and
gradients are all-reduced once per optimizer update (counted by a DDP communication hook on 2 ranks).

No speed thresholds here: speed is measured by scripts/bench.py in full mode (docs/benchmarks.md).
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


@pytest.mark.slow
def test_every_table_has_every_row(bench):
    results, stdout, out = bench
    assert [r["variant"] for r in results["speed"]] == [
        "(a) dist-gacc loop", "(b) hand-written loop", "(c) transformers Trainer"]
    for row in results["speed"]:
        assert row["samples_per_s"] > 0 and 0 < row["fraction_of_matmul_ceiling"] and row["peak_mb"] > 0
    assert [r["N"] for r in results["memory"]] == [1, 2, 4, 8]
    assert [r["single_batch"] for r in results["memory"]] == [4, 8, 16, 32]
    assert [r["feature"] for r in results["features"]] == [
        "per-batch dynamic padding", "length-grouped batches", "DataLoader workers (2)", "fused AdamW",
        "torch.compile", "fused AdamW (optimizer step alone)", "tokenization cached"]
    assert all(r["speedup"] > 0 for r in results["features"])
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
