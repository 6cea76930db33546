"""scripts/predict.py on a saved tiny model: single texts and sentence pairs (TAB lines, table files)."""


import pytest
import torch

from conftest import ROOT, run_script

PREDICT = ROOT / "scripts" / "predict.py"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from dist_gacc.config import ModelConfig
    from dist_gacc.models import build_model, build_tokenizer

    cfg = ModelConfig(name_or_path=None, dropout=0.0, from_scratch={
        "vocab_size": 200, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32})
    tokenizer = build_tokenizer(cfg, ["a fine film", "a dull film", "fine acting", "dull plot"] * 2, 64)
    torch.manual_seed(0)
    model = build_model(cfg, ["different", "same"], tokenizer)
    with torch.no_grad():  # large weights: a pair and the same words as one text get clearly different scores
        model.bert.embeddings.token_type_embeddings.weight.normal_(std=2.0)
        model.classifier.weight.normal_(std=2.0)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval(), tokenizer


def _predict(*args):
    proc = run_script(PREDICT, *args)  # the CLI, forked from the suite's fork server (conftest.run_script)
    return [line.split("\t") for line in proc.stdout.splitlines()]


def _expected(model, tokenizer, *texts):
    with torch.no_grad():
        probs = model(**tokenizer(*texts, return_tensors="pt")).logits.softmax(-1)[0]
    return model.config.id2label[int(probs.argmax())], float(probs.max())


def test_pairs_and_single_texts_from_arguments(saved_model):
    path, model, tok = saved_model
    lines = _predict(f"model={path}", "a fine film\tdull plot", "a fine film dull plot")
    assert [len(line) for line in lines] == [4, 3]  # label, score, text[, text_pair]
    (label, score, text, pair), single = lines
    assert (text, pair) == ("a fine film", "dull plot") and single[2] == "a fine film dull plot"
    want_label, want_score = _expected(model, tok, "a fine film", "dull plot")
    assert label == want_label and float(score) == pytest.approx(want_score, abs=1e-4)
    # The pair went in as two segments: scored unlike the same words as one text.
    assert float(single[1]) == pytest.approx(_expected(model, tok, "a fine film dull plot")[1], abs=1e-4)
    assert abs(float(single[1]) - float(score)) > 1e-3


def test_batches_are_packed_and_score_each_text_as_alone(saved_model):
    """20 texts of 1 to 20 words in batches of 8: each packed batch's rows end in padding and hold several texts,
    and each text's score is its own (the model on that text alone, padded nowhere)."""
    path, model, tok = saved_model
    words = ["a", "fine", "film", "dull", "plot", "acting"]
    texts = [" ".join(words[(i + k) % 6] for k in range(1 + i % 20)) for i in range(20)]
    proc = run_script(PREDICT, f"model={path}", "batch_size=8", *texts)
    assert "predict.py: packed batches (packed = padded logits within" in proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [line[2] for line in lines] == texts
    for (label, score, text) in lines:
        want_label, want_score = _expected(model, tok, text)
        assert label == want_label and float(score) == pytest.approx(want_score, abs=1e-4)


def test_pairs_from_files(saved_model, tmp_path):
    path, model, tok = saved_model
    table = tmp_path / "pairs.tsv"
    table.write_text("x\ty\na fine film\tdull plot\nfine acting\ta dull film\n", encoding="utf-8")
    lines = _predict(f"model={path}", f"file={table}", "text_column=x", "text_pair_column=y")
    assert [line[2:] for line in lines] == [["a fine film", "dull plot"], ["fine acting", "a dull film"]]
    assert float(lines[1][1]) == pytest.approx(_expected(model, tok, "fine acting", "a dull film")[1], abs=1e-4)
    plain = tmp_path / "pairs.txt"
    plain.write_text("a fine film\tdull plot\nfine acting\n", encoding="utf-8")
    assert [line[2:] for line in _predict(f"model={path}", f"file={plain}")] == [["a fine film", "dull plot"],
                                                                               ["fine acting"]]


def test_tsv_dialects_read_as_training_reads_them(saved_model, tmp_path):
    """A GLUE-style .tsv keeps every row (read with quotes, the lone " swallowed the next row silently);
    cells such as NA stay text."""
    path, model, tok = saved_model
    table = tmp_path / "glue.tsv"
    table.write_text('x\ty\n"a fine film\tdull plot\nfine" acting\ta dull film\nNA\tnull\n', encoding="utf-8")
    lines = _predict(f"model={path}", f"file={table}", "text_column=x", "text_pair_column=y")
    assert [line[2:] for line in lines] == [['"a fine film', "dull plot"], ['fine" acting', "a dull film"],
                                            ["NA", "null"]]
    want = _expected(model, tok, 'fine" acting', "a dull film")[1]
    assert float(lines[1][1]) == pytest.approx(want, abs=1e-4)


