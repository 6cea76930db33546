"""Summarise a sweep: one row per job (dataset x setting x seed) and plots of F1 and loss against updates.
Each row carries the TF-IDF baseline's validation and test F1 beside the model's (metrics.json `baseline`).
The figures are the run's trainer.metric (metrics.json `metric`: f1, or pearson/spearman/mse for regression);
a sweep that chose one other than f1 gets columns named after it (best_val_pearson, baseline_val_pearson...).

With several seeds per (dataset, setting) cell it also writes summary_seeds.{csv,md}: each cell's mean,
sample standard deviation and min-max range over seeds, and per dataset every pair of settings with
the difference of their means, marked "exceeds seed spread" only when the two cells' ranges over seeds
do not overlap (every seed of one scored above every seed of the other).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import yaml

COLUMNS = ["dataset", "setting", "seed", "micro_batch_size", "grad_accum_steps", "world_size",
           "effective_batch_size", "lr", "updates", "best_update", "metric", "best_val_f1", "final_val_f1",
           "baseline_val_f1", "test_f1", "baseline_test_f1", "stopped_early", "wall_seconds"]


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(item.lstrip("+~").split("=", 1) for item in items or [] if "=" in item)


def _labels(job_dirs: list[Path]) -> list[str]:
    """A job's `setting=` choice if it has one, else the overrides that vary across the sweep.

    The seed is never part of the label (it has its own column): jobs that differ only in seed are
    the same cell."""
    overrides = [_overrides(d) for d in job_dirs]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys
               if len({o.get(k) for o in overrides}) > 1 and k not in ("task", "data", "model", "seed")]
    labels = []
    for o in overrides:
        if "setting" in o:
            labels.append(o["setting"])
        else:
            labels.append(" ".join(f"{k}={o.get(k)}" for k in varying) or "default")
    return labels


def run_metric(metrics: dict) -> str:
    """The run's trainer.metric (metrics.json `metric`); records from before that key: f1."""
    return metrics.get("metric", "f1")


def sweep_metric(jobs: list[dict]) -> str:
    """The metric every job chose; `f1` names the columns when jobs differ (the `metric` column tells)."""
    chosen = {j["row"]["metric"] for j in jobs}
    return chosen.pop() if len(chosen) == 1 else "f1"


def load_jobs(sweep_dir: Path) -> list[dict]:
    """Every finished job under the sweep directory (a folder with metrics.json and config.yaml)."""
    jobs = []
    job_dirs = [f.parent for f in sorted(sweep_dir.glob("*/metrics.json"))]
    for job_dir, label in zip(job_dirs, _labels(job_dirs)):
        metrics = json.loads((job_dir / "metrics.json").read_text())
        config = yaml.safe_load((job_dir / "config.yaml").read_text())
        best = metrics.get("best") or {}
        metric = run_metric(metrics)
        base = metrics.get("baseline") or {}
        jobs.append({
            "dir": job_dir, "metrics": metrics,
            "row": {
                "dataset": config["data"]["name"], "setting": label, "seed": config.get("seed"),
                "micro_batch_size": metrics["micro_batch_size"], "grad_accum_steps": metrics["grad_accum_steps"],
                "world_size": metrics["world_size"], "effective_batch_size": metrics["effective_batch_size"],
                "lr": metrics["lr"], "updates": metrics.get("updates", metrics["optimizer_steps"]),
                "best_update": best.get("update"), "metric": metric,
                # The *_f1 columns hold the run's metric (named in `metric`; summarize renames them when the
                # whole sweep has one other than f1, e.g. best_val_pearson).
                "best_val_f1": best.get(metric, metrics["eval"][metric]),
                "final_val_f1": metrics["eval"][metric],
                # The F1 average in effect (binary / macro / micro...) and macro F1 next to it (absent in
                # runs older than the per-label report).
                "f1_average": metrics["eval"].get("average"), "val_f1_macro": metrics["eval"].get("f1_macro"),
                "class_weights": metrics.get("class_weights_setting", "none"),
                "test_f1": (metrics.get("test") or {}).get(metric),
                # The TF-IDF baseline on the same splits (trainer.baseline), beside the model's F1 it compares
                # with (final_val_f1 is the F1 of the model in model/); empty where none was fitted.
                "baseline_val_f1": (base.get("validation") or {}).get(metric),
                "baseline_test_f1": (base.get("test") or {}).get(metric),
                "stopped_early": metrics.get("stopped_early", False),
                "wall_seconds": round(metrics["wall_seconds"], 1),
            },
        })
    return jobs


