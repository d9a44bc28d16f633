"""The project's QA metrics as `evaluate` metric modules, shipped as plain files in this package.

    exact_match.py   exact match after QA normalisation       -> exact_match, exact_match_scores
    token_f1.py      SQuAD-style token F1, number-aware        -> token_f1, token_f1_scores
    rouge_l.py       ROUGE-L F-measure (rouge-score)           -> rouge_l, rouge_l_scores
    qa_normalize.py  the normalisation the first two share (each module imports it relatively)

Each module is an `evaluate.Metric` with string `predictions`/`references`; it returns the mean
(unrounded) and the per-example scores, in input order. Load one by path, offline, anywhere:
`evaluate.load("<this dir>/token_f1.py")`. `ft_assets.evaluation.qa_metrics` loads and combines them for
the pipeline. `MODULE_FILES` is the list of their paths.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("exact_match", "token_f1", "rouge_l")
MODULE_FILES = {name: METRICS_DIR / f"{name}.py" for name in METRIC_NAMES}
