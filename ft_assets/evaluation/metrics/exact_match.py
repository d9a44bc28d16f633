"""Exact match of a predicted answer and its reference after QA normalisation (an `evaluate` metric).

Returns {"exact_match": mean over examples, "exact_match_scores": [1.0 or 0.0 per example]}.
Load by path, offline: `evaluate.load("<path>/exact_match.py")`.
"""

import datasets
import evaluate

from .qa_normalize import mean, normalize

_DESCRIPTION = """Exact match after normalisation: lower-cased, punctuation dropped except inside numbers
("$4,512 million" matches "4,512 million"; "4512" does not match "4,512"), articles dropped,
whitespace collapsed."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted answers.
    references (list of str): reference answers, one per prediction.
Returns:
    exact_match (float): mean of the per-example scores (0.0 for no examples).
    exact_match_scores (list of float): 1.0 where the normalised texts are equal, else 0.0.
Example:
    >>> em = evaluate.load("ft_assets/evaluation/metrics/exact_match.py")
    >>> em.compute(predictions=["The $4,512 million."], references=["4,512 million"])["exact_match"]
    1.0
"""

_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
  title = {{SQuAD}: 100,000+ Questions for Machine Comprehension of Text},
  author = {Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle = {Proceedings of EMNLP},
  year = {2016}
}"""


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
        scores = [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]
        return {"exact_match": mean(scores), "exact_match_scores": scores}
