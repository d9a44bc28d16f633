"""Evaluators: the scores a recipe adds to every evaluation (`evaluation.evaluators:`), one module per kind.

An evaluator is to evaluation what a method is to training. Each kind lives in
`evaluation/evaluators/<kind>.py` with its recipe spec (a `config.evaluator_spec.EvaluatorSpecBase`
subclass) beside its code, and registers both with `register(Spec, run)`. `base_eval` and every
`eval_report[m]` run the recipe's evaluators after the built-in scores (exact match, token F1,
ROUGE-L, answer loss), on the same held-out rows, for the model they evaluate.

    run(spec, Answered, files) -> EvaluatorResult
        `Answered`: the held-out rows, the model's greedy answers to them, and where the model is
        (a transformers directory, plus an adapter when it did not merge); `files`: the spec's
        `files(...)` resolved against the recipe root (what it hashes into the code version).
        `EvaluatorResult`: named scores with their direction, optional per-example columns,
        tables and raw output.

Reports name each score `<evaluator name>.<score>` (`scores_of`), the key the gate
(`evaluation.gate`) and the leaderboard use. Importing this package imports every kind listed at
the bottom and nothing heavy (kinds import torch, evaluate, lm_eval or openai inside `run`):
`ft_assets/__init__.py` imports it so that recipes validate their evaluators.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ...config.evaluator_spec import EvaluatorSpecBase, register_spec

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Answered:
    """One model's answers to the held-out rows (all lists in row order)."""

    model: str  # "base" or the method name
    ids: list[str]
    tasks: list[str]
    questions: list[str]  # the user turn as the data gave it
    references: list[str]
    predictions: list[str]  # the model's greedy answers
    model_dir: Path  # a transformers checkpoint of the evaluated model: merged, or the base under `adapter_dir`
    adapter_dir: Path | None  # the adapter to load over model_dir when the method did not merge
    device: str
    system: str | None = None  # the recipe's system prompt (prompt.system)


def answered(model: str, rows: list[dict[str, Any]], model_dir: Path, adapter_dir: Path | None, device: str,
             system: str | None) -> Answered:
    """An `Answered` from `heldout.evaluate`'s per-example rows (id, task, question, reference, prediction)."""
    return Answered(model, [r["id"] for r in rows], [r["task"] for r in rows], [r["question"] for r in rows],
                    [r["reference"] for r in rows], [r["prediction"] for r in rows], model_dir, adapter_dir, device, system)


@dataclass
class EvaluatorResult:
    scores: dict[str, float]  # score name (no prefix) -> value
    higher_is_better: dict[str, bool]  # the direction of each score (the gate reads it)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # per-example values, one per row
    tables: dict[str, "pd.DataFrame"] = field(default_factory=dict)  # saved as <name>.<table>.parquet
    raw: Any = None  # JSON kept beside the scores as <name>.json (e.g. a judge's raw answers)

    def __post_init__(self):
        missing = sorted(set(self.scores) - set(self.higher_is_better))
        if missing:
            raise ValueError(f"evaluator result without a direction for {missing}")


Run = Callable[[Any, Answered, list[Path]], EvaluatorResult]
EVALUATORS: dict[str, Run] = {}  # kind -> its run function


def register(spec: type[EvaluatorSpecBase], run: Run) -> None:
    register_spec(spec)
    EVALUATORS[spec.kind()] = run


def run_all(specs: list[tuple[EvaluatorSpecBase, list[Path]]], answered: Answered) -> dict[str, EvaluatorResult]:
    """Every evaluator of the recipe (with its resolved files) on one model's answers:
    {evaluator name: result}, in recipe order."""
    return {spec.label: EVALUATORS[spec.kind()](spec, answered, files) for spec, files in specs}


def scores_of(results: dict[str, EvaluatorResult]) -> dict[str, float]:
    """All scores, keyed `<evaluator name>.<score>`: what metrics.json's "evaluators" holds."""
    return {f"{name}.{k}": v for name, r in results.items() for k, v in r.scores.items()}


def directions_of(results: dict[str, EvaluatorResult]) -> dict[str, bool]:
    """`<evaluator name>.<score>` -> higher is better."""
    return {f"{name}.{k}": v for name, r in results.items() for k, v in r.higher_is_better.items()}


def save(results: dict[str, EvaluatorResult], ids: list[str], out_dir: Path) -> None:
    """Each evaluator's per-example columns (`evaluators.parquet`: id, then `<name>.<column>`), tables
    (`<name>.<table>.parquet`) and raw output (`<name>.json`)."""
    import pandas as pd

    columns = {f"{name}.{col}": values for name, r in results.items() for col, values in r.columns.items()}
    if columns:
        pd.DataFrame({"id": ids, **{k: _as_text(v) if _mixed(v) else v for k, v in columns.items()}}
                     ).to_parquet(out_dir / "evaluators.parquet", index=False)
    for name, r in results.items():
        for table, frame in r.tables.items():
            frame.to_parquet(out_dir / f"{name}.{table}.parquet", index=False)
        if r.raw is not None:
            (out_dir / f"{name}.json").write_text(json.dumps(r.raw, indent=2, sort_keys=True, default=str) + "\n")


def _mixed(values: list[Any]) -> bool:
    """Values Arrow cannot type as one column (numbers beside text, mappings): written as text."""
    kinds = {type(v) for v in values if v is not None}
    return not (kinds <= {int, float, bool} or kinds <= {str})


def _as_text(values: list[Any]) -> list[str | None]:
    return [None if v is None else v if isinstance(v, str) else json.dumps(v, default=str) for v in values]


from . import evaluate_module  # noqa: E402,F401  (evaluate: an `evaluate` metric module by path)
from . import judge  # noqa: E402,F401  (judge: LLM-as-judge through any OpenAI-compatible endpoint)
from . import lm_eval_harness  # noqa: E402,F401  (lm_eval: EleutherAI lm-evaluation-harness tasks, the probe by default)
