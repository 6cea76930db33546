"""Classify texts (or sentence pairs) with a trained run's model, printing label and score for each.

    python scripts/predict.py model=outputs/2026-11-25/10-00-00/model "a moving film" "dull"
    python scripts/predict.py model=<run>/model "$(printf 'first text\tsecond text')"   # a pair
    cat reviews.txt | python scripts/predict.py model=<run>/model
    python scripts/predict.py model=<run>/model file=reviews.txt batch_size=64
    python scripts/predict.py model=<run>/model file=pairs.tsv text_column=a text_pair_column=b

An input with a TAB is a pair: (text, text_pair), split at the first TAB, for models trained with
data.text_pair_column or data=review_pairs. `file=` is a plain text file (one input per line,
TAB-separated pairs) or a table read by column as training reads data=csv files (.csv, .tsv,
.json, .jsonl, .parquet; the text formats may be .gz/.bz2/.xz/.zst-compressed; a .tsv quoted or
GLUE-style, tsv_quoting=auto|none|csv as data.tsv_quoting): text_column (default text) and
text_pair_column (default text_pair; used if the file has it, required if named explicitly).

One line of output per input: label<TAB>score<TAB>text, or label<TAB>score<TAB>text<TAB>text_pair
for a pair. A multi-label model (problem_type multi_label_classification in its config) prints the set
of labels whose sigmoid score is >= threshold, comma-separated (empty if none), then every label's score:
labels<TAB>name=score,...<TAB>text. The threshold: `threshold=` if given, else each label's tuned threshold
from the model folder's thresholds.json (trainer.multi_label_threshold=tune), else 0.5. A regression model
(problem_type regression) prints its output's name and the predicted value, unsquashed
(function_to_apply="none"): name<TAB>value<TAB>text. The model folder is a transformers `save_pretrained`
folder, so the same works in Python
with `transformers.pipeline("text-classification", model="<run>/model")`, pairs passed as
{"text": a, "text_pair": b}. Texts are truncated (longest first, for pairs) at the tokenizer's
model_max_length, which a run saves as its data.max_length: where training cut them. Batches are packed
(dist_gacc.packing: the texts end to end, no pad token computed) where the model's architecture allows and a
probe shows the same logits as padded batches; stderr says which.
"""

import sys

from dist_gacc.packing import packed_pipeline

USAGE = ("usage: predict.py model=<run>/model [file=F] [text_column=C] [text_pair_column=C] "
         "[tsv_quoting=auto|none|csv] [batch_size=N] [device=cpu|cuda] [threshold=0.5 (default: tuned, else 0.5)] "
         "[TEXT | TEXT<TAB>TEXT_PAIR ...]")


def parse(argv):
    options = {"model": None, "file": None, "batch_size": "32", "device": None, "text_column": None,
               "text_pair_column": None, "threshold": None, "tsv_quoting": "auto"}
    texts = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in options:
            options[key] = value
        else:
            texts.append(arg)
    if not options["model"]:
        sys.exit(USAGE)
    return options, texts


def as_input(line: str):
    """A line with a TAB is a pair (split at the first TAB), else one text."""
    text, tab, text_pair = line.partition("\t")
    return {"text": text, "text_pair": text_pair} if tab else line


def read_table(path: str, text_column: str | None, pair_column: str | None,
               tsv_quoting: str = "auto") -> list:
    """Inputs from a table file, by column; the pair column is optional unless named. Read by the trainer's
    reader (dist_gacc.data.read_table): the same formats, compression and .tsv dialects, texts kept
    as written (a cell "NA" or "123" is that text)."""
    from dist_gacc.data import read_table as read
    from dist_gacc.errors import UserError

    column = text_column or "text"
    try:
        table = read(path, tsv_quoting, string_columns=(column, pair_column or "text_pair"), raw_strings=True,
                     key="tsv_quoting")
    except UserError as err:  # a bad file or tsv_quoting=
        sys.exit(str(err))
    if column not in table.column_names:
        sys.exit(f"{path}: no column {column!r} (columns: {table.column_names}); set text_column=")
    if pair_column and pair_column not in table.column_names:
        sys.exit(f"{path}: no column {pair_column!r} (columns: {table.column_names}); set text_pair_column=")
    pair_column = pair_column or ("text_pair" if "text_pair" in table.column_names else None)
    columns = [table[column]] + ([table[pair_column]] if pair_column else [])
    inputs = []
    for row, values in enumerate(zip(*columns)):
        if not all(isinstance(value, str) and value.strip() for value in values):
            sys.exit(f"{path}: row {row}: empty or not text: {list(values)!r}")
        inputs.append({"text": values[0], "text_pair": values[1]} if pair_column else values[0])
    return inputs


def read_inputs(options, texts) -> list:
    from dist_gacc.config import table_suffix

    inputs = [as_input(text) for text in texts]
    path = options["file"]
    if path and table_suffix(path)[0] is not None:
        inputs += read_table(path, options["text_column"], options["text_pair_column"],
                             options["tsv_quoting"])
    elif path:
        with open(path, encoding="utf-8") as f:
            inputs += [as_input(line.rstrip("\n")) for line in f if line.strip()]
    elif not texts:
        inputs = [as_input(line.rstrip("\n")) for line in sys.stdin if line.strip()]
    return inputs


def shown(item) -> str:
    return f"{item['text']}\t{item['text_pair']}" if isinstance(item, dict) else item


def thresholds(model_dir: str, names: list[str], option: str | None) -> dict:
    """Each label's threshold: threshold= for all, else the run's tuned ones (model/thresholds.json), else 0.5."""
    import json
    import os

    if option is not None:
        return dict.fromkeys(names, float(option))
    path = os.path.join(model_dir, "thresholds.json")
    if not os.path.isfile(path):
        return dict.fromkeys(names, 0.5)
    with open(path, encoding="utf-8") as f:
        tuned = json.load(f)
    missing = [name for name in names if name not in tuned]
    if missing:
        sys.exit(f"{path}: no threshold for label(s) {missing}")
    return {name: float(tuned[name]) for name in names}


def main(argv):
    options, texts = parse(argv)
    inputs = read_inputs(options, texts)
    classify, how = packed_pipeline(options["model"], device=options["device"])
    print(f"predict.py: {how}", file=sys.stderr)
    problem_type = classify.model.config.problem_type
    multi_label = problem_type == "multi_label_classification"
    # Multi-label: every label's score (the pipeline applies a sigmoid per label, from problem_type); regression:
    # the raw output (older transformers applied a sigmoid to a one-output model unless told).
    extra = {"top_k": None} if multi_label else {"function_to_apply": "none"} if problem_type == "regression" else {}
    outputs = classify(inputs, batch_size=int(options["batch_size"]), truncation=True, **extra)
    cut = thresholds(options["model"], list(classify.model.config.id2label.values()), options["threshold"]) \
        if multi_label else None
    for item, out in zip(inputs, outputs):
        if multi_label:
            scores = {o["label"]: o["score"] for o in out}
            chosen = [name for name in classify.model.config.id2label.values() if scores[name] >= cut[name]]
            listed = ",".join(f"{name}={score:.4f}" for name, score in scores.items())
            print(f"{','.join(chosen)}\t{listed}\t{shown(item)}")
            continue
        out = out[0] if isinstance(out, list) else out  # a dict input comes back as a one-item list
        print(f"{out['label']}\t{out['score']:.4f}\t{shown(item)}")


if __name__ == "__main__":
    main(sys.argv[1:])
