"""The evaluation tables on a materialized graph (tiny model, two tasks, one method): Parquet/CSV
files in the artifacts, and the UI metadata `dagster/column_schema`, `dagster/row_count`, previews."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest
import yaml

from ft_assets.evaluation import tables
from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_all
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval_tables")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows(24))
    write_jsonl(root / "data" / "heads.jsonl", [{"id": f"h{i}", "question": "Sentiment?", "context": f"Firm {i} beats",
                                                 "answer": "positive"} for i in range(12)])
    recipe = make_recipe(tiny_model_dir, quantization={"method": "none"},
                         datasets=[{"name": "qa", "path": "data/qa.jsonl", "columns": {"id": "id"}, "eval_fraction": 0.25},
                                   {"name": "heads", "path": "data/heads.jsonl", "columns": {"id": "id"},
                                    "eval_fraction": 0.25}],
                         methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                         training={"max_steps": 2, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    home = root / "ft_home"
    mp = pytest.MonkeyPatch()
    mp.setenv("FT_HOME", str(home))
    defs = build_definitions(load_recipe(root / "recipe.yaml"), home=str(home))
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_all(defs, instance, say=lambda *_: None) == []
    yield instance, ArtifactStore(home)
    mp.undo()


def metadata(instance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return event.asset_materialization.metadata


def column_names(value) -> list[str]:
    return [col.name for col in value.schema.columns]


@pytest.mark.parametrize("asset", ["base_eval", "eval_report"])
def test_predictions_are_parquet_and_csv_and_described_in_the_ui(evaluated, asset):
    instance, store = evaluated
    art = store.latest(asset, "lora" if asset == "eval_report" else None)
    jsonl = [json.loads(line) for line in (art.dir / "predictions.jsonl").open()]
    parquet = pd.read_parquet(art.dir / "predictions.parquet")
    assert list(parquet.columns) == list(tables.PREDICTION_COLUMNS) and len(parquet) == len(jsonl) == 9  # 6 qa + 3 heads
    assert parquet["id"].tolist() == [r["id"] for r in jsonl]
    assert parquet["token_f1"].tolist() == [float(r["token_f1"]) for r in jsonl]
    assert pd.read_csv(art.dir / "predictions.csv")["id"].tolist() == [r["id"] for r in jsonl]
    per_task = pd.read_parquet(art.dir / "per_task.parquet")
    assert sorted(per_task["task"]) == ["heads", "qa"]

    meta = metadata(instance, asset)
    schema = meta["dagster/column_schema"]
    assert isinstance(schema, dg.TableSchemaMetadataValue)
    assert [(c.name, c.type) for c in schema.schema.columns] == [
        ("id", "string"), ("task", "string"), ("question", "string"), ("reference", "string"),
        ("prediction", "string"), ("exact_match", "float"), ("token_f1", "float"), ("rouge_l", "float")]
    assert meta["dagster/row_count"].value == 9
    preview = meta["predictions"]
    assert isinstance(preview, dg.TableMetadataValue) and column_names(preview) == list(tables.PREDICTION_COLUMNS)
    assert [r.data["id"] for r in preview.records] == [r["id"] for r in jsonl][: len(preview.records)]
    assert sorted(r.data["task"] for r in meta["per_task"].records) == ["heads", "qa"]


def test_leaderboard_is_parquet_and_csv_and_described_in_the_ui(evaluated):
    instance, store = evaluated
    art = store.latest("leaderboard")
    rows = json.loads((art.dir / "leaderboard.json").read_text())["rows"]
    parquet = pd.read_parquet(art.dir / "leaderboard.parquet")
    assert parquet["method"].tolist() == [r["method"] for r in rows] == ["lora", "base"]
    assert parquet["token_f1"].tolist() == [r["token_f1"] for r in rows]
    assert pd.read_csv(art.dir / "leaderboard.csv")["method"].tolist() == ["lora", "base"]
    meta = metadata(instance, "leaderboard")
    assert meta["dagster/row_count"].value == 2
    assert column_names(meta["dagster/column_schema"]) == list(tables.BOARD_COLUMNS)
    kinds = {c.name: c.type for c in meta["dagster/column_schema"].schema.columns}
    assert kinds["trainable_parameters"] == "int" and kinds["token_f1"] == "float" and kinds["method"] == "string"
    board = meta["leaderboard"]
    assert [r.data["method"] for r in board.records] == ["lora", "base"]
    assert board.records[1].data["trainable_parameters"] is None  # the base row has no training facts
