"""Evaluation tables: pandas DataFrames with declared dtypes, written as Parquet (+ CSV)."""

from __future__ import annotations

import json

import pandas as pd

from ft_assets.evaluation import report, tables


def prediction_rows():
    return [{"id": "q1", "task": "qa", "question": "Revenue?", "reference": "$5 million", "prediction": "$5 million",
             "exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0},
            {"id": "q2", "task": "qa", "question": "Profit?", "reference": "$2 million", "prediction": "",
             "exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0}]  # rouge-score gives an int 0 for no overlap


def test_predictions_frame_has_the_declared_columns_and_round_trips_through_parquet(tmp_path):
    df = tables.predictions_frame(prediction_rows())
    assert list(df.columns) == list(tables.PREDICTION_COLUMNS)
    assert tables.column_kinds(df) == {"id": "string", "task": "string", "question": "string", "reference": "string",
                                       "prediction": "string", "exact_match": "float", "token_f1": "float",
                                       "rouge_l": "float"}
    written = tables.write_table(df, tmp_path, "predictions", csv=True)
    assert [p.name for p in written] == ["predictions.parquet", "predictions.csv"]
    back = pd.read_parquet(tmp_path / "predictions.parquet")
    assert back["rouge_l"].tolist() == [1.0, 0.0] and back["prediction"].tolist() == ["$5 million", ""]
    assert back["id"].tolist() == ["q1", "q2"] and str(back["exact_match"].dtype) == "float64"
    csv_rows = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert csv_rows["reference"].tolist() == ["$5 million", "$2 million"]
    # an empty evaluation still has the schema
    empty = tables.predictions_frame([])
    assert list(empty.columns) == list(tables.PREDICTION_COLUMNS) and tables.column_kinds(empty) == tables.column_kinds(df)


def test_leaderboard_tables_keep_missing_counts_empty_not_float(tmp_path):
    tuned = {"token_f1": 0.5, "exact_match": 0.25, "rouge_l": 0.4, "eval_loss": 1.5}
    base = {"token_f1": 0.1, "exact_match": 0.0, "rouge_l": 0.2, "eval_loss": 2.5}
    facts = {"train": {"trainable_parameters": 1234, "total_parameters": 100000, "tokens_per_s": 55.5,
                       "peak_memory_bytes": 3 * 2**20, "wall_s": 9.5}, "bytes": 4096}
    board = report.leaderboard({"lora": "lora", "dora": "dora"}, {"lora": (tuned, facts)}, base)
    board.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"leaderboard.json", "leaderboard.parquet", "leaderboard.csv",
                                                    "leaderboard.png"}
    lines = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert lines[0] == ",".join(report.BOARD_COLUMNS)
    assert lines[1] == "lora,lora,0.5,0.25,0.4,1.5,1234,1.234,4096,55.5,3,9.5"
    assert lines[2] == "base,-,0.1,0.0,0.2,2.5,,,,,,"
    back = pd.read_parquet(tmp_path / "leaderboard.parquet")
    assert back["method"].tolist() == ["lora", "base"] and str(back["trainable_parameters"].dtype) == "Int64"
    assert back["trainable_parameters"].isna().tolist() == [False, True]
    assert json.loads((tmp_path / "leaderboard.json").read_text())["missing"] == ["dora"]
    assert tables.records(board.frame())[1]["adapter_bytes"] is None


def test_per_task_frames():
    scores = {"qa": {"examples": 3, "exact_match": 0.5, "token_f1": 0.6, "rouge_l": 0.7, "eval_loss": 1.0,
                     "perplexity": 2.718},
              "heads": {"examples": 2, "exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0, "eval_loss": 0.5,
                        "perplexity": 1.649}}
    one = tables.per_task_frame(scores)
    assert one["task"].tolist() == ["qa", "heads"] and one["examples"].tolist() == [3, 2]
    both = tables.task_comparison_frame({"qa": {"base": scores["heads"], "tuned": scores["qa"]},
                                         "heads": {"base": None, "tuned": scores["heads"]}})
    assert both["token_f1_gain"].tolist()[0] == -0.4 and pd.isna(both["token_f1_gain"].tolist()[1])
    assert list(both.columns) == list(tables.TASK_COMPARISON_COLUMNS)
