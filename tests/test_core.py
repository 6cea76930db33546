"""The core's parts on their own, in one process: windows over a real prepared loader, the out-of-memory
policy and the resplit, the example-weighted logged loss, the length-grouped order, exit codes."""

import errno
import math

import pytest
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader

from dist_gacc import oom
from dist_gacc.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, ConfigError, DataError
from dist_gacc.run import exit_code
from dist_gacc.state import TrainState
from dist_gacc.windows import TrainBatches


def _batches(examples=37, micro=3, n=4):
    # as build.build_accelerator: one seeded permutation per epoch
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                                  data_seed=0))
    rows = [{"x": i} for i in range(examples)]
    make = lambda b: accelerator.prepare(DataLoader(rows, batch_size=b, shuffle=True))  # noqa: E731
    return accelerator, TrainBatches(accelerator, make, examples), TrainState(micro, n, total_updates=100)


def test_windows_cut_an_epoch_by_the_effective_batch_and_read_lazily():
    accelerator, batches, state = _batches()
    seen, shapes = [], []
    for window in batches.windows(state):
        micro = list(window.micro_batches())
        shapes.append((window.index, window.size, window.examples, window.ends_epoch, [m.real for m in micro],
                       [m.last for m in micro]))
        seen += [int(x) for m in micro for x in m.batch["x"][:m.real]]
    # 37 examples, micro 3 x N 4: windows of 12, 12, 12 and 1 real examples (13 batches of 3, the last short)
    assert shapes == [(0, 4, 12, False, [3, 3, 3, 3], [False, False, False, True]),
                      (1, 4, 12, False, [3, 3, 3, 3], [False, False, False, True]),
                      (2, 4, 12, False, [3, 3, 3, 3], [False, False, False, True]),
                      (3, 1, 1, True, [1], [True])]
    assert sorted(seen) == list(range(37))  # every example once, per epoch


def test_windows_resume_at_a_window_and_abandoned_passes_end():
    accelerator, batches, state = _batches()
    full = [[int(x) for m in w.micro_batches() for x in m.batch["x"][:m.real]] for w in batches.windows(state)]
    state.window = 2  # resume (or redo) at window 2 of epoch 0
    again = [[int(x) for m in w.micro_batches() for x in m.batch["x"][:m.real]] for w in batches.windows(state)]
    assert again == full[2:]
    state.window = 0
    for window in batches.windows(state):  # leave after the first window, as the last update does
        list(window.micro_batches())
        break
    assert accelerator.gradient_state.dataloader_references == [None]  # the abandoned pass was ended


def test_resplit_keeps_the_effective_batch_and_records_the_change():
    accelerator = Accelerator(cpu=True)
    state = TrainState(4, 3, updates=5, epoch=1)
    oom.resplit(state, accelerator, 2, "resume")
    assert (state.micro_batch_size, state.grad_accum_steps, accelerator.gradient_accumulation_steps) == (2, 6, 6)
    assert state.batch_size_changes == [{"update": 5, "epoch": 1, "reason": "resume", "from": [4, 3], "to": [2, 6]}]
    with pytest.raises(ConfigError, match="trainer.micro_batch_size=5 does not divide the 12 examples per process"):
        oom.resplit(state, accelerator, 5, "resume")
    assert oom.smaller_micro_batch(12) == 6 and oom.smaller_micro_batch(9) == 3 and oom.smaller_micro_batch(7) == 1


def test_oom_policy_per_engine():
    assert oom.policy("ddp", "auto", False, False) == oom.Policy("ddp", fall_back=True, agree=True,
                                                                 vote_every_micro_batch=False)
    assert oom.policy("ddp", "auto", True, False).vote_every_micro_batch  # sync_each_batch: vote every micro-batch
    assert not oom.policy("ddp", False, False, False).fall_back
    fsdp = oom.policy("fsdp", "auto", False, False)
    assert (fsdp.fall_back, fsdp.agree) == (False, False)  # forward passes all-gather: no vote, no redo
    deepspeed = oom.policy("deepspeed", "auto", False, False)
    assert (deepspeed.fall_back, deepspeed.agree) == (False, True)
    with pytest.raises(ConfigError, match="trainer.oom_fallback=true is not supported under fsdp: FSDP's forward "
                                          "passes all-gather parameters"):
        oom.policy("fsdp", True, False, False)
    with pytest.raises(ConfigError, match="trainer.oom_fallback=true is not supported under deepspeed"):
        oom.policy("deepspeed", True, False, False)
    with pytest.raises(ConfigError, match="trainer.micro_batch_size=auto is not supported under fsdp"):
        oom.policy("fsdp", "auto", False, True)


