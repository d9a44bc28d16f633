"""ROUGE-L F-measure of a predicted answer against its reference, from `rouge-score` (an `evaluate` metric).

Returns {"rouge_l": mean over examples, "rouge_l_scores": [F-measure per example]}. No stemming,
rouge-score's own tokenizer (lower-cased, non-alphanumerics split off). Nothing is downloaded.
Load by path, offline: `evaluate.load("<path>/rouge_l.py")`.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

from .qa_normalize import mean

_DESCRIPTION = """ROUGE-L: F-measure of the longest common subsequence of tokens between prediction
and reference, computed by Google's `rouge-score` package (no stemmer)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted answers.
    references (list of str): reference answers, one per prediction.
Returns:
    rouge_l (float): mean of the per-example scores (0.0 for no examples).
    rouge_l_scores (list of float): ROUGE-L F-measure per example, in [0, 1].
Example:
    >>> rouge = evaluate.load("ft_assets/evaluation/metrics/rouge_l.py")
    >>> rouge.compute(predictions=["cloud services"], references=["cloud services"])["rouge_l"]
    1.0
"""

_CITATION = """@inproceedings{lin-2004-rouge,
  title = {{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out},
  year = {2004}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rouge_l": mean(scores), "rouge_l_scores": scores}
