"""Classify texts with a trained run's model, printing label and score for each.

    python scripts/predict.py model=outputs/2026-11-25/10-00-00/model "a moving film" "dull"
    cat reviews.txt | python scripts/predict.py model=<run>/model
    python scripts/predict.py model=<run>/model file=reviews.txt batch_size=64

One line of output per input: label<TAB>score<TAB>text. The model folder is a transformers
`save_pretrained` folder, so the same works in Python with
`transformers.pipeline("text-classification", model="<run>/model")`.
"""

import sys

from transformers import pipeline


def parse(argv):
    options, texts = {"model": None, "file": None, "batch_size": "32", "device": None}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in options:
            options[key] = value
        else:
            texts.append(arg)
    if not options["model"]:
        sys.exit("usage: predict.py model=<run>/model [file=F] [batch_size=N] [device=cpu|cuda] [TEXT ...]")
    return options, texts


def main(argv):
    options, texts = parse(argv)
    if options["file"]:
        with open(options["file"], encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    elif not texts:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    classify = pipeline("text-classification", model=options["model"], device=options["device"])
    for text, out in zip(texts, classify(texts, batch_size=int(options["batch_size"]), truncation=True)):
        print(f"{out['label']}\t{out['score']:.4f}\t{text}")


if __name__ == "__main__":
    main(sys.argv[1:])
