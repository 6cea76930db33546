#!/usr/bin/env python
"""Benchmarks: this trainer's loop against a hand-written loop and the transformers Trainer, time to F1 end to
end, memory under accumulation, gradient all-reduces per update, and the speed features. Prints tables and
writes them (markdown, JSON, a PNG) to --out.

    python scripts/bench.py                      # CPU: tiny BERT + MiniLM, every section (~25 min on 2 cores,
                                                 #   plus time_to_f1: 2 x --repeats default runs, ~10 min each)
    python scripts/bench.py --quick              # every row in ~2 min, tiny sizes: timings are not meaningful
    python scripts/bench.py --device cuda        # GPU: BERT-base-sized config, bf16, seq 128
    python scripts/bench.py --sections speed --models minilm --repeats 9 --profile cprofile   # the last percent
    python scripts/bench.py --sections precision --repeats 2   # the default job in fp32 vs bf16: does auto pay?
    python scripts/bench.py --sections accumulation_peers      # N=1 vs N=4, same effective batch: this trainer vs
                                                               #   the Trainer on a decoder classifier (~2 min)
    python scripts/bench.py --sections packing,time_to_f1 --repeats 2   # padding-free micro-batches: tokens per
                                                               #   epoch, samples/s packed vs padded, the default
                                                               #   job (packed) vs the Trainer

Each measurement runs in its own process (scripts/bench_worker.py); the variants of a comparison
are interleaved and repeated, and tables quote medians and ratios to the hand-written loop.

speed: every repeat runs (a) this loop, (b) the hand-written loop and (c) the Trainer back to back, each in a
fresh process, in rotating order; the paired table (speed_paired) gives the median over repeats of the
per-repeat ratios a/b and a/c with half their interquartile range (and min-max). The spread of a ratio shrinks
with the repeats: 3 (the default) gives a few percent on a quiet 2-core machine, 9 or more are needed for a
half-IQR under 1 %. --profile runs (a) and (b) once more under cProfile (or torch.profiler) over the timed
updates only and writes the top entries to --out (profile-<model>-<variant>.txt), to attribute the last percent.

time_to_f1: the default job (Rotten Tomatoes, MiniLM, 1 epoch, conf/ defaults, trainer.log_with=none) by
`python scripts/train.py` and by `python scripts/trainer_baseline.py` (transformers' Trainer, the same job),
each a fresh process, interleaved, --repeats times: wall seconds from Popen to the moment the child's final
validation F1 line reaches this process, and that F1 (quick: a tiny model on 64 examples).

Every figure names its machine (dist_gacc.machine: CPU model, torch's CPU capability, threads, measured fp32
ceiling, GPU): results.json and tables.md carry the record, and by default go to
docs/benchmarks/<cpu-model>-<capability>-<threads>t/, so a new machine's run gets its own tables. An --out
folder that already holds another machine's results.json gets a per-machine subfolder instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_data_scale import section_data_scale  # noqa: E402
from bench_packing import section_packing  # noqa: E402
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
    p.add_argument("--sections", default="speed,math,memory,comm,features,levers,data_scale,time_to_f1,"
                   "accumulation_peers")
    p.add_argument("--budgets-gib", default="2,4,8", help="levers: memory budgets for the what-fits table")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the speed and time_to_f1 comparisons "
                   "(9+ for a paired-ratio spread under 1 %%; quick mode: 1)")
    p.add_argument("--profile", choices=["cprofile", "torch"], help="speed: also profile (a) and (b) once per model")
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default="no",
                   help="time_to_f1: trainer.mixed_precision of both sides (equal precision; auto: each side's own)")
    p.add_argument("--accum", type=int, default=4, help="N, micro-batches per update")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every process")
    p.add_argument("--out", help="folder for tables, JSON and plot (default: docs/benchmarks/<machine slug>; a folder "
                   "holding another machine's results.json gets a <machine slug> subfolder)")
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

def worker_env(spec: dict) -> dict:
    """A worker process's environment: the spec's threads, offline, quiet, plus the spec's own variables."""
    return {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            **spec.get("env", {})}


