"""The champion as a user meets it, through the graph on the persistent instance `make install`
creates: a first model passes the gate against the base and is published (model_card); a retrain
on labels that make the model worse does not move the champion (nor its version or its model
card), the gate check and the champion's metadata say why, and `chat` keeps talking to the
champion; an explicit promotion moves it and is recorded; when new rows arrive the champion is
scored again on them.
The recipe scores with an `evaluate` metric module by path, gated on with `max_regression`.
(`gguf_model` reads the champion the way `model_card` does: test_export_graph converts through it.)"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ft_assets.artifacts.store import ArtifactStore
from ft_assets.cli.chat import resolve
from ft_assets.config.recipe import PACKAGE_DIR, load_recipe
from ft_assets.data.sft_dataset import load_split
from ft_assets.definitions import build_definitions
from ft_assets.demo import ensure_instance
from ft_assets_tests.conftest import qa_rows, write_jsonl
from ft_assets_tests.defs.conftest import tiny_recipe

FIGURES = PACKAGE_DIR / "recipes" / "metrics" / "figure_recall.py"
FIRST = ["base_model", "sft_dataset", "base_eval"]
CHAIN = ["sft_dataset", "adapter", "merged_model", "eval_report", "champion", "model_card"]


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("gated")
    recipe = tiny_recipe(tiny_model_dir,
                         evaluation={"max_new_tokens": 8, "batch_size": 8,
                                     "evaluators": [{"type": "evaluate", "name": "figures", "path": str(FIGURES)}],
                                     # the tiny model's 8-token answers score no F1: its answer loss separates models
                                     "gate": {"metric": "eval_loss", "min_delta": 0.0,
                                              "max_regression": {"figures.figure_recall": 0.5}}})
    recipe["methods"] = {"lora": recipe["methods"]["lora"]}
    recipe["training"]["max_steps"] = 20  # three trainings: enough to tell a good model from a bad one by loss
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGSTER_HOME", str(root / "dagster"))
    instance = ensure_instance(root)
    yield root, instance
    mp.undo()


def materialize(root: Path, instance, selection: list[str], **kw) -> dg.ExecuteInProcessResult:
    defs = build_definitions(load_recipe(root / "recipe.yaml"), home=str(root / "ft_home"))
    return dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=selection, **kw)


def gate_check(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "gate"]
    return check


def record(store: ArtifactStore) -> tuple[str, dict]:
    art = store.latest("champion", "lora")
    return art.version, json.loads((art.dir / "champion.json").read_text())


def test_a_worse_retrain_does_not_move_the_champion_and_says_why(gated):
    root, instance = gated
    store = ArtifactStore(root / "ft_home")
    materialize(root, instance, FIRST)
    first = materialize(root, instance, CHAIN, partition_key="lora")
    assert gate_check(first).passed  # the first model against the base, on the same rows
    version, held = record(store)
    good_report = store.latest("eval_report", "lora")
    assert held["eval_report"] == good_report.version and held["promoted"]["against"] == "base"
    assert "figures.figure_recall" in json.loads((good_report.dir / "metrics.json").read_text())["tuned"]
    published = store.latest("model_card", "lora")
    assert published.manifest()["inputs"]["eval_report[lora]"] == good_report.version
    assert published.manifest()["inputs"]["merged_model[lora]"] == held["model"]["merged_model"]

    # the retrain: every training row's answer replaced by a useless label; the held-out rows as they were
    held_out = {ex.id for ex in load_split(store.latest("sft_dataset").path, "eval")}
    bad = [r if r["id"] in held_out else {**r, "answer": "unknown"} for r in qa_rows()]
    write_jsonl(root / "data" / "qa.jsonl", bad)
    second = materialize(root, instance, CHAIN, partition_key="lora")
    assert store.latest("eval_report", "lora").version != good_report.version  # a new model was evaluated
    check = gate_check(second)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "not promoted" in check.metadata["decision"].value and "eval_loss" in check.metadata["decision"].value
    assert record(store) == (version, held)  # same model, same record, same version: nothing downstream moves
    assert store.latest("model_card", "lora").version == published.version  # publishes the champion still
    # `chat` (no model named, or champion[lora]) talks to the champion, not to the newest merged model
    newest = store.latest("merged_model", "lora").version
    for ref in (None, "champion[lora]"):
        chosen = resolve(ref, store)
        assert (chosen.asset, chosen.version) == ("merged_model", held["model"]["merged_model"]) and chosen.version != newest

    # the UI's view: the champion's latest materialization on the instance says why it stayed
    event = instance.get_latest_materialization_event(dg.AssetKey("champion"))
    meta = event.asset_materialization.metadata
    assert meta["promoted"].value is False and meta["champion_eval_report"].value == good_report.version
    rows = {r.data["score"]: r.data for r in meta["gate"].value.records}
    assert rows["eval_loss"]["ok"] is False and rows["eval_loss"]["change"] < 0  # change: positive = better

    # forcing is explicit and recorded
    forced = materialize(root, instance, ["champion"], partition_key="lora",
                         run_config={"ops": {"champion": {"config": {"promote": True}}}})
    assert not gate_check(forced).passed
    new_version, new = record(store)
    assert new_version != version and new["promoted"]["forced"] is True
    assert new["eval_report"] == store.latest("eval_report", "lora").version

    # new rows arrive (good labels again): the held-out rows changed, so the champion (the forced,
    # worse model) is scored again on the new rows before the comparison, and the better model wins
    write_jsonl(root / "data" / "qa.jsonl", qa_rows(64))
    third = gate_check(materialize(root, instance, CHAIN[:-1], partition_key="lora"))  # no card this time
    assert third.passed and "scored again on this report's rows" in third.metadata["compared_with"].value
    assert record(store)[1]["eval_report"] == store.latest("eval_report", "lora").version
