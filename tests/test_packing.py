"""trainer.packing: padding-free micro-batches are the same math as padded ones.

Layout of a packed batch (by hand), packed = padded logits per architecture (eval mode), the build-time check
that turns packing off (auto) or refuses (true), evaluation's out-of-memory slices of a packed batch, and whole
training runs packed vs padded: parameters to 1e-5 in fp32 on ragged windows, on 1 and 2 ranks, for every task
shape. (verify_equivalence with packing on: tests/test_tasks_runs.py and the README's 2-rank command run packed
by default, against the padded one-batch reference.)"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import TINY, launch, load_params, max_abs_diff, read_metrics
from transformers import AutoConfig, AutoModelForSequenceClassification, DataCollatorWithPadding

from test_tasks_runs import _multi_label, multi_label_files  # noqa: F401  (a module fixture, used below)

from dist_gacc import models, packing
from dist_gacc.errors import ConfigError

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128, num_labels=3, pad_token_id=0)


class _Tokenizer:
    """What the collators read of a tokenizer: its pad id (and `pad`, for transformers' padded collator)."""
    pad_token_id = 0
    padding_side = "right"
    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def pad(self, features, **kwargs):
        from transformers import BertTokenizerFast
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        tok = BertTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")),
                                pad_token="[PAD]", unk_token="[UNK]")
        return tok.pad(features, **kwargs)


