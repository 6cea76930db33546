"""End to end through the CLI, 1 and 2 processes: outputs, distributed evaluation, pipeline, bf16."""

import re
from collections import Counter

import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from conftest import SPLITS, TINY, launch, load_params, max_abs_diff, read_metrics
from dist_gacc import precision

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("name, processes, engine", [("1x8x1", 1, "single"), ("2x2x2", 2, "ddp")])
def test_metrics_json_has_the_documented_fields(equivalent_runs, name, processes, engine):
    m = read_metrics(equivalent_runs[name])
    # 64 examples, effective batch 8, 2 epochs: 16 updates of 8, every window full; lr 1e-3, warmup 4.
    assert (m["world_size"], m["engine"], m["effective_batch_size"]) == (processes, engine, 8)
    assert m["micro_batch_size"] * m["grad_accum_steps"] * processes == 8
    assert (m["optimizer_steps"], m["updates"], m["skipped_updates"], m["epochs"]) == (16, 16, 0, 2)
    assert (m["lr"], m["final_lr"], m["mixed_precision"], m["loss_normalisation"]) == (1e-3, 0.0, "no", "exact")
    assert m["train_examples_seen"] == 2 * 64 and len(m["train_losses"]) == len(m["grad_norms"]) == 16
    assert m["label_names"] == ["rotten", "fresh"] and m["resumed_from"] is None
    assert [(h["optimizer_step"], h["epoch"]) for h in m["history"]] == [(8, 1), (16, 2)]  # eval_every=null
    for h, epoch_losses in zip(m["history"], (m["train_losses"][:8], m["train_losses"][8:])):
        # an epoch's loss is the mean over its examples: 8 windows of 8, so the mean of the window means
        assert h["train_loss"] == pytest.approx(sum(epoch_losses) / 8, rel=1e-9)
    assert m["eval"]["num_examples"] == m["test"]["num_examples"] == 37 and m["eval"]["average"] == "binary"
    assert (m["eval"]["f1"], m["eval"]["accuracy"]) == (m["history"][-1]["f1"], m["history"][-1]["accuracy"])
    for split in ("eval", "test"):  # accuracy is a count of the 37 examples
        correct = m[split]["accuracy"] * 37
        assert correct == pytest.approx(round(correct), abs=1e-9) and 0 <= correct <= 37
    # samples/s is over the training loop, which is part of the wall time; the log prints the same figure
    assert m["train_samples_per_second"] > m["train_examples_seen"] / m["wall_seconds"] > 0
    log = (equivalent_runs[name] / "train.log").read_text()
    assert f"{m['train_samples_per_second']:.1f} samples/s" in log
    assert (equivalent_runs[name] / "config.yaml").exists()


@pytest.mark.parametrize("name", ["1x8x1", "2x2x2"])
def test_odd_validation_split_gathers_each_example_once(equivalent_runs, name):
    """37 validation examples over 2 ranks: no duplicates; F1 equals sklearn on those predictions."""
    m = read_metrics(equivalent_runs[name])
    preds = pd.read_csv(equivalent_runs[name] / "validation_predictions.csv")
    assert len(preds) == m["eval"]["num_examples"] == 37
    y_true = (preds["label"] == "fresh").astype(int)
    y_pred = (preds["prediction"] == "fresh").astype(int)
    assert m["eval"]["f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
    assert m["eval"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)


def test_saved_model_loads_in_a_pipeline(equivalent_runs):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(equivalent_runs["2x2x2"] / "model"), device="cpu")
    out = classify(["a gorgeous, moving film", "tedious and overlong", "fine"])
    assert len(out) == 3 and {o["label"] for o in out} <= {"rotten", "fresh"}
    assert all(0.0 <= o["score"] <= 1.0 for o in out)


def listing(run_dir):
    """Every file and folder under a run, relative, with duplicates; digits in TensorBoard's
    time-stamped, host- and pid-named entries as N."""
    names = []
    for path in sorted(run_dir.rglob("*")):
        parts = path.relative_to(run_dir).parts
        if parts[0] == "tensorboard" and len(parts) > 1:
            parts = ("tensorboard", *(re.sub(r"\d+", "N", p) for p in parts[1:]))
        names.append("/".join(parts) + ("/" if path.is_dir() else ""))
    return sorted(names)


