"""Decoder classifiers (issue 23): Llama-style models classify from their last real token, a tokenizer without a
pad token pads with eos (saved in model/), LoRA has per-architecture defaults and trains the `score` head, and the
accumulation stays exact on 1 process and 2 gloo ranks. The tiny decoder is model=tiny_decoder (a Llama from
scratch); a "pretrained" one is a LlamaForCausalLM folder without a pad token, as decoders ship."""

import json
import logging
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from conftest import EFF16, ROOT, TINY, compose_cfg, launch, load_params, max_abs_diff, read_metrics
from dist_gacc import data, models
from dist_gacc.config import ModelConfig, PeftConfig, load_config
from dist_gacc.errors import ConfigError

# conftest's tiny runs with the decoder in place of the BERT (the size overrides apply to both).
assert TINY[0] == EFF16[0] == "model=tiny"
DEC = ["model=tiny_decoder", *TINY[1:]]
DEC16 = ["model=tiny_decoder", *EFF16[1:]]  # 64 examples, effective 16 (micro 4), 2 epochs: 8 updates
LORA = ["peft=lora", "peft.dropout=0.0"]
GC = ["model.gradient_checkpointing=true"]
TEXTS = ["a quiet, moving film", "dull", "the best thing this year, and the funniest too", "not good at all"]


def _rc(*overrides):
    return load_config(compose_cfg(*DEC, "output_dir=/tmp/unused", *overrides))


@pytest.fixture(scope="module")
def train_texts():
    rc = _rc()
    return data.train_texts(data.load_splits(rc.data, rc.seed)["train"])


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory, train_texts):
    """A decoder as the Hub ships them: a LlamaForCausalLM (no score head) whose tokenizer and config have no
    pad token."""
    folder = tmp_path_factory.mktemp("llama-causal")
    tokenizer = models.decoder_tokenizer(models.build_vocab(train_texts, 400, models.DECODER_SPECIAL_TOKENS), 64)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                         pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer.pad_token is None and json.loads((folder / "config.json").read_text()).get("pad_token_id") is None
    return folder


# --- pad token, pooling ----------------------------------------------------------------------------------------

def test_tiny_decoder_pads_with_eos_and_its_config_says_so(train_texts):
    rc = _rc()
    tokenizer = models.build_tokenizer(rc.model, train_texts, rc.data.max_length)
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("</s>", "</s>", "<s>")
    encoded = tokenizer("dull", "fine")
    assert set(encoded) == {"input_ids", "attention_mask"}  # Llama's forward takes no token_type_ids
    first = tokenizer("dull")["input_ids"]
    assert first[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in first  # Llama's framing: <s> text
    assert encoded["input_ids"][:len(first) + 1] == [*first, tokenizer.eos_token_id]  # a pair: <s> a </s> b
    model = models.build_model(rc.model, ["rotten", "fresh"], tokenizer)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)


def test_left_and_right_padding_give_the_same_logits_as_each_text_alone(train_texts):
    """The score head reads the rightmost non-pad token: padding on either side, the logits of each row are those
    of the row run alone (no padding), in float64 to rounding. (A decoder with absolute positions, GPT-2, would
    shift under left padding: the run pads on the tokenizer's side, right unless its folder says otherwise.)"""
    rc = _rc()
    tokenizer = models.build_tokenizer(rc.model, train_texts, rc.data.max_length)
    torch.manual_seed(0)
    model = models.build_model(rc.model, ["rotten", "fresh"], tokenizer).double().eval()
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
        padded = {}
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
            assert (batch["input_ids"] == 2).any()  # eos pads the shorter rows
            padded[side] = model(**batch).logits
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the rows differ: equal logits mean something
    assert (padded["right"] - alone).abs().max() <= 1e-12
    # Left padding moves the real tokens to later positions: rotary attention depends on relative positions only,
    # but transformers computes the rotary cos/sin in float32, so the shifted rows round differently (4e-9 here).
    assert (padded["left"] - alone).abs().max() <= 1e-7


