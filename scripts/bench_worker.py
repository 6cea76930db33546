"""One benchmark measurement per process; scripts/bench.py starts these (not meant for direct use).

    python scripts/bench_worker.py SPEC_JSON [SPEC_JSON ...]   # prints one BENCH_RESULT line per spec
    python scripts/bench_worker.py --serve                     # quick mode: spec lists on stdin (bench.QuickWorker)

A spec names a `kind` (train | ceiling | comm) and, for train, a `variant`:
  dist_gacc         this trainer's loop (dist_gacc.loop.fit over loop.standalone, Accelerate, exact normalisation)
  hand              a minimal hand-written PyTorch loop: loss/N, step every N
  hf_trainer        transformers' Trainer, made to divide the loss by N (see `run_hf_trainer`)
  hf_trainer_stock  transformers' Trainer as it ships (for the math check only)
Every variant trains the same saved model on the same saved, tokenized data, in the same order,
with AdamW (decay on >=2-D weights), a linear schedule with warm-up, clipping at 1.0.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

import torch

LR, WEIGHT_DECAY, WARMUP_RATIO, MAX_GRAD_NORM, SEED = 5e-5, 0.01, 0.1, 1.0, 0


# --- shared set-up ---------------------------------------------------------------------------------

def load_model(spec):
    from transformers import AutoModelForSequenceClassification

    overrides = {}
    if spec.get("dropout") is not None:
        overrides = {"hidden_dropout_prob": spec["dropout"], "attention_probs_dropout_prob": spec["dropout"]}
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], **overrides)
    if spec.get("lever"):  # the memory levers through the trainer's own code path (models.apply_memory_levers)
        from dist_gacc.config import ModelConfig, PeftConfig
        from dist_gacc.models import apply_memory_levers

        lever = spec["lever"]
        model = apply_memory_levers(
            model, ModelConfig(name_or_path=spec["model_dir"], gradient_checkpointing="checkpointing" in lever),
            PeftConfig(name="lora" if "lora" in lever else "none", dropout=0.0))
    return model


def load_data(spec, world_size: int = 1):
    """The first micro x N x world x updates rows of the saved (already ordered) tokenized data."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    ds = datasets.load_from_disk(spec["data_dir"])
    needed = spec["micro"] * spec["accum"] * world_size * total_updates(spec)
    if needed > len(ds):
        raise SystemExit(f"bench: {spec['data_dir']} has {len(ds)} rows, {needed} needed")
    return ds.select(range(needed)), tokenizer


def total_updates(spec) -> int:
    return spec["warmup"] + spec["updates"]


def collator(tokenizer, device: str):
    from dist_gacc import data

    return data.collator(tokenizer, pin_memory=device == "cuda")  # the trainer's own: pad each batch to its longest row


def model_flops(model, batch_shapes) -> float:
    """Training FLOPs (forward + backward = 3x forward) of the matmuls, for the given (B, T) batches.

    6 x (encoder Linear weights) per token, plus attention scores and mixing (12 x L x T^2 x H per
    sequence), plus the pooler/classifier once per sequence. Embedding lookups, norms and
    activations are not counted: this is the work a matmul ceiling can be compared with.
    """
    enc = head = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if ".encoder." in f".{name}.":
                enc += module.weight.numel()
            else:
                head += module.weight.numel()
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    return float(sum(6 * b * t * enc + 12 * layers * b * t * t * hidden + 6 * b * head for b, t in batch_shapes))


class Timer:
    """Wall time from the end of update `warmup` to the end of the last update (device synchronised
    only at those two points, so the measured loop keeps its own host syncs and no more)."""

    def __init__(self, spec):
        self.warmup, self.last, self.cuda = spec["warmup"], total_updates(spec), spec["device"] == "cuda"
        self.t0 = self.t1 = None
        self.profiler = Profiler(spec) if spec.get("profile") else None

    def on_update(self, update: int) -> None:
        if update in (self.warmup, self.last):
            if self.cuda:
                torch.cuda.synchronize()
            if update == self.last and self.profiler:
                self.profiler.stop()
            if update == self.warmup:
                self.t0 = time.perf_counter()
            if update == self.last:
                self.t1 = time.perf_counter()
            if update == self.warmup and self.profiler:
                self.profiler.start()

    def seconds(self) -> float:
        return max(self.t1 - self.t0, 1e-9)  # 0 timed updates (memory rows): no speed