def test_only_rank_zero_writes(equivalent_runs, monkeypatch):
    """What rank 1 could write: Hydra's .hydra/ and job log (kept to rank 0 by the main_rank_only
    resolver), a second TensorBoard tracker, metrics.json, validation_predictions.csv, model/,
    checkpoints. Rank 1 writing a same-named file with the same content leaves no trace, so check
    (1) rank 1's own view of the resolver, (2) the 2-rank folder is the 1-process folder, entry for
    entry, plus the one file Accelerate has every rank write (its RNG state in each checkpoint),
    (3) one tracker, (4) each log line once, (5) one copy of the predictions."""
    from dist_gacc.resolvers import main_rank_only

    for rank, subdir, log_file in (("0", ".hydra", "run/train.log"), ("1", None, "/dev/null")):
        monkeypatch.setenv("RANK", rank)  # as accelerate launch exports it to each rank
        assert main_rank_only(".hydra") == subdir and main_rank_only("run/train.log", "/dev/null") == log_file

    two, one = equivalent_runs["2x2x2"], equivalent_runs["1x8x1"]
    extra = sorted((Counter(listing(two)) - Counter(listing(one))).elements())
    assert not Counter(listing(one)) - Counter(listing(two))
    rng_files = [p for p in listing(one) if p.endswith("/random_states_0.pkl")]  # one per checkpoint kept
    assert rng_files and extra == [p.replace("_0.pkl", "_1.pkl") for p in rng_files]
    assert sorted(p.name for p in (two / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    events = sorted((two / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 2 and len({p.name.split(".")[-2] for p in events}) == 1  # one process id wrote them
    assert len(list((two / "tensorboard").rglob("hparams.yml"))) == 1

    log, log_one = (two / "train.log").read_text(), (one / "train.log").read_text()
    assert "world size 2" in log and "[RANK 1]" not in log
    # Every line is rank 0's, and the 2-rank log has the 1-process log's lines, in order, once each:
    # rank 1 appending to train.log would repeat them.
    def tags(text):  # "[time][logger][LEVEL] - ..." -> "[logger][LEVEL]"
        return [re.sub(r"^\[[^]]*\]", "", line).split(" - ")[0] for line in text.splitlines()]

    assert all(" - [RANK 0] " in line for line in log.splitlines())
    # Only the project's lines (other libraries' warnings could appear too: those depend on caches and
    # machines, so they are left out of the comparison; test_config checks what reaches train.log).
    ours = lambda text: [tag for tag in tags(text) if tag.startswith("[dist_gacc.")]  # noqa: E731
    assert ours(log) == ours(log_one) and log.count("world size 2") == 1
    assert all(tag.startswith("[dist_gacc.") or tag.endswith(("[WARNING]", "[ERROR]")) for tag in tags(log))
    assert len(pd.read_csv(two / "validation_predictions.csv")) == 37  # not appended to by a second writer


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """The equivalence splits of conftest.SPLITS in bf16 autocast: {name: run_dir}."""
    runs = {}
    for name, s in SPLITS.items():
        runs[name] = tmp_path_factory.mktemp(f"bf16-{name}")
        launch(runs[name], *TINY, f"trainer.micro_batch_size={s['micro']}", f"trainer.grad_accum_steps={s['accum']}",
               "trainer.epochs=2", "trainer.mixed_precision=bf16", processes=s["processes"])
    return runs


def test_bf16_runs_on_cpu_and_changes_the_numerics(bf16_runs, equivalent_runs):
    tmp_run = bf16_runs["1x8x1"]
    m, fp32 = read_metrics(tmp_run), read_metrics(equivalent_runs["1x8x1"])
    assert m["mixed_precision"] == "bf16" and m["optimizer_steps"] == 16
    # An explicit bf16 on a CPU is measured: a warning with both figures where bf16 is the slower one.
    probe, log = m["precision"]["probe"], (tmp_run / "train.log").read_text()
    slower = not precision.bf16_faster(probe)
    assert (f"bf16 measured slower than fp32: {precision.figures(probe)}" in log) is slower
    diff = max_abs_diff(load_params(tmp_run), load_params(equivalent_runs["1x8x1"]))
    # Silently falling back to fp32 would reproduce the fp32 run's parameters exactly.
    # Measured: 7.1e-3 (layer 1's attention value weight), each run 6.7e-3 from the shared initial
    # weights. Adam moves a parameter by about the lr per update at most, so from the same start two
    # runs differ by at most 2 x the sum of the lrs applied (2 x 8e-3): NaN, random or runaway bf16
    # weights exceed it.
    applied = sum(fp32["lr_after_update"][:-1])  # update k runs at the lr set after update k-1 (0 first)
    assert applied == pytest.approx(8e-3)
    assert 1e-6 < diff < 2 * applied
    # bf16 autocast changes every update's loss a little (measured: at most 5.3e-5 of ~0.69), not more
    # than a bf16 rounding of the logits could (1e-3); a broken bf16 forward pass changes it more.
    assert max(abs(a - b) for a, b in zip(m["train_losses"], fp32["train_losses"])) < 1e-3


def test_bf16_exactness_two_ranks_equal_one_process_at_the_same_micro_batch(bf16_runs):
    """What exactness means under bf16 autocast (fp32 parameters and gradients, bf16 matmuls): the same
    micro-batch shapes on 2 ranks or 1 process give the same updates to fp32 rounding (measured 6.9e-7 after
    16 updates, Xeon AVX512/AMX); another micro-batch size rounds the matmuls differently (measured 5.8e-4,
    7 % of the 8e-3 an Adam parameter can move in these 16 updates), which no split can avoid in bf16."""
    two, one, big = (read_metrics(bf16_runs[k]) for k in ("2x2x2", "1x2x4", "1x8x1"))
    same_shapes = max_abs_diff(load_params(bf16_runs["2x2x2"]), load_params(bf16_runs["1x2x4"]))
    assert same_shapes <= 1e-5
    assert max(abs(a - b) for a, b in zip(two["train_losses"], one["train_losses"])) <= 1e-6
    assert max(abs(a - b) / b for a, b in zip(two["grad_norms"], one["grad_norms"])) <= 1e-5
    other_shape = max_abs_diff(load_params(bf16_runs["1x2x4"]), load_params(bf16_runs["1x8x1"]))
    assert same_shapes < other_shape < 2e-3 and two["optimizer_steps"] == big["optimizer_steps"] == 16


def test_a_saved_run_folder_is_a_valid_model_name_or_path(equivalent_runs):
    """model.name_or_path takes any AutoModelForSequenceClassification folder; dropout is applied."""
    from dist_gacc import models
    from dist_gacc.config import ModelConfig

    cfg = ModelConfig(name_or_path=str(equivalent_runs["1x8x1"] / "model"), dropout=0.25)
    tokenizer = models.build_tokenizer(cfg, [], 64)
    model = models.build_model(cfg, ["neg", "pos"], tokenizer)
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.25
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id
