"""QA answer normalisation shared by the exact-match and token-F1 metric modules.

Lower-cases, drops punctuation except inside numbers ("4,512" and "12.5" keep their separators,
so "$4,512 million" and "4512" differ as they should), drops articles and collapses whitespace.
Standard library only: `evaluate` copies this file beside the module that imports it.
"""

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.escape(string.punctuation)
_PUNCT_NOT_IN_NUMBER = re.compile(r"(?<!\d)[%s]|[%s](?!\d)" % (_PUNCT, _PUNCT))


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = _PUNCT_NOT_IN_NUMBER.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def mean(scores: list) -> float:
    """The plain mean (0.0 for no scores), summed left to right as the reports always have."""
    return sum(scores) / len(scores) if scores else 0.0
