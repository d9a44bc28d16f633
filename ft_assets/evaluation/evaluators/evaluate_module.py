"""`type: evaluate`: any Hugging Face `evaluate` metric module, loaded from a local file, offline.

    evaluators:
      - {type: evaluate, name: figures, path: data/metrics/figure_recall.py}
      - {type: evaluate, name: bleu, path: metrics/sacrebleu.py, args: {lowercase: true}, higher_is_better: {score: true}}

The module is loaded with `evaluate.load(<file>)` (its modules cache under `$FT_HOME/cache/evaluate/`,
as the built-in metrics are: `evaluation.qa_metrics`) and computed once over all rows with
`predictions=` the model's answers, `references=` the data's answers and the recipe's `args`.
Of what it returns, numbers become scores and lists with one value per row become per-example
columns; anything else is kept in the raw output. `keep:` narrows the scores to those names.
Every score is higher-is-better unless `higher_is_better` says otherwise. The file (and the
files beside it, which a module may import) is hashed into the evaluation's code version.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import Field

from ...config.evaluator_spec import EvaluatorSpecBase
from . import Answered, EvaluatorResult, register

_loaded: dict[tuple[Path, str], Any] = {}  # one load per module file content and process (evaluate copies it, then imports it)


class EvaluateModuleSpec(EvaluatorSpecBase):
    """An `evaluate` metric module by path (relative to the recipe root)."""

    type: Literal["evaluate"]
    path: Annotated[str, Field(min_length=1)]  # the metric module's .py file (a local file; nothing is downloaded)
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of its compute(), beside predictions/references
    keep: list[str] | None = None  # the returned numbers to report; null: all of them
    higher_is_better: dict[str, bool] = Field(default_factory=dict)  # score -> direction; unlisted scores: higher is better

    def files(self, resolve: Callable[[str, str], Path], where: str) -> list[Path]:
        return [resolve(self.path, f"{where}.path")]


def run(spec: EvaluateModuleSpec, answered: Answered, files: list[Path]) -> EvaluatorResult:
    metric = _load(files[0])
    out = metric.compute(predictions=list(answered.predictions), references=list(answered.references), **spec.args)
    return result_of(spec, out or {}, len(answered.predictions))


def result_of(spec: EvaluateModuleSpec, out: dict[str, Any], rows: int) -> EvaluatorResult:
    """Scores (numbers), per-example columns (lists of one value per row) and the rest as raw output."""
    scores, columns, rest = {}, {}, {}
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scores[key] = round(float(value), 4)
        elif isinstance(value, (list, tuple)) and len(value) == rows:
            columns[key] = list(value)
        else:
            rest[key] = value
    if spec.keep is not None:
        unknown = sorted(set(spec.keep) - set(scores))
        if unknown:
            raise ValueError(f"evaluator {spec.label}: {spec.path} returned no number named {', '.join(unknown)} "
                             f"(it returned {', '.join(sorted(out)) or 'nothing'}); fix `keep:`")
        scores = {k: scores[k] for k in spec.keep}
    if not scores:
        raise ValueError(f"evaluator {spec.label}: {spec.path} returned no number to report "
                         f"(it returned {', '.join(sorted(out)) or 'nothing'})")
    return EvaluatorResult(scores, {k: spec.higher_is_better.get(k, True) for k in scores}, columns,
                           raw={"other_outputs": rest} if rest else None)


def _load(path: Path):
    import evaluate

    from ..qa_metrics import evaluate_loading

    if not path.is_file():
        raise FileNotFoundError(f"evaluate metric module {path} does not exist")
    key = (path, hashlib.sha256(path.read_bytes()).hexdigest())
    with evaluate_loading() as cache_dir:  # evaluate's modules cache is process-wide
        if key not in _loaded:
            _loaded[key] = evaluate.load(str(path), keep_in_memory=True, cache_dir=str(cache_dir))
        return _loaded[key]


register(EvaluateModuleSpec, run)