def test_logged_training_loss_weighs_windows_by_their_examples():
    state = TrainState(3, 4)
    state.losses, state.window_sizes = [0.5, 0.7, 0.9, 3.0], [12, 12, 12, 1]
    # updates 1-4: (12*0.5 + 12*0.7 + 12*0.9 + 1*3.0) / 37 = 28.2 / 37 (a mean of means would give 1.275)
    assert state.train_loss_since(0) == pytest.approx(28.2 / 37, rel=1e-12)
    state.losses += [math.nan, 1.0]
    state.window_sizes += [12, 5]
    assert state.train_loss_since(4) == pytest.approx(1.0)  # the non-finite (skipped) window is left out


def test_length_grouped_order_does_not_depend_on_the_micro_batch():
    from conftest import TINY, compose_cfg  # noqa: F401  (offline environment)
    from dist_gacc import data
    from dist_gacc.config import DataConfig, ModelConfig
    from dist_gacc.models import build_tokenizer

    splits = data.load_splits(DataConfig(name="rotten_tomatoes", max_train_samples=96, max_eval_samples=8), seed=3)
    tok = build_tokenizer(ModelConfig(name_or_path=None, from_scratch={
        "vocab_size": 300, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
        "intermediate_size": 8}), splits["train"]["text"], 64)
    encoded = data.tokenize(splits, tok, 64)["train"]

    def order(micro):
        loader = data.train_loader(encoded, tok, micro, 0, pin_memory=False, seed=5, group_by_length=True,
                                   group_size=16)
        loader.sampler.set_epoch(1)
        return [ids.tolist() for batch in loader for ids in batch["input_ids"]]

    by_2, by_4, by_8 = order(2), order(4), order(8)
    strip = lambda rows: [[t for t in r if t != tok.pad_token_id] for r in rows]  # noqa: E731
    assert strip(by_2) == strip(by_4) == strip(by_8)  # the same examples in the same order: the same windows
    assert strip(by_4) == [[t for t in encoded[i]["input_ids"]] for i in
                           data.epoch_order(encoded, 5, 1, True, 16)]  # what verify_equivalence replays


def test_exit_codes_tell_environment_from_input(tmp_path):
    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as f:  # a real ENOSPC from the kernel
            f.write("x" * 10)
            f.flush()
    assert full.value.errno == errno.ENOSPC
    code, message = exit_code(full.value)
    assert code == EXIT_ENVIRONMENT == 74 and "no space left on the device" in message
    try:
        try:
            raise ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)")
        except ConnectionError as err:
            raise DataError("data.hub_name='x/y': cannot load from the Hub") from err
    except DataError as wrapped:
        code, message = exit_code(wrapped)
    assert code == EXIT_ENVIRONMENT and "Hugging Face Hub is unreachable" in message
    assert exit_code(DataError("t.csv: row 1: column 'text' is empty")) == (
        EXIT_BAD_INPUT, "error: t.csv: row 1: column 'text' is empty")
    assert exit_code(FileNotFoundError(errno.ENOENT, "nope", "x.csv")) is None  # a bug: traceback
    assert exit_code(ValueError("bug")) is None


def test_window_prescale_is_n_w_over_examples():
    accelerator, batches, state = _batches(examples=10, micro=4, n=2)
    windows = list(batches.windows(state))
    assert [w.examples for w in windows] == [8, 2] and windows[1].prescale == pytest.approx(2 * 1 / 2)
    assert torch.tensor(1.0) * windows[0].prescale == pytest.approx(0.25)


def test_window_weight_read_from_the_epoch_order_is_what_the_loader_draws():
    """Under DeepSpeed with class weights a window's sum of weights must be known before its first forward pass:
    windows.TrainBatches reads it from the epoch's order (data.epoch_order, as build.Job.order_weights does). It
    must equal the weights of the real examples the prepared loader then draws, in every epoch and window (the
    last one holds 1 real example), and after a mid-epoch resume."""
    import numpy as np

    from dist_gacc import data

    accelerator, plain, state = _batches()
    weight_of = 1.0 + np.arange(37) % 3  # example x weighs 1, 2 or 3
    batches = TrainBatches(accelerator, plain.make_loader, 37,
                           lambda epoch: weight_of[data.epoch_order(range(37), 0, epoch, False, 12)])
    for epoch, start in ((0, 0), (1, 0), (1, 2)):
        state.epoch, state.window = epoch, start
        drawn, expected = [], []
        for window in batches.windows(state):
            micro = list(window.micro_batches())
            drawn.append(sum(weight_of[int(x)] for m in micro for x in m.batch["x"][:m.real]))
            expected.append(window.weight)
            assert window.prescale == pytest.approx(4 * 1 / window.weight)
        assert drawn == expected and len(drawn) == 4 - start
        assert drawn[-1] in (1.0, 2.0, 3.0)  # the 1-example window
    state.epoch, state.window = 0, 0
    assert [w.weight for w in plain.windows(state)] == [None] * 4  # unweighted: the count is the normaliser
