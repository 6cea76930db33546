"""End to end through the CLI, 1 and 2 processes: outputs, distributed evaluation, pipeline, bf16."""

import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from conftest import TINY, launch, load_params, max_abs_diff, read_metrics

pytestmark = pytest.mark.slow

REQUIRED = ("eval", "history", "optimizer_steps", "world_size", "effective_batch_size", "lr",
            "train_samples_per_second", "wall_seconds")


@pytest.mark.parametrize("name", ["1x8x1", "2x2x2"])
def test_metrics_json_has_the_documented_fields(equivalent_runs, name):
    m = read_metrics(equivalent_runs[name])
    for key in REQUIRED:
        assert key in m, key
    assert set(m["eval"]) >= {"f1", "accuracy"}
    assert [h["optimizer_step"] for h in m["history"]] == [8, 16]  # each epoch (eval_every=null)
    for h in m["history"]:
        assert set(h) >= {"optimizer_step", "f1", "accuracy", "train_loss"}
    assert m["eval"]["f1"] == m["history"][-1]["f1"]
    assert m["train_samples_per_second"] > 0 and m["wall_seconds"] > 0
    assert (equivalent_runs[name] / "config.yaml").exists() and (equivalent_runs[name] / "train.log").exists()


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


def test_only_rank_zero_writes(equivalent_runs):
    run_dir = equivalent_runs["2x2x2"]
    log = (run_dir / "train.log").read_text()
    assert "world size 2" in log and "[RANK 1]" not in log
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


def test_bf16_runs_on_cpu_and_changes_the_numerics(tmp_run, equivalent_runs):
    launch(tmp_run, *TINY, "trainer.micro_batch_size=8", "trainer.epochs=2", "trainer.mixed_precision=bf16")
    m = read_metrics(tmp_run)
    assert m["mixed_precision"] == "bf16" and m["optimizer_steps"] == 16
    # Silently falling back to fp32 would reproduce the fp32 run's parameters exactly.
    diff = max_abs_diff(load_params(tmp_run), load_params(equivalent_runs["1x8x1"]))
    assert 1e-6 < diff < 0.1


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
