"""Figure recall: the share of the reference answer's figures that the prediction states (an `evaluate` metric).

An example of a metric module a recipe names by path (`evaluation.evaluators: [{type: evaluate,
path: ...}]`, see `ft_assets/recipes/gated.yaml`): financial answers are judged by their numbers,
which token F1 weighs like any other word. A figure is a run of digits with optional thousands
separators and decimals ("$4,512.5 million" -> "4512.5"); a reference without figures scores 1.0
when the prediction has none either, else 0.0.

Returns {"figure_recall": mean over examples, "figure_recall_scores": one score per example}.
"""

import re

import datasets
import evaluate

_FIGURE = re.compile(r"\d[\d,]*(?:\.\d+)?")


def figures(text: str) -> list[str]:
    return [m.group(0).replace(",", "").rstrip(".") for m in _FIGURE.finditer(text)]


def recall(prediction: str, reference: str) -> float:
    wanted, said = figures(reference), set(figures(prediction))
    if not wanted:
        return float(not said)
    return sum(f in said for f in wanted) / len(wanted)


class FigureRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of the reference's figures (numbers) that the prediction states.",
            citation="",
            inputs_description="predictions (list of str), references (list of str): one reference per prediction.",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [recall(p, r) for p, r in zip(predictions, references)]
        return {"figure_recall": sum(scores) / len(scores) if scores else 0.0, "figure_recall_scores": scores}
