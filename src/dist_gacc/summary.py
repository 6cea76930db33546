"""Summarise a sweep: one row per job (dataset x setting) and plots of F1 and loss against updates."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

COLUMNS = ["dataset", "setting", "micro_batch_size", "grad_accum_steps", "world_size", "effective_batch_size",
           "lr", "updates", "best_update", "best_val_f1", "final_val_f1", "test_f1", "stopped_early",
           "wall_seconds"]


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(item.lstrip("+~").split("=", 1) for item in items or [] if "=" in item)


def _labels(job_dirs: list[Path]) -> list[str]:
    """A job's `setting=` choice if it has one, else the overrides that vary across the sweep."""
    overrides = [_overrides(d) for d in job_dirs]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1 and k not in ("task", "data", "model")]
    labels = []
    for o in overrides:
        if "setting" in o:
            labels.append(o["setting"])
        else:
            labels.append(" ".join(f"{k}={o.get(k)}" for k in varying) or "default")
    return labels


def load_jobs(sweep_dir: Path) -> list[dict]:
    """Every finished job under the sweep directory (a folder with metrics.json and config.yaml)."""
    jobs = []
    job_dirs = [f.parent for f in sorted(sweep_dir.glob("*/metrics.json"))]
    for job_dir, label in zip(job_dirs, _labels(job_dirs)):
        metrics = json.loads((job_dir / "metrics.json").read_text())
        config = yaml.safe_load((job_dir / "config.yaml").read_text())
        best = metrics.get("best") or {}
        jobs.append({
            "dir": job_dir, "metrics": metrics,
            "row": {
                "dataset": config["data"]["name"], "setting": label,
                "micro_batch_size": metrics["micro_batch_size"], "grad_accum_steps": metrics["grad_accum_steps"],
                "world_size": metrics["world_size"], "effective_batch_size": metrics["effective_batch_size"],
                "lr": metrics["lr"], "updates": metrics.get("updates", metrics["optimizer_steps"]),
                "best_update": best.get("update"), "best_val_f1": best.get("f1", metrics["eval"]["f1"]),
                "final_val_f1": metrics["eval"]["f1"],
                # The F1 average in effect (binary / macro / micro...) and macro F1 next to it (absent in
                # runs older than the per-label report).
                "f1_average": metrics["eval"].get("average"), "val_f1_macro": metrics["eval"].get("f1_macro"),
                "class_weights": metrics.get("class_weights_setting", "none"),
                "test_f1": (metrics.get("test") or {}).get("f1"),
                "stopped_early": metrics.get("stopped_early", False),
                "wall_seconds": round(metrics["wall_seconds"], 1),
            },
        })
    return jobs


def _plot(jobs: list[dict], path: Path, series, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({j["row"]["dataset"] for j in jobs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for job in sorted((j for j in jobs if j["row"]["dataset"] == dataset), key=lambda j: j["row"]["setting"]):
            x, y = series(job["metrics"])
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=job["row"]["setting"])
        ax.set_title(dataset)
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _val_f1(metrics):
    history = metrics["history"]
    return [h.get("update", h["optimizer_step"]) for h in history], [h["f1"] for h in history]


def _train_loss(metrics, window: int = 10):
    losses = pd.Series(metrics["train_losses"]).rolling(window, min_periods=1).mean()
    return list(range(1, len(losses) + 1)), list(losses)


def summarize(sweep_dir: Path, out_dir: Path | None = None) -> pd.DataFrame:
    """Write summary.csv, summary.md, val_f1.png and train_loss.png; return the table."""
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"no finished jobs (*/metrics.json) under {sweep_dir}")
    table = pd.DataFrame([j["row"] for j in jobs], columns=COLUMNS).sort_values(["dataset", "setting"])
    table.to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    _plot(jobs, out_dir / "val_f1.png", _val_f1, "validation F1")
    _plot(jobs, out_dir / "train_loss.png", _train_loss, "train loss (mean of 10 updates)")
    return table
