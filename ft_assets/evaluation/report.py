"""The evaluation report of one tuned method: the single call behind `eval_report[m]`.

    evaluate_tuned(method, TunedModel, examples, base_metrics, ...) -> TunedReport
        the tuned model (its merged checkpoint when it merged, else base + adapter) on the
        held-out split; per-task scores beside the base's; for a preference method (`PreferenceEval`),
        the held-out pairs scored for base, SFT reference and tuned model; for an adapter that
        continued a previous version (`ForgettingEval`), both adapters on the previous eval split.

    evaluate_base(model, base_dir, tokenizer, examples, Scoring) -> result
    rescore(method, name, TunedModel, tokenizer, examples, Scoring) -> scores
        the base model, and an earlier tuned model (the champion on new rows), scored like a new one.
`Scoring` carries the recipe's evaluators: their `<name>.<score>` join each model's scores, their
directions go to metrics.json's "higher_is_better", their files beside the predictions
(`evaluators.save`). Without evaluators nothing of this changes a report.

`TunedReport.save(dir)` writes `metrics.json` ({"base", "tuned", "evaluated_as", "method",
"per_task"?, "forgetting"?}), the per-example table (`predictions.jsonl`, `.parquet`, `.csv`), with
several tasks `per_task.parquet` (base vs tuned per task) and, for preference methods, `preference_metrics.json`.
`defs.reports.forgetting_inputs` finds the previous adapter and data by exact version in the
store (the adapter's own history, named in its manifest); nothing here reads the store.

    leaderboard(methods, reports, base_metrics) -> Leaderboard
        every method's report on one table, best token F1 first, the base model last, and the
        methods that have no report yet (listed, not guessed). `Leaderboard.save(dir)` writes
        leaderboard.json, leaderboard.parquet, leaderboard.csv and leaderboard.png. No Dagster here.

Tables are pandas DataFrames with the columns and dtypes of `evaluation.tables`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..trainers import preference as tuning
from . import merge, plots, tables
from ..data.rows import Example
from . import evaluators
from .heldout import evaluate, save_eval, save_predictions
from ..methods import get_method
from ..models.base_model import load_model
from ..data.preferences import LabelledAnswer, PreferencePair

METRIC_KEYS = ("exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity")


@dataclass(frozen=True)
class TunedModel:
    """Where the tuned model of one method lives: `merged_dir` when it merged, else base + adapter."""

    base_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    quantized_dir: Path | None  # the base the adapter trained on, when it trained on the 4-bit one


@dataclass(frozen=True)
class PreferenceEval:
    pairs: list[PreferencePair] | list[LabelledAnswer]  # held-out pairs (or labelled answers) of preference_dataset
    reference_dir: Path  # the SFT adapter the preference adapter continued (its reference policy)
    reference_type: str
    key: str  # the preference method's type: what its scores are filed under
    beta: float
    facts: dict[str, Any]  # recorded beside the scores (dataset and reference versions)


@dataclass(frozen=True)
class ForgettingEval:
    previous_adapter_dir: Path
    previous_adapter: str  # version
    previous_sft_dataset: str  # version
    examples: list[Example]  # the previous data's eval split


@dataclass(frozen=True)
class Scoring:
    """How answers are scored beyond the built-ins: the recipe's evaluators, each with its resolved files."""

    evaluators: list[tuple[Any, list[Path]]] = field(default_factory=list)  # (EvaluatorSpecBase, files)
    system: str | None = None  # the recipe's system prompt (judges see it)


def add_evaluators(result: dict[str, Any], scoring: Scoring, model: str, model_dir: Path, adapter_dir: Path | None,
                   device: str) -> dict[str, evaluators.EvaluatorResult]:
    """Run the recipe's evaluators on `heldout.evaluate`'s result and put their scores into its
    metrics as `<name>.<score>` (nothing changes without evaluators)."""
    if not scoring.evaluators:
        return {}
    results = evaluators.run_all(scoring.evaluators, evaluators.answered(
        model, result["rows"], model_dir, adapter_dir, device, scoring.system))
    result["metrics"].update(evaluators.scores_of(results))
    return results


def evaluate_base(model, base_dir: Path, tokenizer, examples: list[Example], scoring: Scoring, *, max_new_tokens: int,
                  batch_size: int, device: str) -> dict[str, Any]:
    """The untuned base on the held-out rows: `heldout.evaluate`'s result, with the evaluators' scores
    in its metrics and their results under "evaluators" (`save_base` writes both)."""
    result = evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    result["evaluators"] = add_evaluators(result, scoring, "base", base_dir, None, device)
    return result


