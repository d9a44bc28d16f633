"""Bad input fails the asset with a message that names file, line and fix, and writes nothing."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore


def run(project, ft_home, selection):
    recipe = load_recipe(project / "recipe.yaml")
    defs = build_definitions(recipe, home=str(ft_home))
    return dg.materialize(list(defs.assets), resources=defs.resources, selection=selection,
                          instance=instance_of(ft_home), raise_on_error=False)


def instance_of(ft_home, _instances={}) -> dg.DagsterInstance:
    """One Dagster instance per FT_HOME for the whole test, as a deployment has."""
    return _instances.setdefault(str(ft_home), dg.DagsterInstance.ephemeral())


def failure_message(result) -> str:
    return "\n".join(
        ev.step_failure_data.user_failure_data.description
        for ev in result.all_events if ev.is_step_failure and ev.step_failure_data.user_failure_data
    )


def test_unparseable_data_file_fails_with_file_and_line_and_keeps_previous_artifact(project, ft_home):
    assert run(project, ft_home, ["base_model", "sft_dataset"]).success
    store = ArtifactStore(ft_home)
    good = store.latest("sft_dataset")

    data_file = project / "data" / "qa.jsonl"
    lines = data_file.read_text().splitlines()
    lines[4] = '{"question": "broken'
    data_file.write_text("\n".join(lines) + "\n")
    result = run(project, ft_home, ["base_model", "sft_dataset"])
    assert not result.success
    msg = failure_message(result)
    assert f"{data_file}:5: not valid JSON" in msg and "fix or delete this line" in msg
    assert store.latest("sft_dataset") == good
    assert not list(store.slot("sft_dataset", None).glob(".staging-*"))


def test_wrong_column_mapping_names_found_columns(project, ft_home):
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["datasets"][0]["columns"]["question"] = "prompt"
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run(project, ft_home, ["base_model", "sft_dataset"])
    assert not result.success
    msg = failure_message(result)
    assert "column(s) ['prompt'] not found" in msg and "Columns in the file: ['answer', 'context', 'id', 'question']" in msg
    assert ArtifactStore(ft_home).latest("sft_dataset") is None


def test_missing_local_base_model_is_a_clear_failure(project, ft_home):
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["base_model"]["path"] = str(project / "no-such-model")
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run(project, ft_home, ["base_model"])
    assert not result.success and "not a model directory" in failure_message(result)
    assert ArtifactStore(ft_home).latest("base_model") is None


def test_too_many_bad_rows_fails_and_lists_every_rejected_row(project, ft_home):
    rows = [json.loads(line) for line in (project / "data" / "qa.jsonl").read_text().splitlines()]
    for r in rows[:10]:
        r["answer"] = "   "
    (project / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(project, ft_home, ["base_model", "sft_dataset"])
    msg = failure_message(result)
    assert "10 of 48 rows rejected (21% > max_rejected_fraction 10%)" in msg
    report = ArtifactStore(ft_home).slot("sft_dataset", None) / "rejected_rows.jsonl"
    assert str(report) in msg
    listed = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["line"] for r in listed] == list(range(1, 11)) and "empty or whitespace" in listed[0]["reason"]
    assert ArtifactStore(ft_home).latest("sft_dataset") is None
