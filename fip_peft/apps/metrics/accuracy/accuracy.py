"""Accuracy metric loadable offline with ``evaluate.load`` from this folder.

The Hub's ``accuracy`` metric cannot be fetched without network access, so the package ships its own copy.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions that equal their references."

_CITATION = ""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`): return the fraction (default) instead of the count of correct predictions.
    sample_weight (`list` of `float`): optional per-example weights.
Returns:
    accuracy (`float`): the (weighted) fraction, or count, of correct predictions.
Examples:
    >>> metric = evaluate.load("path/to/fip_peft/apps/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to their references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if len(predictions) == 0:
            return {"accuracy": float("nan")}
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        if normalize:
            total /= float(weights.sum())
        return {"accuracy": total}
