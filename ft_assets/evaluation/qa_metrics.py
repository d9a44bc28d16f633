"""QA metrics for the pipeline: the `evaluate` metric modules shipped in `ft_assets/evaluation/metrics/`
(exact match, number-aware token F1, ROUGE-L), loaded by path and combined with `evaluate.combine`.

    score_answers(predictions, references) -> AnswerScores
        per-example scores in input order, and their means rounded to 4 places (what reports show).
    perplexity(mean_token_loss) -> float
        exp of the model's mean answer-token loss (see below why it is not an `evaluate` metric).

The scoring code lives only in the metric modules; this file loads them. Loading is a dynamic
import (evaluate copies each module into a modules cache, then imports it), so it happens once per
process. Everything evaluate writes goes under `$FT_HOME/cache/evaluate/` (`modules/`: the copied
modules, in the FT_HOME of the first load of the process: `evaluate_loading`; `metrics/`: the empty
per-metric dirs it makes), not under ~/.cache/huggingface; the
modules are local files, so nothing is downloaded and no network is needed. Metric inputs are kept
in memory (no Arrow files).

Perplexity is computed from the loss `evaluate.eval_loss` takes over the answer tokens (the same
masking as training), in the pass that scores the reference answers. `evaluate`'s Hub perplexity
metric would load a model by Hub id and score whole texts; ours needs the model in hand, offline,
and only the answer tokens, so it stays a separate number beside the combined text metrics.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .metrics import METRIC_NAMES, MODULE_FILES
from .metrics.qa_normalize import mean

SCORE_KEYS = METRIC_NAMES  # ("exact_match", "token_f1", "rouge_l")
_lock = threading.Lock()  # loading (and evaluate's modules cache setting) one thread at a time
_combined = None


def evaluate_cache() -> Path:
    """Where evaluate may write: `modules/` (the copied metric modules) and `metrics/`."""
    from ..config.paths import ft_home

    return ft_home() / "cache" / "evaluate"


_modules_dir: Path | None = None


@contextmanager
def evaluate_loading() -> Iterator[Path]:
    """Load `evaluate` modules inside this block (one thread at a time); yields the `cache_dir` for
    `evaluate.load`. It points evaluate at this process's modules cache, `$FT_HOME/cache/evaluate/
    modules` of the first load in the process: evaluate.load has no argument for it (its loader
    reads `evaluate.config.HF_MODULES_CACHE` per call), and it imports every module as
    `evaluate_modules.metrics.<name>` from the directory of its first import, so a later FT_HOME
    (another project, a test) must keep using that one."""
    import evaluate

    global _modules_dir
    with _lock:
        if _modules_dir is None:
            _modules_dir = evaluate_cache() / "modules"
        evaluate.config.HF_MODULES_CACHE = _modules_dir
        yield evaluate_cache() / "metrics"


def qa_metrics():
    """The three metric modules combined (`evaluate.CombinedEvaluations`), loaded once per process."""
    global _combined
    with evaluate_loading() as cache_dir:
        if _combined is None:
            import evaluate

            _combined = evaluate.combine([evaluate.load(str(MODULE_FILES[name]), keep_in_memory=True,
                                                        cache_dir=str(cache_dir)) for name in METRIC_NAMES])
        return _combined


@dataclass(frozen=True)
class AnswerScores:
    per_example: dict[str, list[float]]  # metric -> one score per prediction, input order
    means: dict[str, float]  # metric -> mean, rounded to 4 places

    def example(self, i: int) -> dict[str, float]:
        return {k: self.per_example[k][i] for k in SCORE_KEYS}


def score_answers(predictions: list[str], references: list[str]) -> AnswerScores:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return AnswerScores({k: [] for k in SCORE_KEYS}, {k: 0.0 for k in SCORE_KEYS})
    out = qa_metrics().compute(predictions=list(predictions), references=list(references))
    return AnswerScores({k: out[f"{k}_scores"] for k in SCORE_KEYS}, {k: round(out[k], 4) for k in SCORE_KEYS})


def qa_scores(prediction: str, reference: str) -> dict[str, float]:
    """The three scores of one answer."""
    return score_answers([prediction], [reference]).example(0)


def mean_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means of rows that already carry their scores (a subset, e.g. one task), rounded as reports show
    them; the same left-to-right mean the metric modules take."""
    return {k: round(mean([r[k] for r in rows]), 4) for k in SCORE_KEYS}


def perplexity(mean_token_loss: float) -> float:
    return round(math.exp(min(mean_token_loss, 50.0)), 3)  # capped: a diverged model must not overflow
