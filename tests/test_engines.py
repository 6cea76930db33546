"""Beyond one machine: launch configs, 2 CPU ranks through them, sync_each_batch, the DeepSpeed route
(pre-scaled losses), refused launches, FSDP/DeepSpeed on GPUs. Real processes, no mocks. And the update
variants on a tiny model in this process: the fp16 skip and the GradScaler, class weights' dtype, evaluation
in smaller slices on out of memory."""

import importlib.util
import json
import math

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import DistributedType
from torch.utils.data import BatchSampler, SequentialSampler

from conftest import (CONF, ROOT, TINY, launch, launch_config, launch_script, load_params, max_abs_diff,
                      read_metrics)
from dist_gacc.windows import real_examples, window_examples
from dist_gacc.config import TrainerConfig
from dist_gacc.engines import fill_deepspeed_config
from dist_gacc.errors import ConfigError

CONFIGS = {  # file: (distributed type, total processes, machines)
    "single_gpu": (DistributedType.NO, 1, 1),
    "multi_gpu": (DistributedType.MULTI_GPU, 8, 1),
    "multi_node_2x8": (DistributedType.MULTI_GPU, 16, 2),
    "fsdp": (DistributedType.FSDP, 8, 1),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 8, 1),
    "cpu_2proc": (DistributedType.MULTI_GPU, 2, 1),
}