def _plot(jobs: list[dict], path: Path, series, ylabel: str) -> None:
    """One panel per dataset, one colour per setting; with several seeds, one thin line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({j["row"]["dataset"] for j in jobs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        cells: dict[str, list[dict]] = {}
        for job in sorted((j for j in jobs if j["row"]["dataset"] == dataset),
                          key=lambda j: (j["row"]["setting"], str(j["row"]["seed"]))):
            cells.setdefault(job["row"]["setting"], []).append(job)
        for colour, (setting, cell) in zip(itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"]),
                                           cells.items()):
            many = len(cell) > 1
            for i, job in enumerate(cell):
                x, y = series(job["metrics"])
                ax.plot(x, y, color=colour, linewidth=1.0 if many else 1.5, alpha=0.7 if many else 1.0,
                        marker="o" if len(x) < 30 else None, markersize=2 if many else 3,
                        label=(f"{setting} ({len(cell)} seeds)" if many else setting) if i == 0 else None)
        ax.set_title(dataset)
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SEED_METRICS = {"val_f1": "best_val_f1", "test_f1": "test_f1"}
CELLS_CAPTION = ("Each cell: mean over seeds ± sample standard deviation (n−1), then the min–max range "
                 "over seeds in parentheses.")
RULE_CAPTION = (
    "Δ = mean of A − mean of B over seeds. Marked **exceeds seed spread** only when the two cells' "
    "min–max ranges over seeds do not overlap: every seed of one setting scored strictly above every seed "
    "of the other (both cells need ≥2 seeds). An unmarked difference lies within the seed noise: not even "
    "its sign is established.")


def _fmt(mean: float, std: float, lo: float, hi: float) -> str:
    if pd.isna(mean):
        return ""
    spread = f" ± {std:.3f}" if not pd.isna(std) else ""
    return f"{mean:.3f}{spread} ({lo:.3f}–{hi:.3f})"


def seed_cells(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, setting): seeds, mean, sample std and min-max of best val and test F1,
    mean updates and wall seconds."""
    rows = []
    for (dataset, setting), cell in table.groupby(["dataset", "setting"], sort=True):
        row = {"dataset": dataset, "setting": setting, "n_seeds": len(cell),
               "seeds": ",".join(str(s) for s in sorted(cell["seed"].dropna().tolist()))}
        for name, column in SEED_METRICS.items():
            values = pd.to_numeric(cell[column], errors="coerce").dropna()
            row.update({f"{name}_mean": values.mean(), f"{name}_std": values.std(ddof=1),
                        f"{name}_min": values.min(), f"{name}_max": values.max()})
        row.update({"updates_mean": cell["updates"].mean(), "updates_min": cell["updates"].min(),
                    "updates_max": cell["updates"].max(), "wall_seconds_mean": cell["wall_seconds"].mean()})
        rows.append(row)
    return pd.DataFrame(rows)


def exceeds_seed_spread(a: pd.Series, b: pd.Series, name: str) -> bool:
    """True when cells a and b (rows of seed_cells) have ≥2 seeds each and their min-max ranges of
    `name` do not overlap."""
    if a["n_seeds"] < 2 or b["n_seeds"] < 2 or pd.isna(a[f"{name}_mean"]) or pd.isna(b[f"{name}_mean"]):
        return False
    return bool(a[f"{name}_min"] > b[f"{name}_max"] or b[f"{name}_min"] > a[f"{name}_max"])


def seed_comparisons(cells: pd.DataFrame) -> pd.DataFrame:
    """Every pair of settings within a dataset: difference of means (A − B) and whether it exceeds the
    seed spread, for best validation F1 and test F1."""
    rows = []
    for dataset, group in cells.groupby("dataset", sort=True):
        for (_, a), (_, b) in itertools.combinations(group.sort_values("setting").iterrows(), 2):
            row = {"dataset": dataset, "setting_a": a["setting"], "setting_b": b["setting"]}
            for name in SEED_METRICS:
                row[f"{name}_diff"] = a[f"{name}_mean"] - b[f"{name}_mean"]
                row[f"{name}_exceeds_seed_spread"] = exceeds_seed_spread(a, b, name)
            row["min_seeds"] = min(a["n_seeds"], b["n_seeds"])
            rows.append(row)
    return pd.DataFrame(rows, columns=["dataset", "setting_a", "setting_b", "val_f1_diff",
                                       "val_f1_exceeds_seed_spread", "test_f1_diff", "test_f1_exceeds_seed_spread",
                                       "min_seeds"])