def run_workers(specs: list[dict], processes: int = 1) -> list[dict]:
    """Run the specs in one worker process (quick mode) or one process each; return their results."""
    env = worker_env(specs[0])
    cmd = [sys.executable, str(WORKER)]
    if processes > 1:
        from dist_gacc.launch import Launch, free_port

        launch = Launch(processes, cpu=specs[0]["device"] == "cpu", port=free_port())
        env = launch.env(env)
        cmd = launch.argv(WORKER)
    proc = subprocess.run([*cmd, *(json.dumps(s) for s in specs)], cwd=ROOT, env=env, capture_output=True, text=True)
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or len(results) != len(specs):
        raise SystemExit(f"bench worker failed ({proc.returncode}) on {specs}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return results


def measure(specs: list[dict], quick: bool, processes: int = 1, own_process: bool = False) -> list[dict]:
    """Quick mode runs a section's specs in one process: rows are checked, timings are not meaningful. One-process
    specs go to QUICK_WORKER, shared by the sections, unless they need a process of their own (`own_process`: a
    peak-RSS comparison; or an environment of their own)."""
    if quick:
        if processes == 1 and not own_process and not specs[0].get("env"):
            return QUICK_WORKER.run(specs)
        return run_workers(specs, processes)
    return [run_workers([s], processes)[0] for s in specs]


class QuickWorker:
    """One `bench_worker.py --serve` process for quick mode's one-process sections: its imports (~5 s on 2 cores)
    are paid once instead of once per section. Started on first use, ended by close()."""

    def __init__(self):
        self.proc = self.stderr = None

    def run(self, specs: list[dict]) -> list[dict]:
        if self.proc is None:
            env = worker_env(specs[0])  # (specs with variables of their own do not come here: measure())
            self.stderr = tempfile.TemporaryFile("w+")  # read on failure only; a pipe nobody reads could fill
            self.proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], cwd=ROOT, env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.proc.stdin.write(json.dumps(specs) + "\n")
        self.proc.stdin.flush()
        results, lines = [], []
        for line in self.proc.stdout:
            if line.startswith("BENCH_BATCH_END"):
                return results
            lines.append(line)
            if line.startswith("BENCH_RESULT "):
                results.append(json.loads(line.split(" ", 1)[1]))
        self.stderr.seek(0)
        raise SystemExit(f"bench worker failed ({self.proc.wait()}) on {specs}:\n{''.join(lines)[-2000:]}\n"
                         f"{self.stderr.read()[-5000:]}")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()


QUICK_WORKER = QuickWorker()


def base_spec(args, model: str, inputs: dict, **kw) -> dict:
    micro, updates = MODELS[model][1], MODELS[model][2]
    if args.quick:  # one timed update after the warm-up: quick checks rows and arithmetic, not speed
        micro, updates = min(micro, 8), 1
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
    """(a), (b), (c) on identical work, interleaved, with the matmul ceiling measured in the same run.

    Two tables: `speed` (each variant's median over repeats) and `speed_paired` (the median of the per-repeat
    ratios a/b and a/c: each repeat runs the three back to back, so a ratio compares runs under the same
    machine load)."""
    rows, paired = [], []
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
        for other in ("hand", "hf_trainer"):
            paired.append(paired_row(model, "dist_gacc", other, samples))
        if args.profile:
            profile_loops(args, model, inputs)
    return {"speed": rows, "speed_paired": paired}


def paired_row(model: str, variant: str, other: str, samples: dict) -> dict:
    """Per-repeat speed ratios variant/other (> 1: `variant` faster); median, half the interquartile range."""
    ratios = [a / b for a, b in zip(samples[variant], samples[other])]
    q1, q3 = (statistics.quantiles(ratios, n=4, method="inclusive")[i] for i in (0, 2)) if len(ratios) > 1 \
        else (ratios[0], ratios[0])
    median = statistics.median(ratios)
    return {"model": model, "pair": f"{LABELS[variant][:3]} / {LABELS[other][:3]}", "repeats": len(ratios),
            "median_ratio": median, "half_iqr": (q3 - q1) / 2, "half_iqr_pct": 100 * (q3 - q1) / 2 / median,
            "min_ratio": min(ratios), "max_ratio": max(ratios), "ratios": [round(r, 4) for r in ratios]}