class Profiler:
    """cProfile or torch.profiler over the timed updates only (bench.py --profile): the top entries by own
    time and by cumulative time, written to spec["profile_path"]."""

    TOP = 40

    def __init__(self, spec):
        self.kind, self.path, self.spec = spec["profile"], spec["profile_path"], spec

    def start(self) -> None:
        self.started = time.perf_counter()
        if self.kind == "cprofile":
            import cProfile

            self.prof = cProfile.Profile()
            self.prof.enable()
        else:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()

    def stop(self) -> None:
        import io

        seconds = time.perf_counter() - self.started
        head = (f"{self.spec['variant']}, {self.spec['model']}: micro {self.spec['micro']} x N {self.spec['accum']}, "
                f"{self.spec['updates']} updates profiled ({seconds:.3f} s with the profiler on)\n\n")
        if self.kind == "cprofile":
            import pstats

            self.prof.disable()
            text = io.StringIO()
            for order in ("tottime", "cumulative"):
                text.write(f"--- top {self.TOP} by {order} ---\n")
                pstats.Stats(self.prof, stream=text).sort_stats(order).print_stats(self.TOP)
            body = text.getvalue()
        else:
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            body = "".join(f"--- top {self.TOP} by {order} ---\n{averages.table(sort_by=order, row_limit=self.TOP)}\n"
                           for order in ("self_cpu_time_total", "cpu_time_total"))
        with open(self.path, "w") as f:
            f.write(head + body)


def memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_accelerate() -> None:
    """Several specs may run in one process (quick mode): forget the previous Accelerator's
    singleton state (mixed precision, dynamo plugin). Not needed, and not possible, across ranks."""
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def decay_groups(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# --- the three loops ---------------------------------------------------------------------------------

def run_dist_gacc(spec, model, ds, tokenizer, timer):
    from hydra import compose, initialize_config_dir

    import dist_gacc  # noqa: F401  (resolvers)
    from dist_gacc import data, objectives, optim
    from dist_gacc.config import load_config
    from dist_gacc.loop import fit, standalone
    from dist_gacc.build import build_accelerator

    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    overrides = [f"trainer.mixed_precision={spec['precision']}", "trainer.log_with=none",
                 *[f"trainer.{key}=true" for key in ("compile", "sync_each_batch") if spec.get(key)],
                 f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"optim.warmup_ratio={WARMUP_RATIO}",
                 f"seed={SEED}", f"output_dir={tempfile.mkdtemp(prefix='bench-')}"]
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        rc = load_config(compose(config_name="train", overrides=overrides))
    acc = build_accelerator(rc)
    if spec.get("compile_backend"):
        # bench.py --quick: the trainer's compile path (TorchDynamoPlugin from build_accelerator, torch.compile
        # in prepare) with a backend that traces but generates no code (inductor's codegen of the tiny model
        # was most of the quick run's features section); quick-mode timings are not meaningful anyway.
        from accelerate.utils import DynamoBackend

        assert acc.state.dynamo_plugin.backend == DynamoBackend.INDUCTOR, acc.state.dynamo_plugin
        acc.state.dynamo_plugin.backend = DynamoBackend(spec["compile_backend"].upper())
    acc.gradient_accumulation_steps = spec["accum"]
    total = total_updates(spec)
    optimizer = optim.build_optimizer(model, rc.optim, LR, fused=spec["fused"])
    scheduler = optim.build_scheduler(optimizer, rc.optim, total)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    compiled = hasattr(model, "_orig_mod")  # torch.compile's wrapper
    if spec.get("_prepare_hook"):
        spec["_prepare_hook"](model)

    def make_loader(micro):
        return acc.prepare(data.train_loader(ds, tokenizer, micro, spec.get("num_workers", 0),
                                             pin_memory=spec["device"] == "cuda", seed=SEED,
                                             shuffle=spec.get("shuffle", False),
                                             group_by_length=spec.get("group_by_length", False)))

    hooks = spec.get("_hooks")  # comm: counts collectives per update

    class OnUpdate:  # the loop's telemetry slot: the timer (and the comm counters) per update
        def update(self, state, result):
            timer.on_update(state.updates)
            if hooks is not None:
                hooks(state.updates)

        def evaluated(self, entry, seconds):
            pass

        def close(self):
            pass

    # A regression model (its config's problem_type, as models.build_model saves it): squared error, as a run.
    # (unwrapped: by now the model may be prepared, e.g. DDP-wrapped for the comm section's 2 ranks)
    regression = acc.unwrap_model(model).config.problem_type == "regression"
    objective = objectives.SquaredError() if regression else None
    state = fit(*standalone(acc, model, optimizer, scheduler, make_loader, len(ds), spec["micro"], spec["accum"],
                            total, max_grad_norm=MAX_GRAD_NORM, telemetry=OnUpdate(), objective=objective))
    backend = acc.state.dynamo_plugin.backend.value.lower() if compiled else None
    return acc.unwrap_model(model), state.grad_norms[0], state.losses[0], {
        "compiled": compiled, "backend": backend,
        "logged_loss": state.losses[0], "logged_grad_norm": state.grad_norms[0]}  # what the run logs and records


def run_hand(spec, model, ds, tokenizer, timer):
    """What a user would write: loss/N per micro-batch, clip and step every N."""
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    device, n, total = torch.device(spec["device"]), spec["accum"], total_updates(spec)
    model.to(device).train()
    optimizer = torch.optim.AdamW(decay_groups(model), lr=LR, fused=spec["fused"] or None)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(WARMUP_RATIO * total), total)
    loader = DataLoader(ds, batch_size=spec["micro"], shuffle=False, collate_fn=collator(tokenizer, spec["device"]),
                        pin_memory=device.type == "cuda")
    bf16 = spec["precision"] == "bf16"
    first_norm = first_loss = None
    window_loss = 0.0
    for i, batch in enumerate(loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        (loss / n).backward()
        window_loss = window_loss + loss.detach() / n
        if (i + 1) % n == 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            update = (i + 1) // n
            if update == 1:
                first_norm, first_loss = norm, window_loss  # read once, after the run: no host sync here
            window_loss = 0.0
            timer.on_update(update)
    return model, float(first_norm), float(first_loss), {}


def run_hf_trainer(spec, model, ds, tokenizer, timer):
    """transformers' Trainer on the same batches, in the same order.

    The defect: transformers 5.24 decides whether to divide the loss by N from the model's forward
    signature. BertForSequenceClassification.forward takes **kwargs, so the Trainer sets
    `model_accepts_loss_kwargs = True` and assumes the model normalises by `num_items_in_batch` itself;
    BERT's classification head ignores it and returns the micro-batch mean, so nothing divides by N
    and the accumulated gradient is N times too large. Setting `model_accepts_loss_kwargs = False`
    after construction makes the Trainer divide by N, the same math as the other two loops.
    """
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    recorded = {}

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # the order the other loops use

        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            recorded.setdefault("norm", norm)
            return norm

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            first_window = recorded.setdefault("losses", [])
            if len(first_window) < spec["accum"]:
                first_window.append(loss.detach())
            return loss

    class TimerCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.on_update(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # log_first: what the Trainer reports
            if logs and "loss" in logs:
                recorded.setdefault("logged", logs)

    total = total_updates(spec)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-trainer-"), per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accum"], max_steps=total, learning_rate=LR, weight_decay=WEIGHT_DECAY,
        warmup_steps=round(WARMUP_RATIO * total), lr_scheduler_type="linear", max_grad_norm=MAX_GRAD_NORM,
        # log_first (bench.py accumulation_peers): log every update, to read the loss and norm the Trainer reports
        logging_strategy="steps" if spec.get("log_first") else "no", logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], seed=SEED,
        use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16", disable_tqdm=True,
        dataloader_pin_memory=spec["device"] == "cuda", optim="adamw_torch_fused" if spec["fused"] else "adamw_torch",
    )
    trainer = SameOrderTrainer(model=model, args=args, train_dataset=ds, data_collator=collator(tokenizer, spec["device"]),
                               callbacks=[TimerCallback()])
    if spec["variant"] == "hf_trainer":
        trainer.model_accepts_loss_kwargs = False  # the fix: the Trainer now divides each micro-batch loss by N
    trainer.train()
    first_loss = float(sum(recorded["losses"])) / spec["accum"]
    logged = recorded.get("logged", {})
    extra = {"logged_loss": logged["loss"], "logged_grad_norm": logged.get("grad_norm")} if logged else {}
    return model, float(recorded["norm"]), first_loss, extra


LOOPS = {"dist_gacc": run_dist_gacc, "hand": run_hand, "hf_trainer": run_hf_trainer,
         "hf_trainer_stock": run_hf_trainer}


def train(spec):
    from dist_gacc.data import collator  # noqa: F401  (fail early if the package is missing)

    model = load_model(spec)
    ds, tokenizer = load_data(spec)
    shapes = [tuple(b["input_ids"].shape) for b in torch.utils.data.DataLoader(
        ds, batch_size=spec["micro"], collate_fn=collator(tokenizer, spec["device"]))]
    timed = shapes[spec["warmup"] * spec["accum"]:]
    flops = model_flops(model, timed)
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_setup = current_rss_mb()
    timer = Timer(spec)
    reset_accelerate()
    model, first_norm, first_loss, extra = LOOPS[spec["variant"]](spec, model, ds, tokenizer, timer)
    seconds = timer.seconds()
    result = {
        "samples_per_s": spec["micro"] * spec["accum"] * spec["updates"] / seconds,
        "seconds": seconds, "model_tflops_per_s": flops / seconds / 1e12,
        "tokens_per_sample": sum(b * t for b, t in timed) / max(len(timed) * spec["micro"], 1),
        "peak_mb": memory_mb(spec["device"]), "setup_rss_mb": rss_setup,
        "first_grad_norm": first_norm, "first_loss": first_loss, **extra,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if spec.get("save_params"):
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, spec["save_params"])
    return result


