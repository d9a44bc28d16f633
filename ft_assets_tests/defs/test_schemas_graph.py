"""Every dataset schema through the whole graph on the tiny model: qa (jsonl), messages (a
`format: hf` save_to_disk dataset, loaded offline), prompt_completion (csv), alpaca (parquet)."""

from __future__ import annotations

import csv
import json

import dagster as dg
import pytest
import yaml

from ft_assets.data import rows as data, sft_dataset
from ft_assets.data.hfdata import source_version
from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_all
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl


def chats(n: int) -> list[dict]:
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": "Answer with the figure only."}] if i % 2 else []
        turns += [{"role": "user", "content": f"Unit {i} sold {10 + i} cars and {20 + i} bikes. How many cars?"},
                  {"role": "assistant", "content": f"{10 + i} cars"},
                  {"role": "user", "content": "And bikes?"},
                  {"role": "assistant", "content": f"{20 + i} bikes"}]
        out.append({"id": f"chat{i}", "messages": turns})
    return out


@pytest.fixture
def schemas_project(tmp_path, tiny_model_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "qa.jsonl", qa_rows(16))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats(16)),
                          "test": datasets.Dataset.from_list(chats(2))}).save_to_disk(str(d / "chat_hf"))
    with (d / "pc.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "completion"])
        w.writerows([f"Spell the number {i} in digits.", f"{i}"] for i in range(16))
    pq.write_table(pa.Table.from_pylist(
        [{"instruction": "Classify the headline.", "input": f"Unit {i} profit {'rose' if i % 2 else 'fell'}.",
          "output": "positive" if i % 2 else "negative"} for i in range(16)]), d / "alpaca.parquet")
    recipe = make_recipe(tiny_model_dir, datasets=[
        {"name": "qa", "path": "data/qa.jsonl", "columns": {"id": "id"}, "eval_fraction": 0.25},
        {"name": "chat", "path": "data/chat_hf", "format": "hf", "split": "train", "schema": "messages",
         "columns": {"id": "id"}, "train_on": "all_assistant", "eval_fraction": 0.25},
        {"name": "pc", "path": "data/pc.csv", "format": "csv", "schema": "prompt_completion", "eval_fraction": 0.25},
        {"name": "alp", "path": "data/alpaca.parquet", "format": "parquet", "schema": "alpaca", "eval_fraction": 0.25},
    ], methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return tmp_path


def test_every_schema_trains_and_evaluates_through_the_graph(schemas_project, ft_home):
    recipe = load_recipe(schemas_project / "recipe.yaml")
    defs = build_definitions(recipe, home=str(ft_home))
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_all(defs, instance, say=lambda *_: None) == []
    store = ArtifactStore(ft_home)
    sft = store.latest("sft_dataset")
    info = data.dataset_info(sft.path)
    assert {t: s["kept"] for t, s in info["sources"].items()} == {"qa": 16, "chat": 16, "pc": 16, "alp": 16}
    assert info["rejected_rows"] == 0
    chat_eval = [e for e in sft_dataset.load_split(sft.path, "eval") if e.task == "chat"]
    assert len(chat_eval) == 4 and all(e.messages and e.answer.endswith("bikes") for e in chat_eval)
    # the raw dataset's version is the content hash of the save_to_disk directory's data files
    version = sft.manifest()["inputs"]["raw/chat"]
    assert version == source_version(schemas_project / "data" / "chat_hf") != "missing" and len(version) == 16
    report = store.latest("eval_report", "lora")
    metrics = json.loads((report.dir / "metrics.json").read_text())
    assert set(metrics["tuned"]["per_task"]) == {"qa", "chat", "pc", "alp"}
    rows = [json.loads(line) for line in (report.dir / "predictions.jsonl").read_text().splitlines()]
    chat_rows = [r for r in rows if r["task"] == "chat"]
    assert {r["question"] for r in chat_rows} == {"And bikes?"}  # eval asks the last user turn, in context
    assert {r["reference"] for r in chat_rows} == {e.answer for e in chat_eval}


def test_conversational_preferences_from_an_hf_dataset_through_the_graph(tmp_path, tiny_model_dir, ft_home):
    """`preferences:` in TRL's conversational form, a save_to_disk DatasetDict read offline by
    split: preference_dataset[dpo] materializes, its pairs keep their turns, its input version is
    the directory's content hash."""
    import datasets

    from ft_assets.data import preferences
    from ft_assets.demo import materialize_graph

    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "qa.jsonl", qa_rows(16))
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Unit {i} sold {10 + i} cars. How many?"}],
              "chosen": [{"role": "assistant", "content": f"{10 + i} cars"}],
              "rejected": [{"role": "assistant", "content": f"{20 + i} cars"}]} for i in range(12)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs),
                          "test": datasets.Dataset.from_list(pairs[:2])}).save_to_disk(str(d / "prefs_hf"))
    recipe = make_recipe(tiny_model_dir, datasets=[{"name": "qa", "path": "data/qa.jsonl", "columns": {"id": "id"}}],
                         methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "dpo": {"sft_from": "lora"}},
                         preferences={"name": "prefs", "path": "data/prefs_hf", "format": "hf", "split": "train",
                                      "schema": "messages", "columns": {"id": "id"}, "eval_fraction": 0.25})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    defs = build_definitions(load_recipe(tmp_path / "recipe.yaml"), home=str(ft_home))
    targets = {(dg.AssetKey("base_model"), None), (dg.AssetKey("preference_dataset"), "dpo")}
    assert materialize_graph(defs, dg.DagsterInstance.ephemeral(), targets, say=lambda *_: None) == []
    art = ArtifactStore(ft_home).latest("preference_dataset", "dpo")
    train, evals = preferences.load_pairs(art.path, "train"), preferences.load_pairs(art.path, "eval")
    assert len(train) + len(evals) == 12 and len(evals) == 3
    assert all(p.messages == [{"role": "user", "content": p.prompt}] and p.chosen.endswith("cars") for p in train)
    assert art.manifest()["inputs"]["raw/prefs"] == source_version(d / "prefs_hf") != "missing"
