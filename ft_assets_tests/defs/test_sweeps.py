"""A sweep through the graph: its trials are ordinary adapter partitions, `best_adapter` reads
all of them through a declared partition mapping and names the lowest validation loss."""

from __future__ import annotations

import json

import dagster as dg
import yaml

from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.defs.test_failures import instance_of

TRIALS = ["lora@lr=5e-3", "lora@lr=5e-2"]


def sweep_recipe(project):
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": {**recipe["methods"]["lora"], "sweep": {"lr": [5e-3, 5e-2]}}}
    recipe["training"].update({"max_steps": 8, "epochs": 10, "validation_every": 2})
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(project / "recipe.yaml")


def test_best_adapter_reads_every_trial_and_names_the_lowest_validation_loss(project, ft_home):
    defs = build_definitions(sweep_recipe(project), home=str(ft_home))
    graph = defs.resolve_asset_graph()
    best_key = dg.AssetKey("best_adapter")
    assert graph.get(dg.AssetKey("adapter")).partitions_def.get_partition_keys() == TRIALS
    upstream = graph.get_parents_partitions(best_key, "lora").parent_partitions
    assert {(k.asset_key.to_user_string(), k.partition_key) for k in upstream} == {("adapter", t) for t in TRIALS}

    instance = instance_of(ft_home)

    def run(selection, partition=None):
        result = dg.materialize(list(defs.assets), resources=defs.resources, instance=instance, selection=selection,
                                partition_key=partition, raise_on_error=False)
        assert result.success, [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
        return result

    run(["base_model", "sft_dataset"])
    for trial in TRIALS:
        run(["adapter"], trial)
    result = run(["best_adapter"], "lora")

    store = ArtifactStore(ft_home)
    scores = {t: store.latest("adapter", t).manifest()["train"]["best_validation_loss"] for t in TRIALS}
    winner = min(TRIALS, key=lambda t: scores[t])
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["winner"].value == winner and meta["best_validation_loss"].value == scores[winner]
    rows = meta["trials"].value.records
    assert [r.data["trial"] for r in rows] == sorted(TRIALS, key=lambda t: scores[t])
    assert {r.data["lr"] for r in rows} == {"5e-3", "5e-2"}
    best = json.loads((store.latest("best_adapter", "lora").dir / "best.json").read_text())
    assert best["adapter_version"] == store.latest("adapter", winner).version
    print("validation losses", scores, "winner", winner)
