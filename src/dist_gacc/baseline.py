"""What a run is worth: a TF-IDF + linear-model baseline fitted on exactly the run's training split and
scored on the same validation and test splits with the same metric code (trainer.baseline).

    run ─ ... ─ teardown.shutdown ─ baseline.fit_and_predict (main process only) ─ outputs.add_baseline

Fitted on the main process after the process group has ended, so no other rank waits in a collective
while it runs (a barrier would time out after trainer.dist_timeout_s on a large split).

The estimator is keyed on the task's problem_type, so a new kind plugs in with one entry in ESTIMATORS:
logistic regression for single-label, one-vs-rest logistic regression for multi-label, ridge for regression
(scored with the regression metric module: pearson, spearman, mse). The gap and the warning are on the run's
trainer.metric (mse: lower is better).
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MultiLabelBinarizer

from .config import LOWER_IS_BETTER

AUTO_MAX_TRAIN_ROWS = 200_000  # trainer.baseline=auto: on up to this many training rows (a fit takes < ~1 min)
PAIR_SEPARATOR = " [SEP] "     # a pair's two texts joined into one bag of words
# A text with fewer whitespace characters than this share is not written with spaces between words
# (Chinese, Japanese, Thai): word n-grams would be whole clauses, so character n-grams are used instead.
MIN_WHITESPACE_SHARE = 0.05


def wanted(setting, train_rows: int) -> bool:
    """trainer.baseline: true | false | auto (on when the training split has at most AUTO_MAX_TRAIN_ROWS rows)."""
    return train_rows <= AUTO_MAX_TRAIN_ROWS if setting == "auto" else bool(setting)


def texts(split) -> list[str]:
    """One string per row: the text, or a pair's two texts joined with PAIR_SEPARATOR."""
    if "text_pair" in split.column_names:
        return [f"{a}{PAIR_SEPARATOR}{b}" for a, b in zip(split["text"], split["text_pair"])]
    return list(split["text"])


def vectorizer_settings(train_texts: list[str]) -> dict:
    """TfidfVectorizer arguments for these texts: word unigrams+bigrams for text written with spaces,
    else character unigrams+bigrams (no word boundaries to split on; a Chinese word is 1-2 characters).
    sublinear_tf and min_df=1: scikit-learn's common text-classification recipe; every n-gram is kept."""
    chars = sum(len(t) for t in train_texts)
    spaces = sum(t.count(" ") + t.count("\t") + t.count("\n") for t in train_texts)
    if chars and spaces / chars < MIN_WHITESPACE_SHARE:
        return {"analyzer": "char", "ngram_range": (1, 2), "sublinear_tf": True}
    return {"analyzer": "word", "ngram_range": (1, 2), "sublinear_tf": True}


def estimator(problem_type: str, weighted: bool, seed: int):
    """The linear model for `problem_type`; `weighted`: the run uses class weights, so the baseline uses
    scikit-learn's balanced ones (per label, one-vs-rest, for multi-label)."""
    class_weight = "balanced" if weighted else None
    if problem_type == "regression":
        return Ridge(random_state=seed)
    logistic = LogisticRegression(max_iter=1000, class_weight=class_weight, random_state=seed)
    if problem_type == "multi_label_classification":
        return OneVsRestClassifier(logistic)
    return logistic


def fit_and_predict(splits, problem_type: str, num_labels: int, weighted: bool, seed: int,
                    threshold: float = 0.5) -> dict:
    """Fit on splits["train"], predict every other split. Returns {"predictions": {split: array},
    "references": {split: array}, "settings": {...}, "seconds": fit and predict time}. Multi-label labels are
    multi-hot rows, as metrics.predict gives them; predicted where the probability is >= `threshold`."""
    started = time.perf_counter()
    train_texts = texts(splits["train"])
    vectorizer = vectorizer_settings(train_texts)
    model = make_pipeline(TfidfVectorizer(**vectorizer), estimator(problem_type, weighted, seed))
    encode = MultiLabelBinarizer(classes=range(num_labels)).fit([]) if problem_type == "multi_label_classification" \
        else None
    labels = (lambda split: encode.transform(split["label"])) if encode else \
        (lambda split: np.asarray(split["label"]))
    model.fit(train_texts, labels(splits["train"]))
    predictions, references = {}, {}
    for name in splits:
        if name == "train":
            continue
        rows = texts(splits[name])
        predictions[name] = ((model.predict_proba(rows) >= threshold).astype(np.int64) if encode
                             else model.predict(rows))
        references[name] = labels(splits[name])
    settings = {
        "features": f"TF-IDF {vectorizer['analyzer']} n-grams {vectorizer['ngram_range'][0]}-"
                    f"{vectorizer['ngram_range'][1]} (sublinear tf)",
        "vectorizer": {**vectorizer, "ngram_range": list(vectorizer["ngram_range"])},
        "vocabulary": len(model[0].vocabulary_),
        "model": describe(model[-1]),
        "class_weight": "balanced" if weighted and problem_type != "regression" else None,
        "text_pair": f"text and text_pair joined with {PAIR_SEPARATOR.strip()!r}"
                     if "text_pair" in splits["train"].column_names else None,
        "train_rows": len(train_texts),
    }
    return {"predictions": predictions, "references": references, "settings": settings,
            "seconds": time.perf_counter() - started}


def describe(model) -> str:
    if isinstance(model, OneVsRestClassifier):
        return f"one-vs-rest {describe(model.estimator)}"
    params = model.get_params()
    shown = {k: params[k] for k in ("C", "alpha", "class_weight", "max_iter") if k in params}
    return f"{type(model).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def display(metric: str) -> str:
    """A metric's name in prose: F1, else its key (pearson, spearman, mse, accuracy)."""
    return "F1" if metric == "f1" else metric


def gaps(model_scores: dict, baseline_scores: dict, metric: str = "f1") -> dict:
    """Model minus baseline `metric` (the run's trainer.metric) for every split both have."""
    return {split: model_scores[split][metric] - baseline_scores[split][metric]
            for split in ("validation", "test") if model_scores.get(split) and baseline_scores.get(split)}


def beats(gap: float, metric: str = "f1") -> bool:
    """Whether a model-minus-baseline gap favours the model: above 0, or below 0 for a lower-is-better metric
    (mse). A tie, or NaN (a constant prediction's correlation), does not."""
    return gap < 0 if metric in LOWER_IS_BETTER else gap > 0


def not_beaten(model_scores: dict, baseline_scores: dict, metric: str = "f1") -> str | None:
    """The warning when the fine-tuned model does not beat the baseline on `metric` on some split."""
    name = display(metric)
    lost = [f"{split} {name} {model_scores[split][metric]:.4f} vs baseline {baseline_scores[split][metric]:.4f} "
            f"({gap:+.4f})" for split, gap in gaps(model_scores, baseline_scores, metric).items()
            if not beats(gap, metric)]
    if not lost:
        return None
    return ("the fine-tuned model does not beat the TF-IDF + linear baseline: " + "; ".join(lost) +
            (" (lower is better)" if metric in LOWER_IS_BETTER else "") +
            ". Fine-tuning has not paid on this data at these settings.")