def test_launch_configs_load_with_accelerates_loader():
    assert {p.stem for p in (CONF / "accelerate").glob("*.yaml")} == set(CONFIGS)
    # accelerate launch copies fsdp_config/deepspeed_config entries onto its arguments: a key it has no
    # argument for would be silently ignored, so check them against the parser.
    arguments = {action.dest for action in launch_command_parser()._actions}
    readme = (ROOT / "README.md").read_text()
    for name, (kind, processes, machines) in CONFIGS.items():
        config = load_config_from_file(str(CONF / "accelerate" / f"{name}.yaml"))  # unknown top-level keys raise
        assert (config.distributed_type, config.num_processes, config.num_machines) == (kind, processes, machines)
        for key in config.fsdp_config:
            assert (key if key.startswith("fsdp") else f"fsdp_{key}") in arguments, (name, key)
        for key in config.deepspeed_config:
            assert key in arguments, (name, key)
        assert f"--config_file conf/accelerate/{name}.yaml" in readme, name
    fsdp = load_config_from_file(str(CONF / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_reshard_after_forward"] is True and fsdp["fsdp_version"] == 2  # full shard


def test_sync_each_batch_is_validated():
    assert TrainerConfig(sync_each_batch=True).sync_each_batch is True
    with pytest.raises(ConfigError, match="trainer.sync_each_batch must be true or false, got 'yes'"):
        TrainerConfig(sync_each_batch="yes")


def accelerate_shards(n: int, micro: int, world: int) -> list[list[list[int]]]:
    """Each rank's micro-batches of sample indices, as Accelerate's BatchSamplerShard deals them
    (split_batches=False, even_batches=True: a short epoch end is topped up with repeats)."""
    base = BatchSampler(SequentialSampler(range(n)), micro, drop_last=False)
    return [list(BatchSamplerShard(base, world, rank, split_batches=False, even_batches=True))
            for rank in range(world)]


@pytest.mark.parametrize("n, micro, world", [(37, 3, 2), (64, 2, 2), (10, 4, 3), (5, 8, 2), (37, 4, 2),
                                             (23, 2, 4), (9, 4, 2), (64, 8, 1), (13, 3, 1)])
def test_window_examples_counts_every_real_example_once(n, micro, world):
    """Against Accelerate's real shards: a window is micro-batches [w*N, (w+1)*N) of every rank; its
    real examples are the samples seen there for the first time in the epoch. Updates run step by
    step, all ranks at once, so the epoch's order is (batch index, rank, position); the repeats
    Accelerate pads with are samples from the epoch's start, seen before (or earlier in the batch)."""
    shards = accelerate_shards(n, micro, world)
    batches_per_rank = len(shards[0])
    assert all(len(shard) == batches_per_rank for shard in shards)  # even_batches: every rank steps alike
    assert all(len(batch) == micro for shard in shards for batch in shard)  # padded to full batches
    seen, first_seen_in_batch = set(), {}  # (batch index, rank) -> number of new samples
    for index in range(batches_per_rank):
        for rank in range(world):
            batch = shards[rank][index]
            new = [i for p, i in enumerate(batch) if i not in seen and i not in batch[:p]]
            seen.update(batch)
            first_seen_in_batch[index, rank] = len(new)
            # the real ones lead the batch, so the loop can take the first real_examples() rows
            assert batch[:len(new)] == new, (index, rank, batch)
            assert real_examples(n, micro, index, world, rank) == len(new), (index, rank, batch)
    assert seen == set(range(n)) and sum(first_seen_in_batch.values()) == n
    for accum in (1, 2, 3, 4):
        windows = math.ceil(batches_per_rank / accum)
        counts = [window_examples(n, micro, w, accum, batches_per_rank, world) for w in range(windows)]
        expected = [sum(first_seen_in_batch[index, rank]
                        for index in range(w * accum, min((w + 1) * accum, batches_per_rank))
                        for rank in range(world)) for w in range(windows)]
        assert counts == expected, accum
        assert sum(counts) == n and min(counts) > 0, accum  # each real example in exactly one window


def test_window_examples_hand_counted():
    """37 examples, micro 4, 2 ranks, N 3: global batches 0-8 are full and batch 9 holds sample 36 (+3
    repeats); rank r gets batches r, r+2, ...: window 0 = 6 full batches = 24, window 1 = 3 full + 1 = 13.
    1 rank, micro 3, N 4: 13 batches (12 full, the last holds sample 36): windows 12, 12, 12, 1."""
    assert [window_examples(37, 4, w, 3, 5, 2) for w in range(2)] == [24, 13]
    assert [window_examples(37, 3, w, 4, 13, 1) for w in range(4)] == [12, 12, 12, 1]
    assert [real_examples(37, 4, 4, 2, r) for r in range(2)] == [4, 1]  # global batches 8 and 9


def test_deepspeed_values_filled_from_the_trainer_or_refused():
    config = {"train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    filled = fill_deepspeed_config(config, 0.5, micro_batch_size=4, grad_accum_steps=3, world_size=8)
    assert filled == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3,
                      "train_batch_size": 96, "gradient_clipping": 0.5}
    assert fill_deepspeed_config({}, None, 4, 3, 8)["gradient_clipping"] == 0.0  # no clipping
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2 but trainer.grad_accum_steps \(N\) gives 3"):
        fill_deepspeed_config({"gradient_accumulation_steps": 2}, 1.0, 4, 3, 8)
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 but trainer.max_grad_norm gives 0.5"):
        fill_deepspeed_config({"gradient_clipping": 1.0}, 0.5, 4, 3, 8)


@pytest.mark.slow
def test_cpu_2proc_config_gives_two_ranks_and_the_same_updates(equivalent_runs):
    # 2x2x2 is the README's command: accelerate launch --config_file conf/accelerate/cpu_2proc.yaml (forked; what
    # its ranks get is compared with a real launch of the file in tests/test_forkserver.py)
    run = equivalent_runs["2x2x2"]
    ours, reference = read_metrics(run), read_metrics(equivalent_runs["1x8x1"])  # 1 process, 8 x 1
    assert (ours["world_size"], ours["engine"], ours["effective_batch_size"]) == (2, "ddp", 8)
    assert ours["optimizer_steps"] == reference["optimizer_steps"] == 16
    assert max_abs_diff(load_params(run), load_params(equivalent_runs["1x8x1"])) <= 1e-5


@pytest.mark.slow
def test_two_processes_that_each_see_a_world_of_one_are_refused(tmp_run):
    # cpu_2proc.yaml without ACCELERATE_USE_CPU: accelerate starts 2 processes, each its own world of 1
    proc = launch_config(tmp_run, "cpu_2proc", *TINY, env={"ACCELERATE_USE_CPU": "0"})
    assert proc.returncode != 0
    assert "the launcher started 2 processes but each sees a world of 1" in proc.stderr
    assert not (tmp_run / "metrics.json").exists()


@pytest.mark.slow
def test_sync_each_batch_exchanges_every_micro_batch_with_the_same_updates(tmp_path):
    """Also the DeepSpeed route's arithmetic on 2 ranks: pre-scaled losses, no rescale afterwards."""
    out = tmp_path / "records.json"
    launch_script(ROOT / "tests" / "dist" / "comm_count.py", str(out), str(tmp_path / "runs"))
    r = json.loads(out.read_text())
    # 7 micro-batches per rank in 4 windows; the tiny model's gradients fit one DDP bucket
    assert (r["baseline"]["allreduces"], r["sync_each_batch"]["allreduces"], r["prescale"]["allreduces"]) == (4, 7, 4)
    for name in ("sync_each_batch", "prescale"):
        assert r[name]["updates"] == 4
        assert r[name]["max_abs_diff"] <= 1e-12, name  # float64
        assert r[name]["losses"] == pytest.approx(r["baseline"]["losses"], rel=1e-12)
    assert r["moved"] > 1e-3


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused(tmp_run):
    # Measured (accelerate 1.15): FSDP is enabled only for GPU-like distributed types; with
    # ACCELERATE_USE_CPU=1 the model was silently wrapped in DDP instead. The trainer refuses that.
    proc = launch_config(tmp_run, "fsdp", *TINY, launch_args=("--num_processes", "2"))
    assert proc.returncode != 0
    assert "the launch config asks for FSDP but Accelerate set up MULTI_CPU" in proc.stderr


RAGGED = [*TINY, "data.max_train_samples=37", "trainer.micro_batch_size=3", "trainer.grad_accum_steps=4",
          "trainer.epochs=2", "trainer.checkpoint_every=3", "trainer.log_with=none"]  # windows 12, 12, 12, 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (.[deepspeed])")
def test_deepspeed_zero2_one_cpu_process_matches_the_plain_loop(tmp_path):
    """DeepSpeed divides by its N, clips and steps inside backward; the pre-scaled losses keep every
    update the exact window mean (ragged last window). 2 CPU ranks: tests/test_engines_cpu.py."""
    plain, ds = tmp_path / "plain", tmp_path / "deepspeed"
    launch(plain, *RAGGED)
    # Without CUDA, DeepSpeed picks its CPU accelerator by itself (and the launch forks from the suite's fork
    # server, whose DeepSpeed was imported so); with a GPU it must be told (DS_ACCELERATOR=cpu: a real launch).
    proc = launch_config(ds, "deepspeed_zero2", *RAGGED, env={"DS_ACCELERATOR": "cpu"} if torch.cuda.is_available() else {},
                         launch_args=("--num_processes", "1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = read_metrics(plain), read_metrics(ds)
    assert (a["optimizer_steps"], b["optimizer_steps"], b["engine"]) == (8, 8, "deepspeed")
    assert b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-6)
    assert max(b["grad_norms"]) > 1.0  # clipping at trainer.max_grad_norm=1.0 mattered (DeepSpeed clipped)
    assert b["grad_norms"] == pytest.approx(a["grad_norms"], rel=1e-5)  # DeepSpeed's norm, before clipping
    assert max_abs_diff(load_params(plain), load_params(ds)) <= 1e-6
    state = json.loads((sorted((ds / "checkpoints").glob("step-*"))[-1] / "trainer_state.json").read_text())
    assert any(name.startswith("pytorch_model/") for name in state["files"])  # DeepSpeed's shards are checked too


GPUS = torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs (FSDP2 on 2 CPU ranks: tests/test_engines_cpu.py, "
                    "DIST_GACC_FSDP_ON_CPU=1)")
def test_fsdp_full_shard_matches_ddp(tmp_path, equivalent_runs):
    run = tmp_path / "fsdp"
    proc = launch_config(run, "fsdp", *TINY, "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2",
                         "trainer.epochs=2", "trainer.checkpoint_every=5", env={},
                         launch_args=("--num_processes", "2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_metrics(run)["engine"] == "fsdp" and read_metrics(run)["optimizer_steps"] == 16
    assert max_abs_diff(load_params(run), load_params(equivalent_runs["1x8x1"])) <= 1e-4  # TF32 on GPU


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(GPUS < 2 or importlib.util.find_spec("deepspeed") is None,
                    reason="needs 2 CUDA GPUs and deepspeed (2 CPU ranks: tests/test_engines_cpu.py)")
def test_deepspeed_two_gpus_matches_one_process(tmp_path):
    plain, ds = tmp_path / "plain", tmp_path / "deepspeed"
    launch(plain, *RAGGED)  # 1 process x 3 x 4 = 12
    proc = launch_config(ds, "deepspeed_zero2", *RAGGED, "trainer.grad_accum_steps=2", env={},
                         launch_args=("--num_processes", "2"))  # 2 GPUs x 3 x 2 = 12
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_metrics(ds)["train_losses"] == pytest.approx(read_metrics(plain)["train_losses"], rel=1e-4)
    assert max_abs_diff(load_params(plain), load_params(ds)) <= 1e-4


# --- the update variants on a real (tiny) model, in this process ------------------------------------

@pytest.fixture
def fresh_accelerate_state():
    """An Accelerator of its own precision: Accelerate's state is a per-process singleton."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _tiny_job(accelerator, examples=16, lr=1e-2):
    """A tiny BERT, AdamW and a constant schedule, prepared; a make_loader of real (random) token rows."""
    from torch.utils.data import DataLoader

    model = _tiny_bert()
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 50, (6,), generator=gen), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": i % 2} for i in range(examples)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, lambda b: accelerator.prepare(DataLoader(rows, batch_size=b)), examples


def test_fp16_skip_of_a_non_finite_loss_leaves_the_scaler_as_torchs_own_skipped_step(fresh_accelerate_state):
    """fp16: update 1's loss is NaN, so the engine skips it after the clip's unscale_(); the GradScaler must
    end that update as GradScaler.step + update() do on an inf (scale x backoff, growth count 0), or update 2's
    unscale_() raises "unscale_() has already been called on this optimizer since the last update()".
    A CPU GradScaler stands in for CUDA's (Accelerate makes none on a CPU)."""
    from accelerate import Accelerator

    from dist_gacc.engines import build_engine
    from dist_gacc.loop import Hooks, fit, standalone

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, optimizer, scheduler, make_loader, n = _tiny_job(accelerator)
    seen = {}

    def before_forward(micro, updates):
        seen.setdefault(updates, (accelerator.scaler.state_dict(),
                                  {k: v.detach().clone() for k, v in model.named_parameters()}))

    nan_first = lambda losses, updates: losses * float("nan") if updates == 0 else losses  # noqa: E731
    loop, state = standalone(accelerator, model, optimizer, scheduler, make_loader, n, 4, 2, total_updates=2,
                             max_grad_norm=1.0, engine=build_engine("single", "exact", fp16=True),
                             hooks=Hooks(before_forward=before_forward, after_forward=nan_first))
    fit(loop, state)

    # torch's own skipped step: an inf found in the gradients, step() skips, update() backs off
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    param = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([param], lr=1.0)
    reference.scale(param.sum()).backward()
    param.grad[0] = float("inf")
    reference.step(sgd)
    reference.update()
    after_skip, params_after_skip = seen[1]
    assert after_skip == reference.state_dict() and after_skip["scale"] == 2.0**9
    assert state.skipped_updates == 1 and state.optimizer_steps == 1 and state.updates == 2
    assert all(torch.equal(params_after_skip[k], v) for k, v in seen[0][1].items())  # update 1 changed nothing
    assert max((p - params_after_skip[k]).abs().max().item() for k, p in model.named_parameters()) > 1e-4
    assert accelerator.scaler.state_dict()["_growth_tracker"] == 1  # update 2 stepped through the scaler


class _Float64Spotter(torch.overrides.TorchFunctionMode):
    """Records every torch call that returns a float64 tensor (Apple's MPS has no float64)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                self.calls.append(getattr(func, "__name__", str(func)))
        return out


def test_class_weighted_updates_stay_in_the_loss_dtype(fresh_accelerate_state):
    """Class weights (and the window's sum of them) in the loss dtype, never float64 on the device: MPS has no
    float64. A float32 run of the exact weighted engine creates no float64 tensor and still trains."""
    from accelerate import Accelerator

    from dist_gacc.engines import build_engine
    from dist_gacc.loop import fit, standalone
    from dist_gacc.objectives import CrossEntropy

    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler, make_loader, n = _tiny_job(accelerator)
    objective = CrossEntropy([0.5, 2.0])
    loop, state = standalone(accelerator, model, optimizer, scheduler, make_loader, n, 4, 2, total_updates=2,
                             max_grad_norm=1.0, engine=build_engine("single", "exact", fp16=False, weighted=True),
                             objective=objective)
    with _Float64Spotter() as spotter:
        fit(loop, state)
    assert spotter.calls == []
    assert state.optimizer_steps == 2 and state.window_sizes == [8, 8]
    # 8 rows alternate labels 0, 1: the window's normaliser is 4 x 0.5 + 4 x 2.0 = 10 (so the mean of its
    # weighted losses, not of the rows, is what was logged)
    labels = torch.tensor([0, 1] * 4)
    weights = objective.weights({"labels": labels}, torch.zeros(8))
    assert weights.dtype == torch.float32 and weights.sum().item() == 10.0


def test_naive_loss_normalisation_under_deepspeed_is_refused():
    """DeepSpeed divides by its own N inside backward, so the naive variant cannot be reproduced there: it
    would silently train exact while metrics.json said naive."""
    from types import SimpleNamespace

    from dist_gacc.engines import check_supported

    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                                state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    with pytest.raises(ConfigError, match="trainer.loss_normalisation=naive is not supported under DeepSpeed"):
        check_supported(deepspeed, TrainerConfig(loss_normalisation="naive", micro_batch_size=4))
    check_supported(deepspeed, TrainerConfig(loss_normalisation="exact", micro_batch_size=4))  # accepted
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    check_supported(ddp, TrainerConfig(loss_normalisation="naive", micro_batch_size=4))  # naive runs under DDP


def test_evaluation_out_of_memory_runs_the_batch_in_smaller_slices_with_the_same_logits(fresh_accelerate_state):
    """oom.EvalForward: a 19-row batch where more than 5 rows do not fit runs in slices of 4 (19 -> 9 -> 4), which
    stay for later batches; each row's logits as in one pass. Under FSDP, or at 1 row, the run stops naming
    trainer.eval_batch_size / the model."""
    from accelerate import PartialState

    from dist_gacc import oom
    from dist_gacc.errors import UserError

    PartialState(cpu=True)  # Accelerate's logger (the fallback's warning) needs it
    model = _tiny_bert().eval()
    fits = {"rows": 5}

    def out_of_memory(module, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        if rows > fits["rows"]:
            raise torch.OutOfMemoryError(f"CUDA out of memory at {rows} rows (simulated)")

    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1, 50, (19, 7), generator=gen),
             "attention_mask": torch.ones(19, 7, dtype=torch.long)}
    batch["attention_mask"][3:, 5:] = 0  # padded rows: slicing keeps the batch's padding
    with torch.no_grad():
        expected = model(**batch).logits
        handle = model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
        forward = oom.EvalForward(oom.policy("ddp", "auto", False, False), 64)
        assert torch.allclose(forward(model, batch), expected, atol=1e-6) and forward.rows == 4
        assert torch.allclose(forward(model, batch), expected, atol=1e-6) and forward.rows == 4  # no retry
        fits["rows"] = 0
        with pytest.raises(UserError, match="out of memory evaluating 1 example at a time"):
            oom.EvalForward(oom.policy("ddp", "auto", False, False), 1)(model, batch)
        with pytest.raises(UserError, match="out of memory evaluating at trainer.eval_batch_size=64 under FSDP"):
            oom.EvalForward(oom.policy("fsdp", "auto", False, False), 64)(model, batch)
        handle.remove()