def profile_loops(args, model: str, inputs: dict) -> None:
    """(a) and (b) once each, in their own process, profiled over the timed updates only (bench_worker.Timer):
    the top entries by own time and by cumulative time go to --out/profile-<model>-<variant>.txt."""
    for variant in ("dist_gacc", "hand"):
        path = Path(args.out) / f"profile-{model}-{variant}.txt"
        run_workers([base_spec(args, model, inputs, variant=variant, profile=args.profile, profile_path=str(path))])
        print(f"  profile ({args.profile}) of {LABELS[variant]}, {model}: {path}", flush=True)


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
    results = measure(specs, args.quick, own_process=True)  # quick: one process, so peak RSS is shared (rows only)
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

# Quick mode compiles through the trainer's path (TorchDynamoPlugin, torch.compile in Accelerator.prepare) with
# a backend that captures the graphs (dynamo, AOTAutograd's forward and backward) but generates no code:
# measured (2 cores, 1 thread, a cold inductor cache), the quick features section took 52 s with inductor and
# 20 s with aot_eager (156-258 s with inductor at 2 threads under load); quick timings mean nothing anyway.
QUICK_COMPILE_BACKEND = "aot_eager"


def section_features(args, inputs):
    """Each speed feature of this trainer on and off (dist-gacc loop), interleaved and repeated."""
    model = "tiny" if args.quick else "minilm"
    specs = []
    for rep in range(1 if args.quick else 2):
        for name, off, on, where in FEATURES:
            pair = [("off", off), ("on", on)] if rep % 2 == 0 else [("on", on), ("off", off)]
            specs += [base_spec(args, model, inputs, variant="dist_gacc", feature=name, switch=which, **changes,
                                **({"compile_backend": QUICK_COMPILE_BACKEND} if args.quick and changes.get("compile")
                                   else {}))
                      for which, changes in pair]
    results = measure(specs, args.quick)
    backends = {r["backend"] for s, r in zip(specs, results) if s.get("compile")}
    if backends != {QUICK_COMPILE_BACKEND if args.quick else "inductor"}:  # the row must time a compiled model
        raise SystemExit(f"features: torch.compile rows ran with backends {backends}")
    rows = []
    for name, off, on, where in FEATURES:
        speeds = {which: [r["samples_per_s"] for s, r in zip(specs, results)
                          if s["feature"] == name and s["switch"] == which] for which in ("off", "on")}
        off_s, on_s = statistics.median(speeds["off"]), statistics.median(speeds["on"])
        if name == "torch.compile" and args.quick:
            where = f"{where} (quick: backend {QUICK_COMPILE_BACKEND})"
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


# --- time to F1, end to end ---------------------------------------------------------------------------

TTF1_SIDES = {"dist_gacc": ROOT / "scripts" / "train.py", "hf_trainer": ROOT / "scripts" / "trainer_baseline.py"}
TTF1_LABELS = {"dist_gacc": "scripts/train.py", "hf_trainer": "Trainer (scripts/trainer_baseline.py)"}
TTF1_QUICK = ["model=tiny", "data.max_train_samples=64", "data.max_eval_samples=32", "data.max_length=64"]
# The evaluator's log line (dist_gacc.evaluation.Evaluator.run), on stdout through Hydra's console handler:
#   [2026-11-26 00:42:53,337][dist_gacc.evaluation][INFO] - [RANK 0] update 8: train loss 0.6880 | validation f1 ...
OURS_F1 = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]\[dist_gacc\.evaluation\].* update (\d+): "
                     r"train loss \S+ \| validation f1 (\S+) accuracy")
THEIRS_F1 = re.compile(r"^FINAL_F1 (\S+) (\S+)$")  # scripts/trainer_baseline.py: F1, the child's time.time()


