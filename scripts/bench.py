#!/usr/bin/env python
"""Benchmarks: this trainer's loop against a hand-written loop and the transformers Trainer, memory
under accumulation, gradient all-reduces per update, and the speed features. Prints tables and
writes them (markdown, JSON, a PNG) to --out.

    python scripts/bench.py                      # CPU: tiny BERT + MiniLM, every section (~25 min on 2 cores)
    python scripts/bench.py --quick              # every row in ~1 min, tiny sizes: timings are not meaningful
    python scripts/bench.py --device cuda        # GPU: BERT-base-sized config, bf16, seq 128

Each measurement runs in its own process (scripts/bench_worker.py); the variants of a comparison
are interleaved and repeated, and tables quote medians and ratios to the hand-written loop.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_data_scale import section_data_scale  # noqa: E402
WORKER = ROOT / "scripts" / "bench_worker.py"
VARIANTS = ["dist_gacc", "hand", "hf_trainer"]
LABELS = {"dist_gacc": "(a) dist-gacc loop", "hand": "(b) hand-written loop", "hf_trainer": "(c) transformers Trainer",
          "hf_trainer_stock": "(c0) Trainer as shipped"}
MODELS = {  # Hydra model config, overrides, micro-batch, updates timed
    "tiny": (["model=tiny"], 32, 8),
    "minilm": (["model=minilm"], 16, 4),
    "bert-base": (["model=tiny", "model.from_scratch.vocab_size=30522", "model.from_scratch.hidden_size=768",
                   "model.from_scratch.num_hidden_layers=12", "model.from_scratch.num_attention_heads=12",
                   "model.from_scratch.intermediate_size=3072"], 32, 20),
}
MAX_LENGTH = 128


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks every row, not speed")
    p.add_argument("--models", help="comma list of tiny,minilm,bert-base (default: cpu tiny,minilm; cuda bert-base)")
    p.add_argument("--sections", default="speed,math,memory,comm,features,levers,data_scale")
    p.add_argument("--budgets-gib", default="2,4,8", help="levers: memory budgets for the what-fits table")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each speed comparison")
    p.add_argument("--accum", type=int, default=4, help="N, micro-batches per update")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every process")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="folder for tables, JSON and plot")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "dist-gacc-bench"))
    return p.parse_args()


# --- inputs: one saved model and one tokenized, ordered dataset per model ---------------------------------

def splits_and_tokenizer(model: str):
    """The trainer's own config, data splits and tokenizer for one of MODELS."""
    from hydra import compose, initialize_config_dir

    import dist_gacc  # noqa: F401  (resolvers)
    from dist_gacc import data, models
    from dist_gacc.config import load_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        rc = load_config(compose("train", overrides=[*MODELS[model][0], "output_dir=/tmp/unused"]))
    splits = data.load_splits(rc.data, rc.seed)
    return rc, splits, models.build_tokenizer(rc.model, splits["train"]["text"], MAX_LENGTH)


def prepare(model: str, work: Path) -> dict:
    """Save the initial model and tokenized training rows once; every worker loads these files."""
    target = work / model
    if (target / "done").exists():
        return json.loads((target / "done").read_text())
    from dist_gacc import data, models

    rc, splits, tokenizer = splits_and_tokenizer(model)
    net = models.build_model(rc.model, data.label_names(splits["train"]), tokenizer)
    net.save_pretrained(target / "model")
    tokenizer.save_pretrained(target / "model")
    started = time.perf_counter()
    encoded = data.tokenize(splits, tokenizer, MAX_LENGTH)  # what a run does, uncached
    tokenize_s = time.perf_counter() - started
    encoded["train"].save_to_disk(str(target / "dynamic"))  # padded per batch by the collator
    padded = splits["train"].map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH,
                                                     padding="max_length"), batched=True, remove_columns=["text"])
    padded.rename_column("label", "labels").save_to_disk(str(target / "max"))  # every row MAX_LENGTH tokens
    info = {"rows": len(encoded["train"]), "tokenize_s": tokenize_s, "model_dir": str(target / "model"),
            "params": sum(p.numel() for p in net.parameters())}
    (target / "done").write_text(json.dumps(info))
    return info


# --- running workers ---------------------------------------------------------------------------------