# --- matmul ceiling ----------------------------------------------------------------------------------

def ceiling(spec):
    """Best median throughput of square matmuls in the benchmark's precision and thread count."""
    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    best = 0.0
    for n in spec["sizes"]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        times = []
        for i in range(spec["repeats"] + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # two warm-up products
                times.append(time.perf_counter() - t0)
        times.sort()
        best = max(best, 2 * n**3 / times[len(times) // 2] / 1e12)
    return {"tflops_per_s": best}


# --- communication (run under accelerate launch with 2 processes) ---------------------------------------

def comm(spec):
    """Count gradient all-reduces per optimizer update with a DDP communication hook, and the other
    (scalar) collectives by wrapping torch.distributed.all_reduce, in this trainer's loop."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counts = {"grad_passes": 0, "grad_buckets": 0, "grad_bytes": 0, "scalar_allreduces": 0}
    per_update, marks = [], {"at": dict(counts), "t": None}
    times = []

    def counting_hook(process_group, bucket):
        counts["scalar_allreduces"] -= 1  # the bucket's all_reduce below is not a scalar one
        counts["grad_buckets"] += 1
        counts["grad_bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        if bucket.is_last():
            counts["grad_passes"] += 1
        return allreduce_hook(process_group, bucket)

    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counts["scalar_allreduces"] += 1
        return plain_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # Accelerate's reduce() looks it up at call time

    def on_update(update):
        now = time.perf_counter()
        per_update.append({k: counts[k] - marks["at"][k] for k in counts})
        if marks["t"] is not None and update > spec["warmup"]:
            times.append(now - marks["t"])
        marks["at"], marks["t"] = dict(counts), now

    def prepare_hook(model):
        PREPARED.append(model)  # for the ordered teardown at the end of main()
        model.register_comm_hook(None, counting_hook)

    spec = {**spec, "_hooks": on_update, "_prepare_hook": prepare_hook}
    model = load_model(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds, tokenizer = load_data(spec, world)
    run_dist_gacc(spec, model, ds, tokenizer, Timer(spec))
    dist.all_reduce = plain_all_reduce
    times.sort()
    return {"per_update": per_update, "seconds_per_update": times[len(times) // 2], "world_size": world,
            "rank": int(os.environ.get("RANK", "0"))}


def optimizer_step(spec):
    """Milliseconds per AdamW step (all parameters, random gradients), foreach vs fused, interleaved."""
    model = load_model(spec).to(spec["device"])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    times = {"foreach": [], "fused": []}
    for _ in range(2):
        for name in times:
            optimizer = torch.optim.AdamW(decay_groups(model), lr=LR, fused=name == "fused" or None)
            for i in range(13):
                if i == 3:  # three warm-up steps
                    if spec["device"] == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                optimizer.step()
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) / 10 * 1e3)
    return {name: min(values) for name, values in times.items()}


KINDS = {"train": train, "ceiling": ceiling, "comm": comm, "optimizer_step": optimizer_step}
PREPARED = []  # DDP models of the comm specs (quick mode runs several in one process group)


def run_spec(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    result = KINDS[spec["kind"]](spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print("BENCH_RESULT " + json.dumps({"spec": {k: v for k, v in spec.items() if not k.startswith("_")},
                                             **result}), flush=True)


def serve() -> None:
    """Quick mode's one worker for many sections (bench.QuickWorker): each stdin line a JSON list of specs, answered
    by their BENCH_RESULT lines and BENCH_BATCH_END; ends at the end of stdin."""
    for line in sys.stdin:
        for spec in json.loads(line):
            run_spec(spec)
        print("BENCH_BATCH_END", flush=True)


def main():
    if sys.argv[1:] == ["--serve"]:
        return serve()
    for arg in sys.argv[1:]:
        run_spec(json.loads(arg))
    from dist_gacc.teardown import shutdown

    shutdown(models=PREPARED)  # 2-rank runs: ordered end of the process group (see dist_gacc.teardown)


if __name__ == "__main__":
    main()