def section_time_to_f1(args, work: Path) -> dict:
    """The default job by scripts/train.py and by the Trainer (scripts/trainer_baseline.py), fresh processes,
    interleaved (the order alternates), --repeats times: wall seconds from Popen to the arrival of the child's
    final validation-F1 line on this side of the pipe (both sides timed the same way), and that F1. Both sides
    at --precision (fp32 by default: the Trainer has no `auto`); ours packs its micro-batches (trainer.packing
    default) and the Trainer pads them."""
    overrides = ["trainer.log_with=none", f"trainer.mixed_precision={args.precision}",
                 *(TTF1_QUICK if args.quick else [])]
    cache_s = warm_tokenize_cache(overrides)  # both sides then load the tokenized splits from the datasets cache
    print(f"  time_to_f1: tokenization cache filled ({cache_s:.1f} s); {' '.join(overrides)}", flush=True)
    repeats = 1 if args.quick else args.repeats
    runs = []
    for rep in range(repeats):
        order = list(TTF1_SIDES) if rep % 2 == 0 else list(reversed(TTF1_SIDES))
        for position, side in enumerate(order):
            run = launch_to_f1(args, side, overrides, work / "time_to_f1" / f"repeat{rep}-{side}")
            runs.append({"repeat": rep, "position": position, **run})
            print(f"  time_to_f1: repeat {rep} {side}: F1 {run['f1']:.4f} after {run['seconds_to_f1']:.1f} s "
                  f"(process {run['process_seconds']:.1f} s)", flush=True)
    table, by = [], {(r["repeat"], r["side"]): r for r in runs}
    for rep in range(repeats):
        ours, theirs = by[(rep, "dist_gacc")], by[(rep, "hf_trainer")]
        table.append({"repeat": rep, "first": "ours" if ours["position"] == 0 else "Trainer",
                      "ours_s": ours["seconds_to_f1"], "trainer_s": theirs["seconds_to_f1"],
                      "ratio_ours_to_trainer": ours["seconds_to_f1"] / theirs["seconds_to_f1"],
                      "ours_f1": ours["f1"], "trainer_f1": theirs["f1"]})
    median = {key: statistics.median(row[key] for row in table) for key in table[0] if key not in ("repeat", "first")}
    table.append({"repeat": "median", "first": "", **median})
    balanced = order_balanced_ratio(table[:-1])
    if balanced is not None:
        table.append({"repeat": "order-balanced", "first": "both", "ratio_ours_to_trainer": balanced})
    return {"time_to_f1": table, "time_to_f1_runs": runs}