def seeds_markdown(cells: pd.DataFrame, comparisons: pd.DataFrame) -> str:
    """summary_seeds.md: the per-cell table, then one comparisons table per dataset, with the rule."""
    shown = pd.DataFrame({
        "dataset": cells["dataset"], "setting": cells["setting"],
        "seeds": [f"{n} ({s})" for n, s in zip(cells["n_seeds"], cells["seeds"])],
        **{f"{'best val' if name == 'val_f1' else 'test'} F1 mean ± std (min–max)": [
            _fmt(r[f"{name}_mean"], r[f"{name}_std"], r[f"{name}_min"], r[f"{name}_max"])
            for _, r in cells.iterrows()] for name in SEED_METRICS},
        "updates": [f"{r.updates_mean:.0f}" if r.updates_min == r.updates_max
                    else f"{r.updates_mean:.0f} ({r.updates_min:.0f}–{r.updates_max:.0f})"
                    for r in cells.itertuples()],
        "mean wall s": [f"{w:.1f}" for w in cells["wall_seconds_mean"]],
    })
    table = shown.to_markdown(index=False, disable_numparse=True, colalign=("left",) * 3 + ("right",) * 4)
    parts = ["## Per cell, over seeds", "", table, "", CELLS_CAPTION, ""]

    def mark(exceeds: bool, min_seeds: int) -> str:
        if min_seeds < 2:
            return "too few seeds"
        return "**exceeds seed spread**" if exceeds else "within seed spread"

    for dataset, group in comparisons.groupby("dataset", sort=True):
        shown = {"A": group["setting_a"], "B": group["setting_b"]}
        for name, title in (("val_f1", "best val F1"), ("test_f1", "test F1")):
            shown[f"Δ {title} (A − B)"] = [f"{d:+.3f}" if not pd.isna(d) else ""
                                           for d in group[f"{name}_diff"]]
            shown[name.split("_")[0]] = [mark(e, n) for e, n in zip(group[f"{name}_exceeds_seed_spread"],
                                                                    group["min_seeds"])]
        table = pd.DataFrame(shown).to_markdown(index=False, disable_numparse=True,
                                                colalign=("left", "left", "right", "left", "right", "left"))
        parts += [f"## {dataset}: differences between settings", "", table, "", RULE_CAPTION, ""]
    return "\n".join(parts)


def _val_f1(metrics):
    history, metric = metrics["history"], run_metric(metrics)
    return [h.get("update", h["optimizer_step"]) for h in history], [h[metric] for h in history]


def _train_loss(metrics, window: int = 10):
    losses = pd.Series(metrics["train_losses"]).rolling(window, min_periods=1).mean()
    return list(range(1, len(losses) + 1)), list(losses)


def summarize(sweep_dir: Path, out_dir: Path | None = None) -> pd.DataFrame:
    """Write summary.csv, summary.md, val_f1.png and train_loss.png, and with several seeds in some
    cell summary_seeds.csv, summary_seeds_comparisons.csv and summary_seeds.md; return the per-job table."""
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"no finished jobs (*/metrics.json) under {sweep_dir}")
    table = pd.DataFrame([j["row"] for j in jobs], columns=COLUMNS)
    table = table.sort_values(["dataset", "setting", "seed"])
    metric = sweep_metric(jobs)
    named = table.rename(columns={c: c.replace("_f1", f"_{metric}") for c in COLUMNS if c.endswith("_f1")})
    named.to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.md").write_text(named.to_markdown(index=False, floatfmt=".4g") + "\n")
    seed_files = [out_dir / f"summary_seeds{n}" for n in (".csv", "_comparisons.csv", ".md")]
    for stale in seed_files:  # an earlier multi-seed summary in the same folder would contradict this one
        stale.unlink(missing_ok=True)
    cells = seed_cells(table)
    if (cells["n_seeds"] >= 2).any():
        comparisons = seed_comparisons(cells)
        cells.to_csv(seed_files[0], index=False)
        comparisons.to_csv(seed_files[1], index=False)
        seed_files[2].write_text(seeds_markdown(cells, comparisons) + "\n")
    _plot(jobs, out_dir / "val_f1.png", _val_f1, f"validation {'F1' if metric == 'f1' else metric}")
    _plot(jobs, out_dir / "train_loss.png", _train_loss, "train loss (mean of 10 updates)")
    return named