def save_base(result: dict[str, Any], out_dir: Path) -> None:
    save_eval(result, out_dir)
    evaluators.save(result["evaluators"], [r["id"] for r in result["rows"]], out_dir)


@dataclass
class TunedReport:
    metrics: dict[str, Any]  # what metrics.json holds
    rows: list[dict[str, Any]]  # per-example predictions and scores
    preferences: dict[str, Any] | None = None
    timing: dict[str, Any] = field(default_factory=dict)  # the tuned model's `heldout.evaluate` timing (not saved)
    evaluators: dict[str, evaluators.EvaluatorResult] = field(default_factory=dict)  # the tuned model's
    preference_key: str = ""  # the preference method's type, the key of its scores in `preferences`

    def evaluator_frame(self) -> pd.DataFrame | None:
        """Base vs tuned for every evaluator score (change: positive = better), when there are evaluators."""
        directions = self.metrics.get("higher_is_better", {})
        if not directions:
            return None
        base, tuned = self.metrics["base"], self.metrics["tuned"]
        rows = [{"score": k, "base": base.get(k), "tuned": tuned.get(k),
                 "change": None if base.get(k) is None or tuned.get(k) is None
                 else round((tuned[k] - base[k]) * (1 if up else -1), 4)} for k, up in directions.items()]
        return pd.DataFrame(rows, columns=["score", "base", "tuned", "change"])

    def predictions_frame(self) -> pd.DataFrame:
        return tables.predictions_frame(self.rows)

    def per_task_frame(self) -> pd.DataFrame | None:
        """Base vs tuned per task, when the eval split has several tasks."""
        return tables.task_comparison_frame(self.metrics["per_task"]) if "per_task" in self.metrics else None

    def save(self, out_dir: Path) -> None:
        _write_json(out_dir / "metrics.json", self.metrics)
        save_predictions(self.rows, out_dir)
        if "per_task" in self.metrics:
            tables.write_table(self.per_task_frame(), out_dir, "per_task")
        if self.preferences is not None:
            _write_json(out_dir / "preference_metrics.json", self.preferences)
        evaluators.save(self.evaluators, [r["id"] for r in self.rows], out_dir)


def load_tuned(method_type: str, tuned: TunedModel, device: str) -> tuple[Any, str]:
    """(the model, "merged" | "adapter"): its merged checkpoint when it merged, else base + adapter."""
    if tuned.merged_dir is not None:
        return load_model(tuned.merged_dir, device), "merged"
    method = get_method(method_type)
    q_dir = tuned.quantized_dir if method.uses_quantized_base else None
    return merge.unmerged(method, tuned.base_dir, tuned.adapter_dir, q_dir, device), "adapter"


def rescore(method_type: str, name: str, tuned: TunedModel, tokenizer, examples: list[Example], scoring: Scoring, *,
            max_new_tokens: int, batch_size: int, device: str) -> dict[str, Any]:
    """An earlier model's scores on these rows (built-ins and evaluators), as evaluate_tuned scores a new one:
    what the champion is compared on when the held-out rows changed since it was evaluated."""
    model, _ = load_tuned(method_type, tuned, device)
    result = evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    add_evaluators(result, scoring, name, tuned.merged_dir or tuned.base_dir,
                   None if tuned.merged_dir is not None else tuned.adapter_dir, device)
    return result["metrics"]