def section_precision(args, work: Path) -> dict:
    """Does `auto`'s choice pay end to end? The default job by scripts/train.py in fp32
    (trainer.mixed_precision=no) and in bf16 autocast, fresh processes, interleaved (the order alternates),
    --repeats times: wall seconds from Popen to the final validation-F1 line (as time_to_f1), the F1, and the
    run's training samples/s. `auto` picks bf16 on a CPU only where the probe measures it faster; this is the
    check that the probe's answer holds for the whole job."""
    overrides = ["trainer.log_with=none", *(TTF1_QUICK if args.quick else [])]
    cache_s = warm_tokenize_cache(overrides)
    print(f"  precision: tokenization cache filled ({cache_s:.1f} s); {' '.join(overrides)}", flush=True)
    runs = []
    for rep in range(1 if args.quick else args.repeats):
        order = ["no", "bf16"] if rep % 2 == 0 else ["bf16", "no"]
        for position, precision in enumerate(order):
            run_dir = work / "precision" / f"repeat{rep}-{precision}"
            run = launch_to_f1(args, "dist_gacc", [*overrides, f"trainer.mixed_precision={precision}"], run_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            run.update(precision=precision, repeat=rep, position=position,
                       samples_per_second=metrics["train_samples_per_second"], test_f1=metrics["test"]["f1"])
            runs.append(run)
            print(f"  precision: repeat {rep} {precision}: F1 {run['f1']:.4f} after {run['seconds_to_f1']:.1f} s "
                  f"({run['samples_per_second']:.1f} samples/s)", flush=True)
    by, table = {(r["repeat"], r["precision"]): r for r in runs}, []
    for rep in sorted({r["repeat"] for r in runs}):
        fp32, bf16 = by[(rep, "no")], by[(rep, "bf16")]
        table.append({"repeat": rep, "first": "fp32" if fp32["position"] == 0 else "bf16",
                      "fp32_s": fp32["seconds_to_f1"], "bf16_s": bf16["seconds_to_f1"],
                      "ratio_bf16_to_fp32": bf16["seconds_to_f1"] / fp32["seconds_to_f1"],
                      "fp32_samples_s": fp32["samples_per_second"], "bf16_samples_s": bf16["samples_per_second"],
                      "fp32_f1": fp32["f1"], "bf16_f1": bf16["f1"],
                      "fp32_test_f1": fp32["test_f1"], "bf16_test_f1": bf16["test_f1"]})
    median = {key: statistics.median(row[key] for row in table) for key in table[0] if key not in ("repeat", "first")}
    table.append({"repeat": "median", "first": "", **median})
    balanced = order_balanced_ratio(table[:-1], "ratio_bf16_to_fp32")
    if balanced is not None:
        table.append({"repeat": "order-balanced", "first": "both", "ratio_bf16_to_fp32": balanced})
    return {"precision": table, "precision_runs": runs}


# accumulation_peers: does the logged loss and the first gradient stay put when the same effective batch is split
# into N micro-batches? Each case is a job (Hydra overrides) the three variants train; a row per case and variant.
# A regression case is one more entry, e.g. {"case": "regression", "overrides": [*decoder, "data.problem_type=
# regression"]}: prepare_case saves whatever model and labels the composed job builds.
PEER_CASES = [
    {"case": "single-label (tiny decoder)", "overrides": ["model=tiny_decoder", "model.dropout=0.0"]},
    # Regression (one output, squared error): the Trainer's loss is transformers' MSELoss path (problem_type
    # regression in the saved config), ours objectives.SquaredError.
    {"case": "regression (tiny BERT, word_pleasantness)",
     "overrides": ["model=tiny", "model.dropout=0.0", "data=word_pleasantness", "data.max_train_samples=64"]},
]
PEER_VARIANTS = ["dist_gacc", "hf_trainer_stock", "hf_trainer"]
PEER_LABELS = {"dist_gacc": "dist-gacc", "hf_trainer_stock": "Trainer as shipped",
               "hf_trainer": "Trainer, model_accepts_loss_kwargs=False"}
PEER_NS = (1, 4)


def section_accumulation_peers(args, work: Path) -> dict:
    """Each case's job, N = 1 vs N = 4 at the same effective batch (16; quick: 8) of the same rows, fp32, one
    update: the loss each variant logs for it and the gradient norm before clipping, and their ratio N=4 / N=1
    (exact accumulation: 1 to float rounding; a loop that skips the division by N: N)."""
    effective = 8 if args.quick else 16
    results = []
    for case in PEER_CASES:
        prepared = prepare_case(case, work, MAX_LENGTH)
        specs = [{"kind": "train", "variant": variant, "model_dir": prepared["model_dir"],
                  "data_dir": prepared["data_dir"], "micro": effective // n, "accum": n, "warmup": 1, "updates": 0,
                  "precision": "no", "threads": args.threads, "device": args.device, "fused": True,
                  "log_first": True, "case": case["case"]}
                 for variant in PEER_VARIANTS for n in PEER_NS]
        results += measure(specs, args.quick)
    return {"accumulation_peers": peer_rows(results), "accumulation_peers_runs": results}


def prepare_case(case: dict, work: Path, max_length: int) -> dict:
    """The case's initial model (seeded as a run builds it: the same task, tokenizer, labels and problem_type)
    and its tokenized training rows, saved once for the workers."""
    target = work / "peers" / re.sub(r"[^a-z0-9]+", "-", case["case"].lower()).strip("-")
    if not (target / "done").exists():
        from accelerate.utils import set_seed
        from hydra import compose, initialize_config_dir

        from dist_gacc import data, models
        from dist_gacc.config import load_config
        from dist_gacc.tasks import build_task

        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            rc = load_config(compose("train", overrides=[*case["overrides"], "output_dir=/tmp/unused"]))
        set_seed(rc.seed)
        splits = data.load_splits(rc.data, rc.seed)
        train = splits["train"]
        regression = data.is_regression(train)  # as build.py: the one output is named by the score column
        task = build_task(rc.trainer, [data.score_name(rc.data)] if regression else data.label_names(train),
                          data.is_multi_label(train), train["label"], regression)
        tokenizer = models.build_tokenizer(rc.model, data.train_texts(train), max_length)
        net = models.build_model(rc.model, task.label_names, tokenizer, task.problem_type)
        net.save_pretrained(target / "model")
        tokenizer.save_pretrained(target / "model")
        data.tokenize(splits, tokenizer, max_length)["train"].save_to_disk(str(target / "train"))
        (target / "done").write_text("")
    return {"model_dir": str(target / "model"), "data_dir": str(target / "train")}


def peer_rows(results: list[dict]) -> list[dict]:
    """One row per case and variant from the worker results: the logged first-update loss and the gradient norm
    before clipping at N = 1 and N = 4, and each ratio N=4 / N=1."""
    by = {(r["spec"]["case"], r["spec"]["variant"], r["spec"]["accum"]): r for r in results}
    rows = []
    for case, variant in dict.fromkeys((c, v) for c, v, _ in by):
        one, four = (by[(case, variant, n)] for n in PEER_NS)
        rows.append({"case": case, "variant": PEER_LABELS[variant],
                     "loss_N1": one["logged_loss"], "loss_N4": four["logged_loss"],
                     "loss_ratio": four["logged_loss"] / one["logged_loss"],
                     "grad_norm_N1": one["first_grad_norm"], "grad_norm_N4": four["first_grad_norm"],
                     "grad_norm_ratio": four["first_grad_norm"] / one["first_grad_norm"]})
    return rows


def order_balanced_ratio(rows: list[dict], key: str = "ratio_ours_to_trainer") -> float | None:
    """ours/Trainer with the position in the pair averaged out: the geometric mean, over the two orders, of
    each order's geometric-mean ratio (measured: the first run of a pair was ~5 % slower whichever side it
    was, so with an odd number of repeats the plain median favours the side that went second more often).
    None unless both orders were run."""
    import math

    logs = {}
    for row in rows:
        logs.setdefault(row["first"], []).append(math.log(row[key]))
    if len(logs) < 2:
        return None
    return math.exp(statistics.fmean(statistics.fmean(v) for v in logs.values()))


def warm_tokenize_cache(overrides: list[str]) -> float:
    """Tokenize the job's splits into the datasets cache as a run does (trainer.cache_tokenized), so no repeat
    of either side pays for it and the first one is not special."""
    import datasets
    from hydra import compose, initialize_config_dir

    from dist_gacc import data, models
    from dist_gacc.config import load_config

    started = time.perf_counter()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        rc = load_config(compose("train", overrides=[*overrides, "output_dir=/tmp/unused"]))
    splits = data.load_splits(rc.data, rc.seed)
    tokenizer = models.build_tokenizer(rc.model, data.train_texts(splits["train"]), rc.data.max_length)
    if rc.trainer.cache_tokenized:
        data.tokenize(splits, tokenizer, rc.data.max_length,
                      cache_dir=os.path.join(datasets.config.HF_DATASETS_CACHE, "dist_gacc_tokenized"))
    return time.perf_counter() - started


def launch_to_f1(args, side: str, overrides: list[str], run_dir: Path) -> dict:
    """Start one side, read its stdout line by line, and time the arrival of its (last) validation-F1 line from
    the launch. The process then finishes (ours: model/, test split, metrics.json) before the next one starts."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, str(TTF1_SIDES[side]), *overrides, f"hydra.run.dir={run_dir}"]
    stderr_path = run_dir.parent / f"{run_dir.name}.stderr"
    pattern = OURS_F1 if side == "dist_gacc" else THEIRS_F1
    marks, tail = [], []
    with open(stderr_path, "w") as stderr:
        launched_wall, launched = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        for line in proc.stdout:
            arrived = time.perf_counter() - launched
            match = pattern.search(line.rstrip("\n"))
            if match:
                marks.append((arrived, match.groups()))
            tail = [*tail[-40:], line]
        code = proc.wait()
        process_seconds = time.perf_counter() - launched
    if code != 0 or not marks:
        raise SystemExit(f"time_to_f1: {' '.join(cmd)} exited {code}, {len(marks)} F1 lines:\n{''.join(tail)}\n"
                         f"{stderr_path.read_text()[-4000:]}")
    seconds, groups = marks[-1]
    run = {"side": side, "seconds_to_f1": seconds, "process_seconds": process_seconds, "run_dir": str(run_dir),
           "f1_lines": len(marks)}
    if side == "dist_gacc":
        stamp, millis, update, logged_f1 = groups
        metrics = json.loads((run_dir / "metrics.json").read_text())
        final = metrics["history"][-1]
        if int(update) != final["update"] or abs(float(logged_f1) - final["f1"]) > 5e-5:
            raise SystemExit(f"time_to_f1: the timed line (update {update}, F1 {logged_f1}) is not the final "
                             f"evaluation in {run_dir}/metrics.json ({final})")
        child_time = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
        run.update(f1=final["f1"], logged_f1=float(logged_f1), update=final["update"], eval_f1=metrics["eval"]["f1"])
    else:
        f1, child_time = float(groups[0]), float(groups[1])
        record = json.loads((run_dir / "trainer_baseline.json").read_text())
        run.update(f1=f1, update=record["updates"])
    # The child's own clock at the same moment (log timestamp / time.time()), as a check of the pipe's delay.
    run["child_clock_seconds_to_f1"] = child_time - launched_wall
    return run


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


def machine_record(args) -> dict:
    """dist_gacc.machine.describe() at the benchmark's thread count (the fp32 ceiling is measured with it)."""
    import torch

    from dist_gacc import machine

    torch.set_num_threads(args.threads)
    record = machine.describe()
    record["threads_per_process"] = args.threads
    return record


def machine_slug(info: dict) -> str:
    """docs/benchmarks/<this>: CPU model, torch's CPU capability, threads (and the GPU, if any)."""
    parts = [info["cpu_model"], info["cpu_capability"], f"{info['torch_threads']}t", info.get("gpu") or ""]
    return re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower()).strip("-")


