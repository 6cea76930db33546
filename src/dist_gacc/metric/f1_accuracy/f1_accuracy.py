"""F1, accuracy and a per-label report as an `evaluate` metric module, shipped with dist-gacc.

`evaluate.load("f1")` fetches its script from the Hugging Face Hub, which fails offline; this module
lives in the package and loads with `evaluate.load(<this folder>)` (`evaluate.load(<folder>, "multilabel")`
for multi-hot rows, as the Hub's f1 module names that configuration). Every number comes from
scikit-learn, as in the Hub's own f1/accuracy modules.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

_DESCRIPTION = ("F1 (binary, macro, micro or weighted), macro and micro F1, accuracy, and per-label precision, "
                "recall, F1 and support, of class-id predictions (or multi-hot rows: configuration 'multilabel').")
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int, or of 0/1 lists for 'multilabel'): predicted class ids / label sets.
    references (same form): true class ids / label sets.
    average (str): 'binary' (F1 of `pos_label`), 'macro', 'micro' or 'weighted'. Default 'binary'.
    pos_label (int): the positive class for average='binary'. Default 1.
    labels (list of int): the label ids the per-label report covers (default: those seen); the averages
        cover the labels present in predictions or references.
Returns:
    f1 (float, by `average`), f1_macro, f1_micro, accuracy (float; multi-label: exact set match),
    num_examples (int), per_label (dict label id -> precision, recall, f1, support)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1Accuracy(evaluate.Metric):
    def _info(self):
        value = datasets.Value("int64")
        column = datasets.Sequence(value) if self.config_name == "multilabel" else value
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": column, "references": column}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, average="binary", pos_label=1, labels=None):
        # Averages over the labels present (scikit-learn's default); the report covers `labels`.
        f1 = lambda avg: float(f1_score(references, predictions, average=avg, pos_label=pos_label,  # noqa: E731
                                        zero_division=0))
        precision, recall, per_f1, support = precision_recall_fscore_support(
            references, predictions, labels=labels, average=None, zero_division=0)
        ids = labels if labels is not None else sorted(
            set(range(len(support))) if self.config_name == "multilabel" else set(references) | set(predictions))
        return {
            "f1": f1(average),
            "f1_macro": f1("macro"),
            "f1_micro": f1("micro"),
            "accuracy": float(accuracy_score(references, predictions)),
            "num_examples": len(predictions),
            "per_label": {int(i): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for i, p, r, f, s in zip(ids, precision, recall, per_f1, support)},
        }
