"""bench.py's packing section: what padding-free micro-batches (trainer.packing) save, measured.

- tokens: tokens computed per epoch of every embedded dataset at the default micro-batch (32) in training order,
  padded to each batch's longest row vs packed into rows of trainer.packing_max_tokens (no model run);
- speed: samples/s of the update loop (metrics.json's train_samples_per_second: training time only) of
  `scripts/train.py` with trainer.packing=true vs false, MiniLM and the tiny decoder, fp32 and (where the CPU has
  native bf16, or on CUDA) bf16; fresh processes, interleaved, the order alternating per repeat; the median of
  the per-repeat ratios;
- ceiling: the fraction of the machine's measured fp32 matmul ceiling (dist_gacc.machine) that the packed and
  padded loops reach, counting 6 x non-embedding parameters FLOPs per REAL token (attention not counted).
(time_to_f1, bench.py's own section, runs the default job, which packs by default, against the Trainer.)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["rotten_tomatoes", "debates", "review_pairs", "word_pleasantness", "chinese_reviews"]
SPEED_MODELS = {  # label -> overrides
    "minilm": ["model=minilm"],
    "tiny_decoder": ["model=tiny_decoder"],
}


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    import dist_gacc  # noqa: F401  (resolvers)
    from dist_gacc.config import load_config

    output_dir = os.path.join(tempfile.gettempdir(), "dist-gacc-bench-packing")  # output_dir needs Hydra's run
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return load_config(compose(config_name="train", overrides=[*overrides, f"output_dir={output_dir}"]))


def token_rows(max_tokens: int, micro: int = 32, quick: bool = False) -> list[dict]:
    """Tokens per epoch, padded vs packed, on every embedded dataset (its training split, the run's tokenizer)."""
    from datasets import DatasetDict

    from dist_gacc import data, models, packing

    rows = []
    for name in DATASETS[:1] if quick else DATASETS:
        model = "tiny" if name == "chinese_reviews" else "minilm"  # no pretrained Chinese model installs offline
        rc = _compose(f"data={name}", f"model={model}", *(["data.max_train_samples=256"] if quick else []))
        train = data.load_splits(rc.data, rc.seed)["train"]
        tokenizer = models.build_tokenizer(rc.model, data.train_texts(train), rc.data.max_length)
        encoded = data.tokenize(DatasetDict({"train": train}), tokenizer, rc.data.max_length)["train"]
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = data.epoch_order(encoded, rc.seed, 0, False, micro)
        padded = packed = 0
        for i in range(0, len(order), micro):
            batch = [lengths[j] for j in order[i:i + micro]]
            padded += len(batch) * max(batch)
            packed_rows = packing.pack_rows(batch, max_tokens)
            packed += len(packed_rows) * max(sum(batch[k] for k in row) for row in packed_rows)
        real = sum(lengths)
        rows.append({"dataset": name, "tokenizer": model, "train_rows": len(lengths), "real_tokens": real,
                     "padded_tokens": padded, "packed_tokens": packed, "padding_fraction_padded": 1 - real / padded,
                     "padding_fraction_packed": 1 - real / packed, "tokens_saved": 1 - packed / padded})
    return rows


def _run(overrides: list[str], run_dir: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"packing: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def precisions(device: str) -> list[str]:
    """fp32, and bf16 where it is native: CUDA, or a CPU with avx512_bf16 / AMX (emulated bf16 is ~50x slower)."""
    if device == "cuda":
        return ["no", "bf16"]
    from dist_gacc import machine

    return ["no", "bf16"] if machine.native_bf16() else ["no"]


def speed_rows(work: Path, threads: int, repeats: int, quick: bool, device: str = "cpu") -> tuple[list, list]:
    """samples/s, packed vs padded, interleaved; and the matmul-ceiling fraction of each."""
    from dist_gacc import machine

    ceiling = machine.describe(measure=True).get("fp32_gflops")
    steps = 4 if quick else 40
    common = ["trainer.log_with=none", "trainer.baseline=false", f"trainer.max_steps={steps}",
              "data.max_eval_samples=64", "trainer.micro_batch_size=32"]
    if quick:
        common += ["data.max_train_samples=256"]
    rows, runs = [], []
    for model, model_overrides in SPEED_MODELS.items():
        if quick and model == "minilm":
            model, model_overrides = "tiny", ["model=tiny"]
        for mp in precisions(device):
            ratios, seen = [], {"true": [], "false": []}
            for rep in range(repeats):
                for mode in (("true", "false") if rep % 2 == 0 else ("false", "true")):
                    run_dir = work / "packing" / f"{model}-{mp}-{rep}-{mode}"
                    metrics = _run([*common, *model_overrides, f"trainer.mixed_precision={mp}",
                                    f"trainer.packing={mode}"], run_dir, threads)
                    seen[mode].append(metrics["train_samples_per_second"])
                    runs.append({"model": model, "precision": mp, "repeat": rep, "packing": mode,
                                 "samples_per_s": metrics["train_samples_per_second"],
                                 "packing_on": metrics["packing"]["on"]})
                ratios.append(seen["true"][-1] / seen["false"][-1])
            packed, padded = statistics.median(seen["true"]), statistics.median(seen["false"])
            row = {"model": model, "precision": "fp32" if mp == "no" else mp, "padded_samples_per_s": padded,
                   "packed_samples_per_s": packed, "speedup_median_of_ratios": statistics.median(ratios),
                   "ratios": ", ".join(f"{r:.2f}" for r in ratios)}
            if ceiling:
                row.update(_ceiling_fraction(model_overrides, padded, packed, ceiling))
            rows.append(row)
    return rows, runs


def _ceiling_fraction(model_overrides: list[str], padded: float, packed: float, ceiling: float) -> dict:
    """FLOPs on real tokens only: 6 x non-embedding parameters per token (forward + backward), the mean real
    tokens per training row of the default data, over the fp32 matmul ceiling."""
    from datasets import DatasetDict

    from dist_gacc import data, models

    rc = _compose(*model_overrides)
    train = data.load_splits(rc.data, rc.seed)["train"]
    tokenizer = models.build_tokenizer(rc.model, data.train_texts(train), rc.data.max_length)
    model = models.build_model(rc.model, ["a", "b"], tokenizer)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    body = sum(p.numel() for p in model.parameters()) - embedding
    sample = train.select(range(min(2000, len(train))))
    encoded = data.tokenize(DatasetDict({"train": sample}), tokenizer, rc.data.max_length)["train"]
    mean_tokens = statistics.mean(len(ids) for ids in encoded["input_ids"])
    gflop_per_sample = 6 * body * mean_tokens / 1e9
    return {"real_tokens_per_row": mean_tokens, "padded_ceiling_fraction": padded * gflop_per_sample / ceiling,
            "packed_ceiling_fraction": packed * gflop_per_sample / ceiling}


def section_packing(args, work: Path) -> dict:
    started = time.perf_counter()
    max_tokens = _compose().trainer.packing_max_tokens
    tokens = token_rows(max_tokens, quick=args.quick)
    print(f"  packing: tokens per epoch on {len(tokens)} datasets ({time.perf_counter() - started:.0f} s)", flush=True)
    speed, runs = speed_rows(work, args.threads, 1 if args.quick else args.repeats, args.quick, args.device)
    return {"packing": speed, "packing_tokens": tokens, "packing_runs": runs}
