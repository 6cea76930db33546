"""scripts/summarize.py on hand-written sweeps: the per-job table with its seed column, and with several
seeds per cell the mean ± spread per cell and which differences exceed the seed spread."""

import json
import re
import runpy
import shutil
import sys

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from dist_gacc.summary import summarize

# (setting, seed) -> (best val F1, test F1, updates). b10x2's val range (0.830-0.840) lies wholly above
# b20's (0.810-0.824): separated. Their test ranges (0.790-0.810, 0.785-0.805) overlap.
JOBS = {
    ("b10x2_lr2e-5", 42): (0.830, 0.800, 800), ("b10x2_lr2e-5", 43): (0.840, 0.790, 800),
    ("b10x2_lr2e-5", 44): (0.835, 0.810, 800),
    ("b20_lr2e-5", 42): (0.810, 0.805, 400), ("b20_lr2e-5", 43): (0.820, 0.795, 800),
    ("b20_lr2e-5", 44): (0.824, 0.785, 800),
}


def fake_sweep(sweep_dir, seeds=(42, 43, 44), setting_key="+setting"):
    """Job folders as Hydra numbers them (setting, then seed), holding what load_jobs reads."""
    jobs = [(setting, seed) for setting in ("b20_lr2e-5", "b10x2_lr2e-5") for seed in seeds]
    for num, (setting, seed) in enumerate(jobs):
        val, test, updates = JOBS[setting, seed]
        micro, n = (20, 1) if setting == "b20_lr2e-5" else (10, 2)
        job = sweep_dir / str(num)
        (job / ".hydra").mkdir(parents=True)
        overrides = ["+task=english_minilm", f"{setting_key}={setting}"]
        overrides += [f"seed={seed}"] if len(seeds) > 1 else []
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "data": {"name": "rotten_tomatoes"}}))
        history = [{"update": u, "optimizer_step": u, "f1": f}
                   for u, f in ((updates // 2, val - 0.01), (updates, val))]
        (job / "metrics.json").write_text(json.dumps({
            "micro_batch_size": micro, "grad_accum_steps": n, "world_size": 1, "effective_batch_size": 20,
            "lr": 2e-5, "updates": updates, "optimizer_steps": updates,
            "best": {"update": updates, "f1": val},
            "eval": {"f1": val, "average": "binary", "f1_macro": val}, "test": {"f1": test},
            "stopped_early": updates < 800, "wall_seconds": 100.0 + seed, "history": history,
            "train_losses": [0.7 - 0.0005 * i for i in range(updates)],
        }))
    return sweep_dir


def test_three_seeds_give_mean_spread_and_marks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # The script in this process (a fresh interpreter would spend most of the test importing torch).
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(fake_sweep(tmp_path / "sweep")), "--out", str(out)])
    runpy.run_path(str(ROOT / "scripts" / "summarize.py"), run_name="__main__")
    printed = capsys.readouterr().out
    jobs = pd.read_csv(out / "summary.csv")
    assert len(jobs) == 6 and set(jobs["setting"]) == {"b10x2_lr2e-5", "b20_lr2e-5"}  # the seed is no label
    assert list(jobs["seed"]) == [42, 43, 44, 42, 43, 44]

    cells = pd.read_csv(out / "summary_seeds.csv").set_index("setting")
    a, b = cells.loc["b10x2_lr2e-5"], cells.loc["b20_lr2e-5"]
    assert a["n_seeds"] == 3 and a["seeds"] == "42,43,44"
    # b10x2 val: 0.830 0.840 0.835 -> mean 0.835, deviations -5e-3 5e-3 0 -> std sqrt(50e-6 / 2) = 0.005
    assert (a["val_f1_mean"], a["val_f1_std"], a["val_f1_min"], a["val_f1_max"]) == pytest.approx(
        (0.835, 0.005, 0.830, 0.840))
    # b20 val: 0.810 0.820 0.824 -> mean 0.818, deviations -8e-3 2e-3 6e-3 -> std sqrt(104e-6 / 2)
    assert (b["val_f1_mean"], b["val_f1_std"], b["val_f1_min"], b["val_f1_max"]) == pytest.approx(
        (0.818, 52e-6 ** 0.5, 0.810, 0.824))
    assert (a["test_f1_mean"], a["test_f1_std"]) == pytest.approx((0.800, 0.010))
    assert (b["test_f1_mean"], b["test_f1_std"], b["test_f1_min"], b["test_f1_max"]) == pytest.approx(
        (0.795, 0.010, 0.785, 0.805))
    assert b["updates_mean"] == pytest.approx(2000 / 3) and b["wall_seconds_mean"] == pytest.approx(143.0)

    pairs = pd.read_csv(out / "summary_seeds_comparisons.csv")
    assert len(pairs) == 1
    pair = pairs.iloc[0]
    assert (pair["setting_a"], pair["setting_b"]) == ("b10x2_lr2e-5", "b20_lr2e-5")
    assert pair["val_f1_diff"] == pytest.approx(0.017) and bool(pair["val_f1_exceeds_seed_spread"]) is True
    assert pair["test_f1_diff"] == pytest.approx(0.005) and bool(pair["test_f1_exceeds_seed_spread"]) is False

    md = (out / "summary_seeds.md").read_text()
    row = re.sub(r" +", " ", md)  # markdown pads its columns
    b10x2 = "| b10x2_lr2e-5 | 3 (42,43,44) | 0.835 ± 0.005 (0.830–0.840) | 0.800 ± 0.010 (0.790–0.810) |"
    assert b10x2 in row
    assert "| 667 (400–800) |" in row
    assert "| +0.017 | **exceeds seed spread** | +0.005 | within seed spread |" in row
    assert "min–max ranges over seeds do not overlap" in md  # the rule, stated with the table
    assert md in printed and printed.index("| rotten_tomatoes |") < printed.index(md)  # after the job table
    for png in ("val_f1.png", "train_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_keeps_the_old_tables(tmp_path):
    out = tmp_path / "out"
    summarize(fake_sweep(tmp_path / "multi"), out)
    assert (out / "summary_seeds.md").exists()
    table = summarize(fake_sweep(tmp_path / "single", seeds=(42,)), out)  # same --out: stale seed files go
    assert list(table["setting"]) == ["b10x2_lr2e-5", "b20_lr2e-5"] and list(table["seed"]) == [42, 42]
    assert list(table["best_val_f1"]) == [0.830, 0.810]
    assert not list(out.glob("summary_seeds*"))
    assert "| rotten_tomatoes | b10x2_lr2e-5 | 42 |" in re.sub(r" +", " ", (out / "summary.md").read_text())


def test_seed_is_not_a_setting_label_without_setting_override(tmp_path):
    # No `setting=` override: the label is the varying overrides, less the seed.
    summarize(fake_sweep(tmp_path / "sweep", setting_key="optim.name"), tmp_path)
    cells = pd.read_csv(tmp_path / "summary_seeds.csv")
    assert list(cells["setting"]) == ["optim.name=b10x2_lr2e-5", "optim.name=b20_lr2e-5"]
    assert list(cells["n_seeds"]) == [3, 3]


def test_a_one_seed_cell_is_never_marked(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    for job in ("1", "2"):  # b20 keeps seed 42 only: its range is one point, below all of b10x2's
        shutil.rmtree(sweep / job)
    summarize(sweep, tmp_path)
    pair = pd.read_csv(tmp_path / "summary_seeds_comparisons.csv").iloc[0]
    assert pair["min_seeds"] == 1 and not pair["val_f1_exceeds_seed_spread"]
    md = re.sub(r" +", " ", (tmp_path / "summary_seeds.md").read_text())
    assert "| b20_lr2e-5 | 1 (42) | 0.810 (0.810–0.810) |" in md and "| too few seeds |" in md
