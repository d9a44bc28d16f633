"""QA metrics: exact match, token F1 (SQuAD-style normalisation) and ROUGE-L F-measure.

Normalisation lower-cases, drops punctuation except inside numbers ("4,512" and "12.5" keep
their separators, so "$4,512 million" and "4512" differ as they should), drops articles and
collapses whitespace. ROUGE-L comes from `rouge-score` (no Hub download).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_NOT_IN_NUMBER = re.compile(r"(?<!\d)[%s]|[%s](?!\d)" % (re.escape(string.punctuation), re.escape(string.punctuation)))


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = _PUNCT_NOT_IN_NUMBER.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def qa_scores(prediction: str, reference: str) -> dict[str, float]:
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = ("exact_match", "token_f1", "rouge_l")
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) if rows else 0.0 for k in keys}
