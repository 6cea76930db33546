"""scripts/predict.py on a saved tiny model: single texts and sentence pairs (TAB lines, table files)."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT

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
    proc = subprocess.run([sys.executable, str(PREDICT), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