def test_a_causal_lm_folder_without_pad_token_becomes_a_classifier_that_pads_with_eos(causal_folder, caplog):
    cfg = ModelConfig(name_or_path=str(causal_folder), dropout=0.0)
    with caplog.at_level(logging.INFO, logger="dist_gacc.models"):
        tokenizer = models.build_tokenizer(cfg, [], 64)
    assert f"tokenizer of {causal_folder} has no pad token: padding with its eos token '</s>' (id 2" in caplog.text
    model = models.build_model(cfg, ["a", "b", "c"], tokenizer)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert (model.config.pad_token_id, model.config.num_labels, model.config.id2label) == (2, 3, {0: "a", 1: "b", 2: "c"})
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (4, 3)  # without a pad id transformers refuses batches of more than one


def test_a_tokenizer_without_pad_or_eos_is_refused_naming_the_model(causal_folder):
    tokenizer = models.decoder_tokenizer(["<unk>", "<s>", "</s>", "a"], 16)
    tokenizer.eos_token = None
    with pytest.raises(ConfigError, match="model.name_or_path='some/decoder': its tokenizer has neither a pad nor"):
        models.ensure_pad_token(tokenizer, "some/decoder")


def test_from_scratch_architecture_and_heads_are_checked():
    with pytest.raises(ConfigError, match="model.from_scratch.architecture must be bert .* or llama .*, got 'gpt'"):
        _rc("model.from_scratch.architecture=gpt")
    with pytest.raises(ConfigError, match="num_key_value_heads=3 must divide num_attention_heads=2"):
        _rc("model.from_scratch.num_key_value_heads=3")


# --- LoRA ------------------------------------------------------------------------------------------------------

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, head_dim=16, pad_token_id=0, num_labels=2)


@pytest.mark.parametrize("model_type, targets", [
    ("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"]), ("mistral", ["q_proj", "v_proj"]),
    ("gemma", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
    ("phi3", ["qkv_proj"]),  # peft has no phi3 entry; Phi-3 fuses q, k, v into qkv_proj (no q_proj/v_proj)
])
def test_lora_defaults_per_decoder_architecture_train_the_adapters_and_the_score_head(model_type, targets, recwarn):
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2, pad_token_id=0, num_labels=2)
    elif model_type == "phi3":  # its default bos/eos ids (1, 32000) lie outside the tiny vocabulary
        config = AutoConfig.for_model("phi3", **SMALL, bos_token_id=1, eos_token_id=2)
    else:
        config = AutoConfig.for_model(model_type, **SMALL)
    model = models.apply_lora(AutoModelForSequenceClassification.from_config(config), PeftConfig(name="lora"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert models.lora_targets(model.get_base_model(), PeftConfig(name="lora")) == targets
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable if ".lora_" in name} == set(targets)
    assert [name for name in trainable if "lora_" not in name] == ["base_model.model.score.modules_to_save.default.weight"]
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]  # gpt2: set for its Conv1D, no warning
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    model(**batch).logits.sum().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if name in trainable)


# --- runs: 2 ranks = 1 process, verify_equivalence, the merged model through a pipeline ------------------------

@pytest.fixture(scope="module")
def decoder_runs(tmp_path_factory, causal_folder):
    folder = [f"model.name_or_path={causal_folder}"]
    specs = {
        "plain1": (DEC16, 1), "plain2": (DEC16, 2),
        # LoRA on the causal-LM folder: a new score head, eos as pad; gradient checkpointing on the 2 ranks.
        "lora1": ([*DEC16, *folder, *LORA], 1), "lora2": ([*DEC16, *folder, *LORA, *GC], 2),
    }
    runs = {}
    for name, (overrides, processes) in specs.items():
        runs[name] = tmp_path_factory.mktemp(f"dec-{name}") / "run"
        launch(runs[name], *overrides, processes=processes)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_decoder_two_ranks_equal_one_process(decoder_runs, kind):
    one, two = read_metrics(decoder_runs[f"{kind}1"]), read_metrics(decoder_runs[f"{kind}2"])
    assert (one["world_size"], one["grad_accum_steps"], two["world_size"], two["grad_accum_steps"]) == (1, 4, 2, 2)
    assert one["optimizer_steps"] == two["optimizer_steps"] == 8
    assert max_abs_diff(load_params(decoder_runs[f"{kind}1"]), load_params(decoder_runs[f"{kind}2"])) <= 1e-5
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-6)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    if kind == "lora":
        assert two["trainable_parameters"] < two["total_parameters"] and two["gradient_checkpointing"] is True
        log = (decoder_runs["lora2"] / "train.log").read_text()
        assert "LoRA r=8 alpha=16 dropout=0 on ['q_proj', 'v_proj']" in log
        assert "has no pad token: padding with its eos token '</s>' (id 2" in log


