"""Every method family goes through the Dagster graph: mergeable ones are merged and checked,
the others record why in merged_model and are evaluated in adapter form."""

from __future__ import annotations

import json

import dagster as dg
import yaml

from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_all
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore


def test_non_mergeable_and_custom_methods_materialize_end_to_end(project, ft_home):
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"prefix": {"num_virtual_tokens": 4}, "bottleneck": {"reduction_factor": 8},
                         "delta_lora": {"r": 4, "alpha": 8}, "last_layers": {"n_layers": 1}}
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    r = load_recipe(project / "recipe.yaml")
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(build_definitions(r, home=str(ft_home)), instance, say=lambda *_: None)

    store = ArtifactStore(ft_home)
    for name, mergeable in (("prefix", False), ("bottleneck", False), ("delta_lora", True), ("last_layers", True)):
        merged = store.latest("merged_model", name)
        status = json.loads((merged.dir / "merge_status.json").read_text())
        assert status["mergeable"] is mergeable, name
        if not mergeable:
            assert status["reason"] and not (merged.dir / "model.safetensors").exists()
        metrics = json.loads((store.latest("eval_report", name).dir / "metrics.json").read_text())
        assert metrics["evaluated_as"] == ("merged" if mergeable else "adapter")
        assert metrics["tuned"]["examples"] == metrics["base"]["examples"] > 0
    board = json.loads((store.latest("leaderboard").dir / "leaderboard.json").read_text())
    assert board["missing"] == [] and len(board["rows"]) == 5
    # the check passed where there was a merge to compare, and was never evaluated where there was none
    # (Dagster shows it skipped), rather than reported passed for a comparison never made
    check = dg.AssetCheckKey(dg.AssetKey("merged_model"), "matches_adapter")
    outcome = {}
    for rec in instance.event_log_storage.get_asset_check_execution_history(check, limit=10):
        partition = instance.get_run_by_id(rec.run_id).tags["dagster/partition"]
        outcome[partition] = rec.status.value
    assert outcome == {"delta_lora": "SUCCEEDED", "last_layers": "SUCCEEDED", "prefix": "PLANNED", "bottleneck": "PLANNED"}
