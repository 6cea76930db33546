"""Memory levers (issue 13): gradient checkpointing and LoRA through peft change no math; bad input is
refused before training. Real runs of scripts/train.py on the tiny BERT (dropout 0), 1 or 2 gloo ranks."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import EFF16, ROOT, TINY, compose_cfg, launch, launch_script, load_params, max_abs_diff, read_metrics
from dist_gacc import models
from dist_gacc.config import ModelConfig, PeftConfig, load_config
from dist_gacc.errors import ConfigError

FAULTS = ROOT / "tests" / "dist" / "faults.py"
# EFF16 (conftest): 64 examples, effective batch 16 (2 ranks x micro 4 x N 2), 2 epochs: 8 updates, 4 windows
# an epoch; CKPT: a checkpoint after every update, all kept (the resume starts from step-3, mid-epoch).
CKPT = ["trainer.checkpoint_every=1", "trainer.keep_checkpoints=20"]
GC = ["model.gradient_checkpointing=true"]
LORA = ["peft=lora", "peft.dropout=0.0"]
# 37 examples: windows of 24 and 13 real examples (2 ranks x micro 4 x N 3, or 1 rank x micro 24).
RAGGED = [*TINY, "data.max_train_samples=37", "trainer.epochs=2", "trainer.log_with=none"]


def _run(factory, name, *overrides, processes=1):
    run_dir = factory.mktemp(name) / "run"
    launch(run_dir, *overrides, processes=processes)
    return run_dir


# --- gradient checkpointing ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gc_runs(tmp_path_factory, eff16_runs):
    f = tmp_path_factory
    return {
        "plain2": eff16_runs[2],  # EFF16 on 2 ranks (conftest, shared with test_exact_accumulation)
        "gc2": _run(f, "gc2", *EFF16, *GC, *CKPT, processes=2),
    }


@pytest.mark.slow
def test_gradient_checkpointing_changes_no_math_on_two_ranks(gc_runs):
    plain, gc = read_metrics(gc_runs["plain2"]), read_metrics(gc_runs["gc2"])
    assert (gc["gradient_checkpointing"], plain["gradient_checkpointing"]) == (True, False)
    assert gc["optimizer_steps"] == plain["optimizer_steps"] == 8 and gc["grad_accum_steps"] == 2
    assert max_abs_diff(load_params(gc_runs["gc2"]), load_params(gc_runs["plain2"])) <= 1e-5
    assert gc["train_losses"] == pytest.approx(plain["train_losses"], rel=1e-6)
    assert gc["trainable_parameters"] == gc["total_parameters"] == plain["total_parameters"]
    assert "gradient checkpointing on" in (gc_runs["gc2"] / "train.log").read_text()


@pytest.mark.slow
def test_gradient_checkpointing_with_oom_fallback_keeps_every_update(tmp_path, gc_runs):
    """Rank 1 runs out of memory from update 3 on: the window is redone at micro 2 x N 4, recomputing."""
    run_dir = tmp_path / "oom"
    launch_script(FAULTS, str(run_dir), "midway", *EFF16, *GC)
    m = read_metrics(run_dir)
    assert m["batch_size_changes"] == [{"update": 2, "epoch": 0, "reason": "out of memory", "from": [4, 2],
                                        "to": [2, 4]}]
    assert m["optimizer_steps"] == 8 and m["gradient_checkpointing"] is True
    assert max_abs_diff(load_params(run_dir), load_params(gc_runs["plain2"])) <= 1e-5
    assert m["train_losses"] == pytest.approx(read_metrics(gc_runs["plain2"])["train_losses"], rel=1e-6)


@pytest.mark.slow
def test_gradient_checkpointing_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path, gc_runs):
    step3 = gc_runs["gc2"] / "checkpoints" / "step-3"  # epoch 0, window 3 of 4
    assert json.loads((step3 / "trainer_state.json").read_text())["position"]["window"] == 3
    resumed = tmp_path / "resumed"
    launch(resumed, *EFF16, *GC, *CKPT, f"resume={step3}", processes=2)
    a, b = read_metrics(resumed), read_metrics(gc_runs["gc2"])
    assert a["resumed_from"] == str(step3) and a["optimizer_steps"] == b["optimizer_steps"] == 8
    assert max_abs_diff(load_params(resumed), load_params(gc_runs["gc2"])) == 0.0
    assert a["train_losses"] == b["train_losses"] and a["lr_after_update"] == b["lr_after_update"]


# --- LoRA ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    f = tmp_path_factory
    return {
        # 2 ranks with gradient checkpointing on, against 1 process without: both levers at once.
        "ragged2": _run(f, "lr2", *RAGGED, *LORA, *GC, "trainer.micro_batch_size=4", "trainer.grad_accum_steps=3",
                        processes=2),
        "ragged1": _run(f, "lr1", *RAGGED, *LORA, "trainer.micro_batch_size=24"),
        "full": _run(f, "lfull", *EFF16, *LORA, *CKPT),  # 1 process: micro 4 x N 4
    }


@pytest.mark.slow
def test_lora_two_ranks_with_ragged_accumulation_equal_one_process(lora_runs):
    two, one = read_metrics(lora_runs["ragged2"]), read_metrics(lora_runs["ragged1"])
    assert (two["world_size"], two["grad_accum_steps"], one["grad_accum_steps"]) == (2, 3, 1)
    assert two["train_window_examples"] == one["train_window_examples"] == [24, 13, 24, 13]
    assert max_abs_diff(load_params(lora_runs["ragged2"]), load_params(lora_runs["ragged1"])) <= 1e-5
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-6)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    # the frozen base moved nowhere but through the merged adapters: the run trained something
    assert two["trainable_parameters"] == one["trainable_parameters"] < two["total_parameters"]


@pytest.mark.slow
def test_lora_trains_a_small_fraction_and_the_head(lora_runs):
    run_dir = lora_runs["full"]
    m = read_metrics(run_dir)
    assert m["peft"] == "lora" and m["trainable_parameters"] / m["total_parameters"] < 0.25
    log = (run_dir / "train.log").read_text()
    assert f"parameters: {m['trainable_parameters']} trainable of {m['total_parameters']}" in log
    assert "LoRA r=8 alpha=16 dropout=0 on ['query', 'value']" in log
    adapter = run_dir / "model" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["query", "value"]
    from safetensors.torch import load_file

    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert any("classifier" in k for k in keys) and any("lora_A" in k for k in keys)  # the head is trained
    merged = load_params(run_dir)  # model/: a plain BERT classifier, no peft names
    assert "classifier.weight" in merged and not any("lora" in k or "base_model" in k for k in merged)
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "rotten", "1": "fresh"}
    assert saved["problem_type"] == "single_label_classification"
    assert not (run_dir / "model" / "adapter_config.json").exists()  # transformers would reach for peft


PIPELINE_WITHOUT_PEFT = """
import builtins, json, sys