def run_workers(specs: list[dict], processes: int = 1) -> list[dict]:
    """Run the specs in one worker process (quick mode) or one process each; return their results."""
    env = {**os.environ, "OMP_NUM_THREADS": str(specs[0]["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           **specs[0].get("env", {})}
    cmd = [sys.executable, str(WORKER)]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1" if specs[0]["device"] == "cpu" else env.get("ACCELERATE_USE_CPU", "")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(WORKER)]
    proc = subprocess.run([*cmd, *(json.dumps(s) for s in specs)], cwd=ROOT, env=env, capture_output=True, text=True)
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or len(results) != len(specs):
        raise SystemExit(f"bench worker failed ({proc.returncode}) on {specs}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return results


def measure(specs: list[dict], quick: bool, processes: int = 1) -> list[dict]:
    """Quick mode runs a section's specs in one process: rows are checked, timings are not meaningful."""
    if quick:
        return run_workers(specs, processes)
    return [run_workers([s], processes)[0] for s in specs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_spec(args, model: str, inputs: dict, **kw) -> dict:
    micro, updates = MODELS[model][1], MODELS[model][2]
    if args.quick:
        micro, updates = min(micro, 8), 2
    spec = {"kind": "train", "model": model, "model_dir": inputs[model]["model_dir"],
            "data_dir": str(Path(args.work_dir) / model / "max"), "micro": micro, "accum": args.accum,
            "updates": updates, "warmup": 1, "precision": "bf16" if args.device == "cuda" else "no",
            "threads": args.threads, "device": args.device, "fused": True}  # as the trainer and Trainer default
    spec.update(kw)
    if "pad" in kw:
        spec["data_dir"] = str(Path(args.work_dir) / model / kw["pad"])
    return spec


# --- sections ------------------------------------------------------------------------------------------

def section_speed(args, models, inputs):
    """(a), (b), (c) on identical work, interleaved, with the matmul ceiling measured in the same run."""
    rows = []
    for model in models:
        samples = {v: [] for v in VARIANTS}
        ceilings, last = [], {}
        for rep in range(1 if args.quick else args.repeats):
            order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]  # rotate, so no variant always runs first
            specs = [base_spec(args, model, inputs, variant=v) for v in order]
            specs.append({"kind": "ceiling", "device": args.device, "threads": args.threads,
                          "precision": specs[0]["precision"], "repeats": 3 if args.quick else 5,
                          "sizes": [256, 512] if args.quick else ([4096, 8192] if args.device == "cuda" else [1024, 2048])})
            for spec, result in zip(specs, measure(specs, args.quick)):
                if spec["kind"] == "ceiling":
                    ceilings.append(result["tflops_per_s"])
                else:
                    samples[spec["variant"]].append(result["samples_per_s"])
                    last[spec["variant"]] = result
        ceiling = statistics.median(ceilings)
        hand = statistics.median(samples["hand"])
        for v in VARIANTS:
            sps = statistics.median(samples[v])
            tflops = last[v]["model_tflops_per_s"] * sps / last[v]["samples_per_s"]  # at the median speed
            rows.append({"model": model, "variant": LABELS[v], "samples_per_s": sps, "ratio_to_hand": sps / hand,
                         "runs": len(samples[v]), "spread": f"{min(samples[v]):.1f}-{max(samples[v]):.1f}",
                         "model_tflops_per_s": tflops, "fraction_of_matmul_ceiling": tflops / ceiling,
                         "matmul_ceiling_tflops": ceiling, "peak_mb": last[v]["peak_mb"],
                         "micro x N": f"{last[v]['spec']['micro']} x {args.accum}",
                         "tokens_per_sample": last[v]["tokens_per_sample"]})
    return rows


def section_math(args, inputs, work: Path):
    """Same math? Tiny BERT, dropout 0, fp32: first-update gradient norm and parameters after 3 updates."""
    specs = [base_spec(args, "tiny", inputs, variant=v, dropout=0.0, micro=8, updates=2, precision="no",
                       save_params=str(work / f"params-{v}.pt"))
             for v in ["hand", "dist_gacc", "hf_trainer", "hf_trainer_stock"]]
    results = measure(specs, args.quick)
    import torch

    params = {s["variant"]: torch.load(s["save_params"]) for s in specs}
    ref = results[0]
    rows = []
    for spec, r in zip(specs, results):
        diff = max((params[spec["variant"]][k] - t).abs().max().item() for k, t in params["hand"].items())
        rows.append({"variant": LABELS[spec["variant"]], "first_loss": r["first_loss"],
                     "first_grad_norm": r["first_grad_norm"], "grad_norm_ratio_to_hand": r["first_grad_norm"] / ref["first_grad_norm"],
                     "max_abs_param_diff_vs_hand": diff})
    return rows


def section_memory(args, inputs):
    """Peak memory of this trainer at micro-batch b with N = 1, 2, 4, 8, against one batch of N x b.

    Every accumulated row trains the same 16 micro-batches (N = 1: 16 updates, N = 8: 2), so the rows
    differ only in N; b is the speed table's micro-batch.
    """
    model = "tiny" if args.quick else "minilm"
    micro = 4 if args.quick else MODELS[model][1]
    ns, micro_batches = [1, 2, 4, 8], 8 if args.quick else 16
    specs = [base_spec(args, model, inputs, variant="dist_gacc", micro=micro, accum=n, warmup=1,
                       updates=micro_batches // n - 1) for n in ns]
    specs += [base_spec(args, model, inputs, variant="dist_gacc", micro=micro * n, accum=1, updates=1) for n in ns[1:]]
    results = measure(specs, args.quick)  # quick: one process, so peak RSS is shared (rows only)
    # glibc keeps freed blocks in its heap, so peak RSS also counts allocator retention. With a fixed
    # mmap threshold every large tensor is returned to the OS when freed: RSS then follows live memory
    # (slower, so only for this column).
    live = measure([{**spec, "env": {"MALLOC_MMAP_THRESHOLD_": "1048576"}} for spec in specs[:4]], args.quick)
    acc = {s["accum"]: r["peak_mb"] for s, r in zip(specs[:4], results[:4])}
    acc_live = {s["accum"]: r["peak_mb"] for s, r in zip(specs[:4], live)}
    single = {s["micro"] // micro: r["peak_mb"] for s, r in zip(specs[4:], results[4:])}
    single[1] = acc[1]
    return [{"model": model, "N": n, "micro": micro, "micro_batches": micro_batches, "accumulated_peak_mb": acc[n],
             "ratio_to_N1": acc[n] / acc[1], "live_peak_mb": acc_live[n], "live_ratio_to_N1": acc_live[n] / acc_live[1],
             "single_batch": micro * n, "single_batch_peak_mb": single[n], "single_ratio_to_N1": single[n] / acc[1]}
            for n in ns]


LEVERS = ["plain", "checkpointing", "lora", "lora+checkpointing"]


def section_levers(args, inputs):
    """Memory levers on a BERT-base-sized model (random init, sequence 128, every row padded to 128):
    {plain, gradient checkpointing, LoRA (r 8, query/value, head trainable), both} x micro-batch. Peak memory
    per process: live (fixed mmap threshold, so freed tensors leave RSS) and peak RSS (with glibc's
    retention), or max_memory_allocated on CUDA; samples/s of one timed update (N = 1) after one warm-up.
    Quick mode runs every row in one process (rows checked; memory and speed not meaningful)."""
    model = "tiny" if args.quick else "bert-base"
    micros = [2, 4] if args.quick else [2, 4, 8, 16]
    specs = [base_spec(args, model, inputs, variant="dist_gacc", micro=micro, accum=1, warmup=1, updates=1,
                       lever=lever) for micro in micros for lever in LEVERS]
    rows = []
    for spec, rss in zip(specs, measure(specs, args.quick)):
        live = rss if args.quick or args.device == "cuda" else \
            run_workers([{**spec, "env": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}])[0]
        rows.append({"model": model, "lever": spec["lever"], "micro": spec["micro"], "live_peak_mb": live["peak_mb"],
                     "rss_peak_mb": rss["peak_mb"], "samples_per_s": rss["samples_per_s"],
                     "trainable_params": rss["trainable_params"]})
        print(f"  levers: {spec['lever']} micro {spec['micro']}: live {live['peak_mb']:.0f} MB, "
              f"RSS {rss['peak_mb']:.0f} MB, {rss['samples_per_s']:.2f} samples/s", flush=True)
    return rows


def fits(rows: list[dict], budgets_gib: list[float], effective: int = 256) -> list[dict]:
    """Under each budget, the largest power-of-two micro-batch of each lever whose live peak fits (a straight
    line through the measured peaks: memory = fixed + per-example x micro), and `effective` as micro x N."""
    out = []
    for lever in sorted({r["lever"] for r in rows}, key=LEVERS.index):
        points = [(r["micro"], r["live_peak_mb"]) for r in rows if r["lever"] == lever]
        mean_x, mean_y = statistics.mean(x for x, _ in points), statistics.mean(y for _, y in points)
        slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
                 / max(sum((x - mean_x) ** 2 for x, _ in points), 1e-9))
        fixed = mean_y - slope * mean_x
        row = {"lever": lever, "fixed_mb": fixed, "mb_per_example": slope}
        for budget in budgets_gib:
            fitting = [2 ** k for k in range(effective.bit_length()) if fixed + slope * 2 ** k <= budget * 1024]
            micro = max(fitting) if fitting else 0
            extrapolated = " (extrapolated)" if micro > max(x for x, _ in points) else ""
            row[f"{budget:g} GiB"] = f"{micro} x N {effective // micro}{extrapolated}" if micro else "does not fit"
        out.append(row)
    return out


def section_comm(args, inputs):
    """Gradient all-reduces per update with 2 processes (gloo on CPU): accumulate() vs syncing every micro-batch."""
    model = "tiny" if args.quick else "minilm"
    modes = [("accumulate()", 1, False), ("accumulate()", 4, False), ("sync every micro-batch", 4, True)]
    specs = [base_spec(args, model, inputs, variant="dist_gacc", kind="comm", accum=n, micro=4 if args.quick else 8,
                       updates=2 if args.quick else 4, threads=max(1, args.threads // 2), device="cpu",
                       precision="no", sync_each_batch=each) for _, n, each in modes]
    results = measure(specs, args.quick, processes=2)
    rows = []
    for (label, n, _), r in zip(modes, results):
        passes = [u["grad_passes"] for u in r["per_update"]]
        rows.append({"model": model, "mode": label, "N": n, "grad_allreduces_per_update": passes,
                     "buckets_per_update": r["per_update"][-1]["grad_buckets"],
                     "grad_mb_per_update": r["per_update"][-1]["grad_bytes"] / 2**20,
                     "scalar_allreduces_per_update": r["per_update"][-1]["scalar_allreduces"],
                     "seconds_per_update": r["seconds_per_update"]})
    sync_each = rows[-1]["seconds_per_update"]
    for row in rows[1:]:
        row["time_saved_vs_sync_each"] = 1 - row["seconds_per_update"] / sync_each
    return rows


FEATURES = [  # name, spec changes (off), spec changes (on), in the trainer as
    ("per-batch dynamic padding", {"pad": "max", "shuffle": True}, {"pad": "dynamic", "shuffle": True}, "always"),
    ("length-grouped batches", {"pad": "dynamic", "shuffle": True}, {"pad": "dynamic", "group_by_length": True},
     "trainer.group_by_length=true"),
    ("DataLoader workers (2)", {"pad": "dynamic", "shuffle": True}, {"pad": "dynamic", "shuffle": True, "num_workers": 2},
     "trainer.num_workers"),
    ("fused AdamW", {"pad": "dynamic", "shuffle": True, "fused": False}, {"pad": "dynamic", "shuffle": True, "fused": True},
     "trainer.fused_adamw=auto"),
    ("torch.compile", {"pad": "max", "shuffle": True}, {"pad": "max", "shuffle": True, "compile": True, "warmup": 2},
     "trainer.compile=true"),
]


def section_features(args, inputs):
    """Each speed feature of this trainer on and off (dist-gacc loop), interleaved and repeated."""
    model = "tiny" if args.quick else "minilm"
    specs = []
    for rep in range(1 if args.quick else 2):
        for name, off, on, where in FEATURES:
            pair = [("off", off), ("on", on)] if rep % 2 == 0 else [("on", on), ("off", off)]
            specs += [base_spec(args, model, inputs, variant="dist_gacc", feature=name, switch=which, **changes)
                      for which, changes in pair]
    results = measure(specs, args.quick)
    rows = []
    for name, off, on, where in FEATURES:
        speeds = {which: [r["samples_per_s"] for s, r in zip(specs, results)
                          if s["feature"] == name and s["switch"] == which] for which in ("off", "on")}
        off_s, on_s = statistics.median(speeds["off"]), statistics.median(speeds["on"])
        rows.append({"model": model, "feature": name, "off": off_s, "on": on_s, "speedup": on_s / off_s,
                     "unit": "samples/s", "setting": where})
    step = measure([base_spec(args, model, inputs, kind="optimizer_step")], args.quick)[0]
    rows.append({"model": model, "feature": "fused AdamW (optimizer step alone)", "off": step["foreach"],
                 "on": step["fused"], "speedup": step["foreach"] / step["fused"], "unit": "ms per step",
                 "setting": "trainer.fused_adamw=auto"})
    info = inputs[model]
    from dist_gacc import data

    _, splits, tokenizer = splits_and_tokenizer(model)
    cache = Path(args.work_dir) / "tokenize-cache"
    data.tokenize(splits, tokenizer, MAX_LENGTH, cache_dir=str(cache))  # fill the cache
    started = time.perf_counter()
    data.tokenize(splits, tokenizer, MAX_LENGTH, cache_dir=str(cache))
    cached_s = time.perf_counter() - started
    rows.append({"model": model, "feature": "tokenization cached", "off": info["tokenize_s"], "on": cached_s,
                 "speedup": info["tokenize_s"] / cached_s, "unit": "seconds per run", "setting": "trainer.cache_tokenized"})
    return rows


# --- output --------------------------------------------------------------------------------------------

def table(rows: list[dict], floatfmt=".3g") -> str:
    from tabulate import tabulate

    return tabulate(rows, headers="keys", tablefmt="github", floatfmt=floatfmt)


def plot_memory(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["accumulated_peak_mb"] for r in rows], "o-", label=f"micro-batch {rows[0]['micro']} x N (accumulated)")
    ax.plot(ns, [r["live_peak_mb"] for r in rows], "^-", label="same, fixed mmap threshold (live memory)")
    ax.plot(ns, [r["single_batch_peak_mb"] for r in rows], "s--", label="one batch of N x micro")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (micro-batches per update)")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(f"Peak memory, {rows[0]['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main():
    args = parse_args()
    import datasets

    datasets.disable_progress_bars()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
    models = (args.models or ("bert-base" if args.device == "cuda" else "tiny,minilm")).split(",")
    if args.quick:
        models = ["tiny"]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    needed = set(models) | {"tiny"} | ({"tiny" if args.quick else "minilm"} if {"memory", "comm", "features"} & set(sections) else set())
    needed |= {"tiny" if args.quick else "bert-base"} if "levers" in sections else set()
    inputs = {m: prepare(m, work) for m in sorted(needed)}
    results = {"machine": machine(), "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runners = {"speed": lambda: section_speed(args, models, inputs), "math": lambda: section_math(args, inputs, work),
               "memory": lambda: section_memory(args, inputs), "comm": lambda: section_comm(args, inputs),
               "features": lambda: section_features(args, inputs), "levers": lambda: section_levers(args, inputs),
               "data_scale": lambda: section_data_scale([10_000, 100_000, 1_000_000], work, args.quick)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = [f"machine: {results['machine']}; threads per process: {args.threads}"]
    for name in sections:
        started = time.perf_counter()
        rows = runners[name]()
        results[name] = rows
        block = f"\n## {name} ({time.perf_counter() - started:.0f} s)\n\n{table(rows)}\n"
        print(block, flush=True)
        text.append(block)
        if name == "memory":
            plot_memory(rows, out / "memory.png")
        if name == "levers":
            budgets = [float(b) for b in args.budgets_gib.split(",")]
            results["levers_fit"] = fits(rows, budgets)
            block = ("\nWhat fits (largest power-of-two micro-batch under the budget, live memory; effective batch "
                     f"256 as micro x N):\n\n{table(results['levers_fit'], floatfmt='.4g')}\n")
            print(block, flush=True)
            text.append(block)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "tables.md").write_text("\n".join(text))
    print(f"\nwrote {out}/results.json, tables.md" + (", memory.png" if "memory" in sections else ""))


if __name__ == "__main__":
    main()
