"""Exact match of generated answers as an ``evaluate`` metric module, shipped with peft-inflora (loads offline).

``exact_match = mean_n [normalize(prediction_n) == normalize(reference_n)]`` with ``normalize`` =
:func:`peft_inflora.continual.evaluation.normalize_answer` (lowercase, whitespace collapsed, stripped). Loaded with
``evaluate.load(<this folder>)``; evaluate scans the imports below, one per line.
"""

import datasets
import evaluate

from peft_inflora.continual.evaluation import normalize_answer


_DESCRIPTION = "The fraction of answers equal to their reference after lowercasing and collapsing whitespace."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generated answers (N,).
    references (list of str): the reference answers (N,).
Returns:
    exact_match (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("path/to/exact_match")
    >>> metric.compute(predictions=["Green ", "dog"], references=["green", "cat"])
    {'exact_match': 0.5}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references) or not references:
            raise ValueError(f"exact_match needs as many predictions as references (> 0), got {len(predictions)} "
                             f"and {len(references)}.")
        same = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
        return {"exact_match": same / len(references)}
