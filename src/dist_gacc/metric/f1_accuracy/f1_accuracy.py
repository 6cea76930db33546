"""F1 and accuracy as an `evaluate` metric module, shipped with dist-gacc.

`evaluate.load("f1")` fetches its script from the Hugging Face Hub, which fails offline; this module
lives in the package and loads with `evaluate.load(<this folder>)`. Both numbers come from scikit-learn,
as in the Hub's own f1/accuracy modules.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score

_DESCRIPTION = "F1 (binary, macro, micro or weighted) and accuracy of integer class predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    average (str): 'binary' (F1 of `pos_label`), 'macro', 'micro' or 'weighted'. Default 'binary'.
    pos_label (int): the positive class for average='binary'. Default 1.
Returns:
    f1 (float), accuracy (float), num_examples (int)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        return {
            "f1": float(f1_score(references, predictions, average=average, pos_label=pos_label, zero_division=0)),
            "accuracy": float(accuracy_score(references, predictions)),
            "num_examples": len(predictions),
        }
