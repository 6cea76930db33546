"""Pearson and Spearman correlation and mean squared error as an `evaluate` metric module, shipped with
dist-gacc (regression tasks).

The Hub's `pearsonr`, `spearmanr` and `mse` modules are fetched from the Hugging Face Hub, which fails
offline; this module lives in the package and loads with `evaluate.load(<this folder>)`. The numbers come
from scipy (pearsonr, spearmanr) and scikit-learn (mean_squared_error), as in the Hub's modules. A
correlation of constant predictions is undefined: NaN (scipy warns).
"""

import warnings

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_squared_error

_DESCRIPTION = "Pearson r, Spearman rho and mean squared error of predicted values against true values."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values.
    references (list of float): true values.
Returns:
    pearson (float), spearman (float; NaN where either side is constant), mse (float), num_examples (int)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Regression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references):
        with warnings.catch_warnings():  # constant input: NaN, reported as such
            warnings.simplefilter("ignore")
            pearson = float(pearsonr(references, predictions)[0]) if len(predictions) > 1 else float("nan")
            spearman = float(spearmanr(references, predictions)[0]) if len(predictions) > 1 else float("nan")
        return {"pearson": pearson, "spearman": spearman,
                "mse": float(mean_squared_error(references, predictions)), "num_examples": len(predictions)}