def _features(lengths, pairs=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(2, SMALL["vocab_size"], (n,), generator=g).tolist()
        f = {"input_ids": ids, "attention_mask": [1] * n, "labels": i % 3}
        if pairs:
            f["token_type_ids"] = [0] * (n // 2) + [1] * (n - n // 2)
        out.append(f)
    return out


def test_a_packed_batch_holds_each_text_once_with_its_own_positions_and_pool_token():
    features = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": 1},
                {"input_ids": [8, 9], "token_type_ids": [0, 1], "labels": 0},
                {"input_ids": [4, 3, 2, 0], "token_type_ids": [0, 0, 0, 0], "labels": 2}]  # ends in pad id 0
    first = packing.PackedCollator(5, "first", pad_token_id=0, position_offset=0, position_limit=64)(features)
    # first-fit decreasing: the 4-token text opens row 0, the 3-token one row 1, the 2-token one joins it
    assert first["input_ids"].tolist() == [[4, 3, 2, 0, 0], [5, 6, 7, 8, 9]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]  # trailing pad restarts
    assert first["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 0, 1]]
    assert first["pool_index"].tolist() == [5, 8, 0]  # each text's first token, in the batch's order
    assert first["text_spans"].tolist() == [[5, 3], [8, 2], [0, 4]]
    assert first["labels"].tolist() == [1, 0, 2]
    # Decoders read the last token that is not pad (transformers' rule); RoBERTa-style positions start at 2.
    last = packing.PackedCollator(5, "last", pad_token_id=0, position_offset=2, position_limit=64)(features)
    assert last["pool_index"].tolist() == [7, 9, 2]
    assert last["position_ids"].tolist() == [[2, 3, 4, 5, 2], [2, 3, 4, 2, 3]]
    # rows hold max(max_tokens, the longest text) tokens
    assert packing.pack_rows([3, 9, 2, 2, 1], 4) == [[1], [0, 2, 3, 4]]
    assert packing.pack_rows([3, 3, 2, 2, 1], 4) == [[0, 4], [1], [2, 3]]
    assert [f["input_ids"] for f in packing.unpack(first)] == [f["input_ids"] for f in features]


ARCHITECTURES = {
    "bert": dict(model_type="bert", type_vocab_size=2),
    "roberta": dict(model_type="roberta", type_vocab_size=1, pad_token_id=1),
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128),  # learned positions
    "electra": dict(model_type="electra", embedding_size=32),
    "xlm-roberta": dict(model_type="xlm-roberta", type_vocab_size=1, pad_token_id=1),
}
FIRST_TOKEN = ("bert", "roberta", "electra", "xlm-roberta")


def _model(arch: str):
    torch.manual_seed(0)
    spec = dict(ARCHITECTURES[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **{**SMALL, **spec})
    config._attn_implementation = "sdpa"
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_logits_equal_padded_logits(arch):
    model = _model(arch)
    head = packing.head_of(model)
    assert head.pool == ("first" if arch in FIRST_TOKEN else "last")
    packing.enable(model, head)
    features = _features([7, 3, 12, 1, 5, 9, 2, 11], pairs=arch in ("bert", "electra"))
    pad_id = model.config.pad_token_id
    packed = packing.PackedCollator(16, head.pool, pad_id, models.position_offset(model), 120)
    padded = DataCollatorWithPadding(_Tokenizer())
    # rows of 16 tokens: 8 texts (50 tokens) in 4 rows, some ending in padding
    assert packed(features)["input_ids"].shape == (4, 16)
    assert packing.max_difference(model, padded, packed, features, batch_size=8) < 1e-6
    # without the per-text positions the texts would attend to each other: the check sees it
    broken = lambda fs: {k: v for k, v in packed(fs).items() if k != "position_ids"}  # noqa: E731
    assert packing.max_difference(model, padded, broken, features, batch_size=8) > 1e-3


def test_auto_turns_packing_off_with_the_reason_and_true_refuses():
    features = _features([4, 6, 3, 8])
    padded = DataCollatorWithPadding(_Tokenizer())
    # An architecture it does not know (DistilBERT: pre_classifier, ReLU, dropout, classifier): off (auto), or
    # refused (true).
    config = AutoConfig.for_model("distilbert", **{**SMALL, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64})
    distilbert = AutoModelForSequenceClassification.from_config(config)
    assert packing.head_of(distilbert) is None
    off = packing.choose("auto", 64, distilbert, distilbert, _Tokenizer(), padded, features)
    assert not off.on and off.reason.startswith("off: DistilBertForSequenceClassification is not an architecture")
    with pytest.raises(ConfigError, match=r"trainer.packing=true cannot be honoured: .*trainer.packing=auto"):
        packing.choose(True, 64, distilbert, distilbert, _Tokenizer(), padded, features)
    model = _model("bert")
    # A head whose packed logits differ (pooling the wrong token): the check turns it off and says by how much.
    wrong = packing.Head("encoder", "last", packing._bert_head)
    packing.enable(model, wrong)
    off = packing.choose("auto", 64, model, model, _Tokenizer(), padded, features)
    assert not off.on and "packed logits differ from padded ones by" in off.reason
    assert "forward" not in model.__dict__  # the class's own forward is back
    right = packing.head_of(model)
    packing.enable(model, right)
    on = packing.choose("auto", 64, model, model, _Tokenizer(), padded, features)
    assert on.on and on.collator.max_tokens == 64 and on.max_logit_difference < 1e-6
    assert packing.choose(False, 64, model, model, _Tokenizer(), padded, features).reason == \
        "off (trainer.packing=false)"


def test_evaluation_slices_a_packed_batch_by_texts_after_out_of_memory():
    from dist_gacc import oom

    model = _model("llama")
    head = packing.head_of(model)
    packing.enable(model, head)
    collate = packing.PackedCollator(16, head.pool, 0, 0, 120)
    batch = collate(_features([7, 3, 12, 1, 5, 9, 2, 11]))
    batch.pop("labels")
    with torch.no_grad():
        whole = model(**batch).logits
        forward = oom.EvalForward(oom.policy("ddp", "auto", False, False), 3, repack=collate)
        sliced = forward(model, batch)  # 3 texts per pass: 3 + 3 + 2, each slice packed again
    assert sliced.shape == (8, 3) and torch.allclose(sliced, whole, atol=1e-6)


# --- whole runs: packed vs padded training, dropout 0, the same order, ragged windows ------------------------
# 22 examples, micro-batch 3, N 2: windows of 6, 6, 6, 4 real examples (the last micro-batch holds one).
RAGGED = [*TINY, "data.max_train_samples=22", "data.max_eval_samples=20", "trainer.micro_batch_size=3",
          "trainer.grad_accum_steps=2", "trainer.epochs=1", "trainer.log_with=none", "trainer.baseline=false"]
DECODER = ["model=tiny_decoder", "model.dropout=0.0", "model.from_scratch.hidden_size=32",
           "model.from_scratch.intermediate_size=64"]
SHAPES = {
    "bert": [],
    "decoder": DECODER,
    "decoder_lora": [*DECODER, "peft=lora", "peft.dropout=0.0"],
    "pairs": ["data=review_pairs"],
    "regression": ["data=word_pleasantness"],
    "multi_label": None,  # pairs of texts with label sets (test_tasks_runs' files)
}


def _pair(tmp_path, name, extra, processes=1):
    runs = {}
    for mode in ("true", "false"):
        runs[mode] = tmp_path / f"{name}-{mode}"
        launch(runs[mode], *RAGGED, *extra, f"trainer.packing={mode}", processes=processes)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_training_equals_padded_training(tmp_path, shape, request):
    extra = SHAPES[shape] if shape != "multi_label" else _multi_label(request.getfixturevalue("multi_label_files"))
    runs = _pair(tmp_path, shape, extra)
    packed, padded = read_metrics(runs["true"]), read_metrics(runs["false"])
    assert packed["packing"]["on"] and not padded["packing"]["on"]
    assert packed["optimizer_steps"] == padded["optimizer_steps"] == 4
    assert max_abs_diff(load_params(runs["true"]), load_params(runs["false"])) <= 1e-5
    # evaluation and the test split's predictions run packed too: the same figures
    # (Pearson's r of a barely trained regressor's near-constant predictions magnifies 1e-7 differences)
    for split in ("eval", "test"):
        assert _figures(packed[split]) == pytest.approx(_figures(padded[split]), rel=1e-3, abs=1e-6)
    a, b = ([row["prediction"] for row in csv.DictReader((run / "validation_predictions.csv").open())]
            for run in runs.values())
    assert len(a) == 20 and (a == b if shape != "regression" else
                             [float(x) for x in a] == pytest.approx([float(x) for x in b], abs=1e-6))


def _figures(scores: dict | None) -> dict:
    return {k: v for k, v in (scores or {}).items() if isinstance(v, float)}


@pytest.mark.slow
def test_packed_training_equals_padded_training_on_two_ranks(tmp_path):
    """2 gloo ranks: Accelerate pads the last micro-batches with repeated examples, which pack like any other."""
    runs = _pair(tmp_path, "bert-2", [], processes=2)
    assert read_metrics(runs["true"])["packing"]["on"]
    assert max_abs_diff(load_params(runs["true"]), load_params(runs["false"])) <= 1e-5