@pytest.mark.slow
def test_the_model_card_describes_the_decoder_that_was_trained(decoder_runs):
    card = (decoder_runs["plain1"] / "model" / "README.md").read_text()
    assert ("Fine-tuned with dist-gacc from scratch: a Llama-style decoder of 2 layers, hidden size 32, 2 attention "
            "heads" in card) and "BERT" not in card
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 " in (
        decoder_runs["plain2"] / "model" / "README.md").read_text()


# A fresh interpreter (nothing of this project imported) runs a pipeline over each model folder: {folder: texts}
# on stdin, {folder: labels} printed.
PIPELINE = """
import json, sys
from transformers import pipeline

labels = {}
for folder, texts in json.loads(sys.stdin.read()).items():
    classify = pipeline("text-classification", model=folder, device="cpu")
    labels[folder] = [out["label"] for out in classify(texts, batch_size=16, truncation=True)]
print(json.dumps(labels))
"""
PIPELINE_RUNS = ["lora1", "plain1"]


@pytest.fixture(scope="module")
def pipeline_labels(decoder_runs):
    """{run: the labels a pipeline over its model/ gives its validation texts}, one process for both runs."""
    texts = {str(decoder_runs[run] / "model"):
             list(pd.read_csv(decoder_runs[run] / "validation_predictions.csv")["text"]) for run in PIPELINE_RUNS}
    proc = subprocess.run([sys.executable, "-c", PIPELINE], input=json.dumps(texts), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = json.loads(proc.stdout.strip().splitlines()[-1])
    return {run: labels[str(decoder_runs[run] / "model")] for run in PIPELINE_RUNS}


@pytest.mark.slow
@pytest.mark.parametrize("run", PIPELINE_RUNS)
def test_model_folder_reloads_in_a_pipeline_with_the_runs_validation_predictions(decoder_runs, pipeline_labels, run):
    """model/ (under LoRA the merged model) keeps the score head, the labels and pad_token_id: a pipeline over it
    (batches of 16, padded with eos) predicts what the run predicted on the validation split."""
    model_dir = decoder_runs[run] / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["architectures"], config["pad_token_id"], config["num_labels"] if "num_labels" in config else
            len(config["id2label"])) == (["LlamaForSequenceClassification"], 2, 2)
    assert config["id2label"] == {"0": "rotten", "1": "fresh"} and config["label2id"] == {"rotten": 0, "fresh": 1}
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["pad_token"] == "</s>"
    weights = load_params(decoder_runs[run])
    assert weights["score.weight"].shape == (2, 32) and not any("lora" in k or "base_model" in k for k in weights)
    predictions = pd.read_csv(decoder_runs[run] / "validation_predictions.csv")
    assert predictions["prediction"].nunique() == 2 or run == "plain1"  # the LoRA run learned both labels
    assert pipeline_labels[run] == list(predictions["prediction"])


RAGGED = [*DEC, "data.max_train_samples=37", "trainer.epochs=1", "trainer.micro_batch_size=4",
          "trainer.grad_accum_steps=3", "trainer.log_with=none", "verify.updates=2"]


@pytest.mark.slow
@pytest.mark.parametrize("levers", [[], [*LORA, *GC]], ids=["full", "lora-checkpointing"])
def test_verify_equivalence_passes_for_the_decoder_on_two_ranks(tmp_run, levers):
    """float64, windows of 24 and 13 examples over 2 ranks x micro 4 x N 3, against one batch per window."""
    proc = launch(tmp_run, *RAGGED, *levers, processes=2, script=ROOT / "scripts" / "verify_equivalence.py")
    assert "windows of 24, 13 examples" in proc.stdout and "packed micro-batches; float64" in proc.stdout
    assert ("base_model.model.model.layers.0" if levers else "\nscore ") in proc.stdout
    assert proc.stdout.strip().endswith("PASS")


def test_gpt2_position_table_limits_max_length_and_rotary_llama_has_none():
    gpt2 = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, pad_token_id=0))
    assert models.position_limit(gpt2) == 32
    with pytest.raises(ConfigError, match=r"data.max_length=64 is longer than the model's 32 positions"):
        models.check_max_length(gpt2, 64)
    llama = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("llama", **SMALL))
    assert models.position_limit(llama) is None  # rotary: no table to index past