def evaluate_tuned(method_type: str, name: str, tuned: TunedModel, tokenizer, examples: list[Example],
                   base_metrics: dict[str, Any], *, max_new_tokens: int, batch_size: int, device: str,
                   preference: PreferenceEval | None = None, forgetting: ForgettingEval | None = None,
                   scoring: Scoring = Scoring()) -> TunedReport:
    method = get_method(method_type)
    model, form = load_tuned(method_type, tuned, device)

    def run(on: list[Example], m=model) -> dict[str, Any]:
        return evaluate(m, tokenizer, on, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)

    result = run(examples)
    scored = add_evaluators(result, scoring, name, tuned.merged_dir or tuned.base_dir,
                            None if tuned.merged_dir is not None else tuned.adapter_dir, device)
    scores = result["metrics"]
    metrics = {"base": base_metrics, "tuned": scores, "evaluated_as": form, "method": name}
    if scored:
        metrics["higher_is_better"] = evaluators.directions_of(scored)
    if "per_task" in scores:
        base_tasks = base_metrics.get("per_task", {})
        metrics["per_task"] = {t: {"base": base_tasks.get(t), "tuned": m} for t, m in scores["per_task"].items()}
    prefs = None
    if preference is not None:
        pad = tokenizer.pad_token_id
        reference = get_method(preference.reference_type).load(load_model(tuned.base_dir, device),
                                                               preference.reference_dir)
        prefs = {**tuning.evaluate_preferences(model, reference, load_model(tuned.base_dir, device), preference.pairs,
                                               key=preference.key, beta=preference.beta, pad_id=pad, device=device),
                 **preference.facts}
    if forgetting is not None:
        q_dir = tuned.quantized_dir if method.uses_quantized_base else None
        before = run(forgetting.examples, merge.unmerged(method, tuned.base_dir, forgetting.previous_adapter_dir,
                                                          q_dir, device))["metrics"]
        after = run(forgetting.examples)["metrics"]
        keys = ("exact_match", "token_f1", "rouge_l", "eval_loss")
        metrics["forgetting"] = {
            "previous_adapter": forgetting.previous_adapter, "previous_sft_dataset": forgetting.previous_sft_dataset,
            "examples": len(forgetting.examples), "before": before, "after": after,
            # positive = forgot (quality fell / loss rose) on the old eval set
            "drop": {k: round((after[k] - before[k]) if k == "eval_loss" else (before[k] - after[k]), 4) for k in keys},
        }
    return TunedReport(metrics, result["rows"], prefs, result["timing"], scored,
                       preference.key if preference is not None else "")


BOARD_COLUMNS = list(tables.BOARD_COLUMNS)


@dataclass
class Leaderboard:
    rows: list[dict[str, Any]]  # BOARD_COLUMNS; best token F1 first, "base" last
    missing: list[str]  # methods without a report

    @property
    def best(self) -> str:
        return self.rows[0]["method"] if len(self.rows) > 1 else "-"

    def frame(self) -> pd.DataFrame:
        return tables.board_frame(self.rows)

    def chart_png(self) -> bytes:
        return plots.bar_chart_png([r["method"] for r in self.rows], [r["token_f1"] for r in self.rows],
                                   "token F1 on the held-out split", "token F1")

    def save(self, out_dir: Path) -> bytes:
        """Write json, parquet, csv and the chart; returns the chart's PNG bytes."""
        _write_json(out_dir / "leaderboard.json", {"rows": self.rows, "missing": self.missing})
        tables.write_table(self.frame(), out_dir, "leaderboard", csv=True)
        png = self.chart_png()
        (out_dir / "leaderboard.png").write_bytes(png)
        return png


def leaderboard(methods: dict[str, str], reports: dict[str, tuple[dict[str, Any], dict[str, Any]]],
                base_metrics: dict[str, Any]) -> Leaderboard:
    """`methods`: {name: type} in recipe order; `reports`: {name: (tuned metrics, trained facts)}
    where trained facts are the report's record of the adapter it evaluated ({"train", "bytes"})."""
    rows, missing = [], []
    for name, type_ in methods.items():
        if name not in reports:
            missing.append(name)
            continue
        tuned, trained = reports[name]
        rows.append(board_row(name, type_, tuned, trained.get("train", {}), trained.get("bytes", 0)))
    rows.sort(key=lambda r: -r["token_f1"])
    rows.append(board_row("base", "-", base_metrics, {}, 0))
    return Leaderboard(rows, missing)


def board_row(name: str, type_: str, metrics: dict, train_facts: dict, adapter_bytes: int) -> dict:
    trainable, total = train_facts.get("trainable_parameters"), train_facts.get("total_parameters")
    peak = train_facts.get("peak_memory_bytes")
    return {
        "method": name, "type": type_,
        **{k: metrics[k] for k in ("token_f1", "exact_match", "rouge_l", "eval_loss")},
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / total, 3) if trainable and total else None,
        "adapter_bytes": adapter_bytes or None,
        "train_tokens_per_s": train_facts.get("tokens_per_s"),
        "peak_memory_mib": round(peak / 2**20) if peak else None,
        "wall_time_s": train_facts.get("wall_s"),
        **{k: v for k, v in metrics.items() if "." in k},  # the recipe's evaluators' scores
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
