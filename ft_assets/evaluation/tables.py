"""The evaluation tables as pandas DataFrames with fixed columns and dtypes, and how they are written.

    predictions_frame(rows)         PREDICTION_COLUMNS: one row per held-out example, input order
    per_task_frame(per_task)        one model's scores per task (base_eval's `per_task`)
    task_comparison_frame(per_task) base vs tuned per task (eval_report's `per_task`)
    board_frame(rows)               BOARD_COLUMNS (+ evaluators' `<name>.<score>`): the leaderboard, in its rank order
    write_table(df, out_dir, name, csv=...)
        `<name>.parquet` (pyarrow, no index) and, for tables people open themselves, `<name>.csv`.

Dtypes are declared here, never inferred: strings are `str`, scores `float64`, counts nullable
`Int64` (a missing count stays empty in the CSV instead of turning the column into floats), so an
empty table or a column of Nones has the same schema as a full one. `column_kinds(df)` names each
column's kind ("string" / "float" / "int" / "bool") for whoever describes the table. No Dagster here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

PREDICTION_COLUMNS = {"id": "str", "task": "str", "question": "str", "reference": "str", "prediction": "str",
                      "exact_match": "float64", "token_f1": "float64", "rouge_l": "float64"}
TASK_SCORE_COLUMNS = {"task": "str", "examples": "Int64", "exact_match": "float64", "token_f1": "float64",
                      "rouge_l": "float64", "eval_loss": "float64", "perplexity": "float64"}
TASK_COMPARISON_COLUMNS = {"task": "str", "examples": "Int64", "base_token_f1": "float64",
                           "tuned_token_f1": "float64", "token_f1_gain": "float64", "base_exact_match": "float64",
                           "tuned_exact_match": "float64", "tuned_rouge_l": "float64", "base_eval_loss": "float64",
                           "tuned_eval_loss": "float64"}
BOARD_COLUMNS = {"method": "str", "type": "str", "token_f1": "float64", "exact_match": "float64",
                 "rouge_l": "float64", "eval_loss": "float64", "trainable_parameters": "Int64",
                 "trainable_percent": "float64", "adapter_bytes": "Int64", "train_tokens_per_s": "float64",
                 "peak_memory_mib": "Int64", "wall_time_s": "float64"}


def frame(rows: list[dict[str, Any]], columns: dict[str, str]) -> pd.DataFrame:
    """`rows` as a DataFrame of exactly `columns` (name -> dtype), in that order; absent keys are missing."""
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=list(columns))
    return df.astype(columns)


def predictions_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return frame(rows, PREDICTION_COLUMNS)


def per_task_frame(per_task: dict[str, dict[str, Any]]) -> pd.DataFrame:
    return frame([{"task": t, **m} for t, m in per_task.items()], TASK_SCORE_COLUMNS)


def task_comparison_frame(per_task: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """{task: {"base": scores or None, "tuned": scores}} as one row per task."""
    rows = []
    for task, sides in per_task.items():
        b, t = sides["base"] or {}, sides["tuned"]
        rows.append({"task": task, "examples": t["examples"], "base_token_f1": b.get("token_f1"),
                     "tuned_token_f1": t["token_f1"],
                     "token_f1_gain": round(t["token_f1"] - b["token_f1"], 4) if b else None,
                     "base_exact_match": b.get("exact_match"), "tuned_exact_match": t["exact_match"],
                     "tuned_rouge_l": t["rouge_l"], "base_eval_loss": b.get("eval_loss"),
                     "tuned_eval_loss": t["eval_loss"]})
    return frame(rows, TASK_COMPARISON_COLUMNS)


def board_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """BOARD_COLUMNS, then the evaluators' `<name>.<score>` columns the rows carry (float64, in first-seen order)."""
    scores = dict.fromkeys(k for r in rows for k in r if "." in k and k not in BOARD_COLUMNS)
    return frame(rows, {**BOARD_COLUMNS, **{k: "float64" for k in scores}})


def write_table(df: pd.DataFrame, out_dir: Path, name: str, *, csv: bool = False) -> list[Path]:
    written = [out_dir / f"{name}.parquet"]
    df.to_parquet(written[0], engine="pyarrow", index=False)
    if csv:
        written.append(out_dir / f"{name}.csv")
        df.to_csv(written[1], index=False)
    return written


def column_kinds(df: pd.DataFrame) -> dict[str, str]:
    kinds = {}
    for col, dtype in df.dtypes.items():
        if pd.api.types.is_bool_dtype(dtype):
            kinds[col] = "bool"
        elif pd.api.types.is_integer_dtype(dtype):
            kinds[col] = "int"
        elif pd.api.types.is_float_dtype(dtype):
            kinds[col] = "float"
        else:
            kinds[col] = "string"
    return kinds


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain Python values, missing ones as None (for JSON or a UI table)."""
    out = df.astype(object).where(df.notna(), None).to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in out]
