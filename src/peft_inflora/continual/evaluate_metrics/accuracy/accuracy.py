"""Accuracy as an ``evaluate`` metric module, shipped with peft-inflora so that it loads offline.

``accuracy = mean_n [prediction_n == reference_n]`` over ``N`` examples (float64), the fraction of correct
predictions. Loaded with ``evaluate.load(<this folder>)``; evaluate scans the imports below, one per line.
"""

import datasets
import evaluate
import numpy


_DESCRIPTION = "The fraction of predictions equal to their reference: mean_n [prediction_n == reference_n]."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): the predicted labels (N,).
    references (list of int): the true labels (N,).
Returns:
    accuracy (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("path/to/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = numpy.asarray(predictions), numpy.asarray(references)
        if predictions.shape != references.shape or predictions.size == 0:
            raise ValueError(f"accuracy needs as many predictions as references (> 0), got {predictions.size} and "
                             f"{references.size}.")
        return {"accuracy": float(numpy.mean(predictions == references))}