def test_quoted_compressed_and_ambiguous_tables(tmp_path):
    """read_inputs in process (its output lines would split at a text's newline): a pandas-quoted .tsv.gz
    with newlines, tabs and quotes in its texts; an ambiguous .tsv names tsv_quoting=; forced, it reads."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("predict", PREDICT)
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    texts = ["two\nlines", "a\ttab", 'said "hi"', "plain"]
    pd.DataFrame({"text": texts, "text_pair": ["p"] * 4}).to_csv(tmp_path / "q.tsv.gz", sep="\t", index=False)
    options, _ = predict.parse(["model=m", f"file={tmp_path / 'q.tsv.gz'}"])
    assert predict.read_inputs(options, []) == [{"text": text, "text_pair": "p"} for text in texts]
    ambiguous = tmp_path / "amb.tsv"
    ambiguous.write_text('text\n"A whole quotation"\nplain\n', encoding="utf-8")
    options, _ = predict.parse(["model=m", f"file={ambiguous}"])
    with pytest.raises(SystemExit, match=r"amb\.tsv: this \.tsv reads two ways.* Set tsv_quoting=csv .* or "
                       r"tsv_quoting=none"):
        predict.read_inputs(options, [])
    options["tsv_quoting"] = "none"
    assert predict.read_inputs(options, []) == ['"A whole quotation"', "plain"]


def test_saved_tokenizer_truncates_like_training(tmp_path):
    """model/'s tokenizer carries data.max_length as model_max_length: the pipeline and predict.py (truncation=True)
    cut a long text where training did (32 tokens here), not at the pretrained tokenizer's 512."""
    import json
    from types import SimpleNamespace

    from accelerate import Accelerator
    from transformers import BertConfig, BertForSequenceClassification, pipeline

    from dist_gacc.config import ModelConfig
    from dist_gacc.data import rotten_tomatoes_pool
    from dist_gacc.models import build_tokenizer
    from dist_gacc.outputs import save_model

    texts = rotten_tomatoes_pool()[0][:200]
    sizes = {"vocab_size": 300, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}
    pretrained = tmp_path / "pretrained"  # a "pretrained" folder whose tokenizer says 512
    build_tokenizer(ModelConfig(name_or_path=None, from_scratch=sizes), texts, 512).save_pretrained(pretrained)
    tokenizer = build_tokenizer(ModelConfig(name_or_path=str(pretrained)), [], 32)  # data.max_length=32
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**sizes, "vocab_size": len(tokenizer)}, num_labels=2,
                                                     id2label={0: "rotten", 1: "fresh"},
                                                     label2id={"rotten": 0, "fresh": 1})).eval()
    with torch.no_grad():  # large weights: the tokens past 32 move the score visibly (0.28 vs 0.38)
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(std=0.5)
    job = SimpleNamespace(accelerator=Accelerator(cpu=True), model=model, rc=SimpleNamespace(output_dir=str(tmp_path)),
                          tokenizer=tokenizer)
    save_model(job)
    saved = tmp_path / "model"
    assert json.loads((saved / "tokenizer_config.json").read_text())["model_max_length"] == 32
    long_text = " ".join(texts[:6])
    assert len(tokenizer(long_text)["input_ids"]) > 60  # well past 32 tokens

    def fresh_score(**truncation):
        with torch.no_grad():
            logits = model(**tokenizer(long_text, return_tensors="pt", **truncation)).logits
        return logits.softmax(-1)[0, 1].item()

    trained_like = fresh_score(truncation="longest_first", max_length=32)  # as data.tokenize cut it
    assert abs(trained_like - fresh_score()) > 0.05  # the cut matters for this text
    classify = pipeline("text-classification", model=str(saved), device="cpu", top_k=None)
    scores = {out["label"]: out["score"] for out in classify([long_text], truncation=True)[0]}
    assert scores["fresh"] == pytest.approx(trained_like, abs=1e-5)
    (_, score, _), = _predict(f"model={saved}", long_text)
    assert float(score) == pytest.approx(max(trained_like, 1 - trained_like), abs=1e-4)