def same_machine(old, info: dict) -> bool:
    """Another run's record (results.json "machine") names this machine: same CPU model, capability, threads and
    GPU, and an fp32 ceiling within 1.5x (two 2-core "AMD EPYC" machines measured 63 and 190 GFLOP/s)."""
    if not isinstance(old, dict):  # results written before the machine record (a one-line string)
        return False
    keys = ("cpu_model", "cpu_capability", "torch_threads", "gpu")
    if any(old.get(k) != info.get(k) for k in keys):
        return False
    a, b = old.get("fp32_gflops"), info.get("fp32_gflops")
    return not (a and b) or max(a, b) / min(a, b) < 1.5


def output_folder(arg: str | None, info: dict) -> Path:
    """--out, or docs/benchmarks/<machine slug>; never over another machine's results (a subfolder instead)."""
    slug = machine_slug(info)
    out = Path(arg) if arg else ROOT / "docs" / "benchmarks" / slug
    previous = out / "results.json"
    if previous.exists() and not same_machine(json.loads(previous.read_text()).get("machine"), info):
        out = out / slug
        previous = out / "results.json"
        if previous.exists() and not same_machine(json.loads(previous.read_text()).get("machine"), info):
            out = out.parent / f"{slug}-fp32-{round(info['fp32_gflops'] or 0)}"
        print(f"{arg or out.parent} holds another machine's results.json: writing to {out}", flush=True)
    return out


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
    if not {"speed", "math", "memory", "comm", "features", "levers"} & set(sections):
        needed = set()  # the other sections build their own jobs (time_to_f1, precision, accumulation_peers, data_scale)
    inputs = {m: prepare(m, work) for m in sorted(needed)}
    from dist_gacc import machine

    record = machine_record(args)  # every figure names its machine
    out = output_folder(args.out, record)
    args.out = str(out)
    results = {"machine": record, "machine_label": machine.label(record), "args": vars(args),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runners = {"speed": lambda: section_speed(args, models, inputs), "math": lambda: section_math(args, inputs, work),
               "memory": lambda: section_memory(args, inputs), "comm": lambda: section_comm(args, inputs),
               "features": lambda: section_features(args, inputs), "levers": lambda: section_levers(args, inputs),
               "data_scale": lambda: section_data_scale([10_000, 100_000, 1_000_000], work, args.quick),
               "time_to_f1": lambda: section_time_to_f1(args, work),
               "precision": lambda: section_precision(args, work),
               "accumulation_peers": lambda: section_accumulation_peers(args, work),
               "packing": lambda: section_packing(args, work)}
    out.mkdir(parents=True, exist_ok=True)
    text = [f"machine: {results['machine_label']}; threads per process: {args.threads}"]
    print(text[0], flush=True)
    for name in sections:
        started = time.perf_counter()
        produced = runners[name]()  # a section's rows, or {table name: rows} (speed: speed, speed_paired)
        tables = produced if isinstance(produced, dict) else {name: produced}
        results.update(tables)
        rows = tables[name]
        for title, table_rows in tables.items():
            if title.endswith("_runs"):  # raw per-run records: results.json only
                continue
            block = f"\n## {title} ({time.perf_counter() - started:.0f} s)\n\n{table(table_rows)}\n"
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
    QUICK_WORKER.close()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "tables.md").write_text("\n".join(text))
    print(f"\nwrote {out}/results.json, tables.md" + (", memory.png" if "memory" in sections else ""))


if __name__ == "__main__":
    main()
