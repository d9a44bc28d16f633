"""An unpaired preference set (`preferences.schema: unpaired`, TRL's KTO form) through Dagster on the
tiny model: preference_dataset[kto] stores labelled answers and previews them as such, its `usable`
check passes, preference_adapter[kto] trains on them (steps count answers) and eval_report[kto]
scores its held-out answers by label."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from ft_assets.artifacts.store import ArtifactStore
from ft_assets.config.recipe import load_recipe
from ft_assets.data import preferences
from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_graph
from ft_assets.training.steps import recipe_step_estimates
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl

TARGETS = {("base_model", None), ("sft_dataset", None), ("base_eval", None), ("adapter", "lora"),
           ("preference_dataset", "kto"), ("preference_adapter", "kto"), ("merged_model", "kto"), ("eval_report", "kto")}


def answer_rows(n: int = 8) -> list[dict]:
    """TRL's unpaired rows: per question, the right unit (desirable) and the wrong one (undesirable)."""
    return [{"id": f"{r['id']}-{good}", "prompt": f"Context:\n{r['context']}\n\nQuestion: {r['question']}",
             "completion": r["answer"] if good else r["answer"].replace("million", "billion"), "label": good}
            for r in qa_rows(n) for good in (True, False)]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("kto_unpaired")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows(16))
    write_jsonl(root / "data" / "answers.jsonl", answer_rows())
    recipe = make_recipe(
        tiny_model_dir, quantization={"method": "none"}, training={"max_steps": 2, "batch_size": 4, "lr": 5e-3,
                                                                  "warmup_ratio": 0.0},
        methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                 "kto": {"sft_from": "lora", "training": {"max_steps": 100, "epochs": 1, "batch_size": 4}}},
        preferences={"name": "answers", "path": "data/answers.jsonl", "schema": "unpaired", "columns": {"id": "id"},
                     "eval_fraction": 0.25},
        evaluation={"max_new_tokens": 4, "batch_size": 8})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with dg.instance_for_test() as instance:
        recipe = load_recipe(root / "recipe.yaml")
        defs = build_definitions(recipe, home=str(root / "ft_home"))
        failed = materialize_graph(defs, instance, {(dg.AssetKey(k), p) for k, p in TARGETS}, say=lambda *_: None)
        assert not failed, failed
        yield {"instance": instance, "recipe": recipe, "store": ArtifactStore(root / "ft_home")}


def meta(world, key: str, partition: str) -> dict:
    events = world["instance"].fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition]), limit=1).records
    return events[0].asset_materialization.metadata


def test_kto_trains_on_unpaired_answers_through_the_graph(world):
    store = world["store"]
    # preference_dataset[kto]: labelled answers, previewed as such, checked usable
    prefs = store.latest("preference_dataset", "kto")
    info = json.loads((prefs.dir / "dataset_info.json").read_text())
    assert info["form"] == "unpaired" and info["train_rows"] == 12 and info["eval_rows"] == 4
    train = preferences.load_pairs(prefs.dir, "train")
    assert preferences.is_unpaired(train) and info["train_desirable"] == sum(a.label for a in train)
    md = meta(world, "preference_dataset", "kto")
    assert md["train_answers"].value == 12 and md["form"].value == "unpaired" and "train_pairs" not in md
    assert [c.name for c in md["preview"].schema.columns] == ["id", "prompt", "completion", "label", "tokens"]
    (check,) = world["instance"].event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("preference_dataset"), "usable"), limit=1)
    assert check.status.value == "SUCCEEDED"  # (FAILED: the check ran and did not pass)
    # preference_adapter[kto]: one row per answer (12 answers, 4 a step, one epoch: 3 steps)
    kto = store.latest("preference_adapter", "kto")
    train_record = kto.manifest()["train"]
    assert train_record["steps"] == 3 and train_record["answers_seen"] == 12 and "pairs_seen" not in train_record
    assert meta(world, "preference_adapter", "kto")["train_answers"].value == 12
    estimate = recipe_step_estimates(world["recipe"]).methods["kto"]
    assert estimate.steps == 3 and estimate.unit == "labelled answers"
    # eval_report[kto]: the held-out answers scored by label against the SFT adapter
    pm = json.loads((store.latest("eval_report", "kto").dir / "preference_metrics.json").read_text())
    assert pm["form"] == "unpaired" and pm["answers"] == 4 and set(pm) >= {"base", "sft", "kto"}
    assert {"reward_desirable", "reward_undesirable", "reward_margin", "reward_sign_accuracy"} <= set(pm["kto"])
    md = meta(world, "eval_report", "kto")
    assert md["reward_margin"].value == pm["kto"]["reward_margin"] and "preference_accuracy" not in md
    assert md["preference_answers"].value == 4