real_import = builtins.__import__

def no_peft(name, *args, **kwargs):  # any `import peft` fails; transformers' availability probe still runs
    if name == "peft" or name.startswith("peft."):
        raise ModuleNotFoundError("No module named 'peft' (blocked in this test)")
    return real_import(name, *args, **kwargs)

builtins.__import__ = no_peft
from transformers import pipeline

texts = json.loads(sys.stdin.read())
classify = pipeline("text-classification", model=sys.argv[1], device="cpu")
labels = [out["label"] for out in classify(texts, batch_size=64, truncation=True)]
assert "peft" not in sys.modules
print(json.dumps(labels))
"""


@pytest.mark.slow
def test_merged_model_loads_in_a_pipeline_without_peft(lora_runs):
    run_dir = lora_runs["full"]
    predictions = pd.read_csv(run_dir / "validation_predictions.csv")
    proc = subprocess.run([sys.executable, "-c", PIPELINE_WITHOUT_PEFT, str(run_dir / "model")],
                          input=json.dumps(list(predictions["text"])), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == list(predictions["prediction"])


@pytest.mark.slow
def test_lora_resume_after_a_mid_epoch_checkpoint_is_bitwise(tmp_path, lora_runs):
    """The run as an interruption after update 3 leaves it (checkpoints up to step-3, no outputs), then
    resume=auto: the same updates, bit for bit."""
    full, run_dir = lora_runs["full"], tmp_path / "run"
    shutil.copytree(full, run_dir)
    for path in run_dir.iterdir():
        if path.name.startswith(("model", "metrics", "validation_predictions", "confusion")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for step in (run_dir / "checkpoints").glob("step-*"):
        if int(step.name.split("-")[1]) > 3:
            shutil.rmtree(step)
    launch(run_dir, *EFF16, *LORA, *CKPT, "resume=auto")
    a, b = read_metrics(run_dir), read_metrics(full)
    assert a["resumed_from"].endswith("step-3") and a["optimizer_steps"] == b["optimizer_steps"] == 8
    assert max_abs_diff(load_params(run_dir), load_params(full)) == 0.0
    assert a["train_losses"] == b["train_losses"] and a["lr_after_update"] == b["lr_after_update"]
    from safetensors.torch import load_file

    adapter = lambda d: load_file(str(d / "model" / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    assert max_abs_diff(adapter(run_dir), adapter(full)) == 0.0


@pytest.mark.slow
def test_lora_best_model_is_reloaded_from_the_adapter(tmp_path):
    """save_best: model/ holds the best evaluation's merged model; the final scores are that model's
    (load_saved_model puts model/adapter/ back into the trained PeftModel)."""
    run_dir = tmp_path / "run"
    launch(run_dir, *RAGGED, *LORA, "trainer.micro_batch_size=12", "trainer.eval_every=1",
           "trainer.save_best=true", "optim.lr=3e-2")
    m = read_metrics(run_dir)
    assert m["model"] == "best" and m["eval"]["f1"] == m["best"]["f1"]
    best = [h for h in m["history"] if h["update"] == m["best"]["update"]][0]
    assert m["eval"]["accuracy"] == best["accuracy"]
    predictions = pd.read_csv(run_dir / "validation_predictions.csv")
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    labels = [out["label"] for out in classify(list(predictions["text"]), batch_size=64, truncation=True)]
    assert labels == list(predictions["prediction"])  # the reloaded adapter is the merged model/


def test_save_model_and_best_model_reload_round_trip_under_lora(tmp_path):
    """outputs.save_model writes the merged model and the adapter; outputs.load_saved_model puts the adapter back
    into the trained PeftModel (as finish does with save_best): weights and logits as saved."""
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from dist_gacc.outputs import load_saved_model, save_model

    model = models.apply_lora(_tiny_bert(), PeftConfig(name="lora", dropout=0.0))
    with torch.no_grad():  # as after training: B != 0 and a changed head
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    job = SimpleNamespace(accelerator=Accelerator(cpu=True), model=model,
                          rc=SimpleNamespace(output_dir=str(tmp_path)),
                          tokenizer=SimpleNamespace(save_pretrained=lambda d: None))
    save_model(job)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 50, (4, 7))
    model.eval()
    expected = model(input_ids=ids).logits
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "model")).eval()
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-6)  # model/ is the merged model
    with torch.no_grad():  # training goes on past the best evaluation
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    load_saved_model(job)
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # model.tmp swapped in


# --- bad input -------------------------------------------------------------------------------------

def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))


def test_lora_without_peft_installed_says_pip_install_peft(monkeypatch):
    def missing():
        raise ImportError("No module named 'peft'")

    monkeypatch.setattr(models, "_import_peft", missing)
    with pytest.raises(ConfigError, match="peft.name=lora needs the peft package.*pip install peft"):
        models.require_peft()
    with pytest.raises(ConfigError, match="pip install peft"):
        models.apply_memory_levers(_tiny_bert(), ModelConfig(from_scratch={"vocab_size": 1, "hidden_size": 1,
                                   "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 1}),
                                   PeftConfig(name="lora"))


def test_target_modules_that_match_nothing_are_named_with_the_existing_ones():
    with pytest.raises(ConfigError) as err:
        models.apply_lora(_tiny_bert(), PeftConfig(name="lora", target_modules=["q_proj", "v_proj"]))
    text = str(err.value)
    assert "peft.target_modules=['q_proj', 'v_proj'] matches no module of BertForSequenceClassification" in text
    assert "query" in text and "value" in text


def _lora_layers(peft_model) -> set[str]:
    """The last names of the modules that hold LoRA adapters."""
    return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_" in n}


def test_an_architecture_neither_peft_nor_dist_gacc_knows_asks_for_target_modules_naming_candidates():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    model = MPNetForSequenceClassification(MPNetConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=2))
    with pytest.raises(ConfigError) as err:
        models.apply_lora(model, PeftConfig(name="lora"))
    assert str(err.value) == (
        "peft=lora: neither peft nor dist-gacc has default LoRA target modules for model_type 'mpnet' "
        "(MPNetForSequenceClassification); set peft.target_modules, e.g. peft.target_modules=[dense,k] "
        "(linear modules here: dense, k, o, out_proj, q, v)")
    adapted = models.apply_lora(model, PeftConfig(name="lora", target_modules=["q", "v"]))  # the way out works
    assert _lora_layers(adapted) == {"q", "v"}


def test_a_default_that_matches_no_module_names_peft_target_modules_and_where_it_came_from():
    model = _tiny_bert()
    model.config.model_type = "gpt2"  # peft's gpt2 default, c_attn, does not exist in a BERT
    with pytest.raises(ConfigError) as err:
        models.apply_lora(model, PeftConfig(name="lora"))
    assert str(err.value) == (
        "peft.target_modules=null: peft's default LoRA targets for model_type 'gpt2', ['c_attn'], match no module "
        "of BertForSequenceClassification; set peft.target_modules to some of its linear modules: classifier, "
        "dense, key, query, value")


# Tiny configs of the model types LORA_OWN_TARGETS names (transformers' sizes otherwise: large, or experts).
_TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
_OWN_TYPE_SIZES = {
    "distilbert": dict(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32),
    "qwen2_moe": dict(_TINY, num_key_value_heads=2, num_experts=2, moe_intermediate_size=8,
                      shared_expert_intermediate_size=8),
    "roc_bert": dict(_TINY, pronunciation_vocab_size=8, shape_vocab_size=8, pronunciation_embed_dim=8,
                     shape_embed_dim=8),
    "xmod": dict(_TINY, languages=["en_XX"], default_language="en_XX"),
    "phi3": dict(_TINY, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def test_peft_mapping_comes_first_and_dist_gacc_only_fills_its_gaps():
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets
    from transformers import AutoConfig, AutoModelForSequenceClassification

    assert models.default_lora_targets("bert") == (["query", "value"], "peft's default")
    assert models.default_lora_targets("phi") == (peft_targets["phi"], "peft's default")  # q, v, fc1, fc2
    assert models.default_lora_targets("mpnet") is None
    assert not set(models.LORA_OWN_TARGETS) & set(peft_targets)
    assert len(models.LORA_OWN_TARGETS) == 9
    for model_type, targets in models.LORA_OWN_TARGETS.items():  # each one adapts its architecture's modules
        assert models.default_lora_targets(model_type) == (targets, "dist-gacc's default")
        config = AutoConfig.for_model(model_type, **_OWN_TYPE_SIZES.get(model_type, _TINY), num_labels=2)
        model = AutoModelForSequenceClassification.from_config(config)
        assert _lora_layers(models.apply_lora(model, PeftConfig(name="lora"))) == set(targets), model_type


def test_a_regular_expression_default_is_matched_against_whole_names():
    assert models.is_lora_target("model.language_model.layers.0.self_attn.q_proj",
                                 r".*language_model\..*\.(q_proj|v_proj)")
    assert not models.is_lora_target("model.vision_tower.layers.0.self_attn.q_proj",
                                     r".*language_model\..*\.(q_proj|v_proj)")
    assert models.is_lora_target("encoder.layer.0.attention.self.query", ["query"])
    assert not models.is_lora_target("encoder.layer.0.attention.self.query_norm", ["query"])


def test_default_targets_and_a_trainable_head():
    model = models.apply_lora(_tiny_bert(), PeftConfig(name="lora", dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("classifier.modules_to_save.default.weight") for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_" in n} == {"query", "value"}
    trainable_count, total = models.parameter_counts(model)
    assert trainable_count == sum(model.state_dict()[n].numel() for n in trainable) and trainable_count < total


def test_gradient_checkpointing_on_a_model_without_support_is_refused():
    from transformers import PretrainedConfig, PreTrainedModel

    class NoCheckpointing(PreTrainedModel):
        config_class = PretrainedConfig
        supports_gradient_checkpointing = False

        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="model.gradient_checkpointing=true: NoCheckpointing does not support"):
        models.enable_gradient_checkpointing(NoCheckpointing(PretrainedConfig()))
    models.enable_gradient_checkpointing(bert := _tiny_bert())  # BERT does
    assert any(getattr(m, "gradient_checkpointing", False) for m in bert.modules())


@pytest.mark.parametrize("override, message", [
    ("peft.r=0", "peft.r must be an integer >= 1, got 0"),
    ("peft.dropout=1.0", "peft.dropout must be a number >= 0.0 and < 1.0, got 1.0"),
    ("peft.alpha=0", "peft.alpha must be a number > 0.0, got 0"),
    ("peft.target_modules=[]", "peft.target_modules must be a non-empty list of module names or null"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing must be true or false, got 'maybe'"),
])
def test_bad_lever_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(compose_cfg("peft=lora", override, "output_dir=/tmp/x"))
    assert message in str(err.value)


def test_peft_group_composes_and_is_optional():
    rc = load_config(compose_cfg("output_dir=/tmp/x"))
    assert rc.peft.name == "none" and rc.model.gradient_checkpointing is False
    rc = load_config(compose_cfg("peft=lora", "peft.r=4", "peft.target_modules=[query,key]", "output_dir=/tmp/x"))
    assert (rc.peft.name, rc.peft.r, rc.peft.alpha, rc.peft.target_modules) == ("lora", 4, 16.0, ["query", "key"])
    from omegaconf import open_dict

    cfg = compose_cfg("output_dir=/tmp/x")
    with open_dict(cfg):
        del cfg["peft"]  # a config composed before the peft group existed
    assert load_config(cfg).peft == PeftConfig()


@pytest.mark.slow
def test_cli_refuses_unmatched_target_modules_before_training(tmp_run):
    proc = launch(tmp_run, *TINY, *LORA, "peft.target_modules=[nope]", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: peft.target_modules=['nope'] matches no module" in proc.stderr
    assert "updates:" not in proc.stderr and not (tmp_run / "metrics.json").exists()


@pytest.mark.slow
def test_verify_equivalence_passes_with_lora_and_checkpointing_on_two_ranks(tmp_run):
    """scripts/verify_equivalence.py's reference is a deep copy of the PeftModel: it trains the adapters and
    the head only, as the run does (float64)."""
    proc = launch(tmp_run, *RAGGED, *LORA, *GC, "trainer.epochs=1", "trainer.micro_batch_size=4",
                  "trainer.grad_accum_steps=3", "verify.updates=2", processes=2,
                  script=ROOT / "scripts" / "verify_equivalence.py")
    assert "windows of 24, 13 examples" in proc.stdout and "base_model.model.bert.encoder.layer.0" in proc.stdout
    assert proc.stdout.strip().endswith("PASS")
