"""Token F1 of a predicted answer against its reference, SQuAD-style and number-aware (an `evaluate` metric).

Returns {"token_f1": mean over examples, "token_f1_scores": [F1 per example]}.
Load by path, offline: `evaluate.load("<path>/token_f1.py")`.
"""

from collections import Counter

import datasets
import evaluate

from .qa_normalize import mean, normalize

_DESCRIPTION = """Harmonic mean of token precision and recall between the normalised prediction and
reference (bag of tokens). Normalisation keeps separators inside numbers, so a different figure
("4512" for "4,512") shares no token. Both empty: 1.0; one empty: 0.0."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted answers.
    references (list of str): reference answers, one per prediction.
Returns:
    token_f1 (float): mean of the per-example scores (0.0 for no examples).
    token_f1_scores (list of float): F1 per example, in [0, 1].
Example:
    >>> f1 = evaluate.load("ft_assets/evaluation/metrics/token_f1.py")
    >>> f1.compute(predictions=["4,512"], references=["4,512 million"])["token_f1"]
    0.6666666666666666
"""

_CITATION = """@inproceedings{rajpurkar-etal-2016-squad,
  title = {{SQuAD}: 100,000+ Questions for Machine Comprehension of Text},
  author = {Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle = {Proceedings of EMNLP},
  year = {2016}
}"""


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [f1(p, r) for p, r in zip(predictions, references)]
        return {"token_f1": mean(scores), "token_f1_scores": scores}
