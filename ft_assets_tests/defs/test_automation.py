"""Declarative automation: what a data, code or recipe change re-runs, and the schedule."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import pytest
import yaml

from ft_assets.training import loop as train
from ft_assets.defs import _common
from ft_assets.defs.automation import record_sources
from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_all
from ft_assets.config.recipe import DEFAULT_RECIPE, DEMO_RECIPE, load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl

EVERYTHING_BELOW_DATA = {
    ("sft_dataset", None), ("quantized_base", None), ("base_eval", None), ("leaderboard", None),
    *((a, m) for a in ("adapter", "merged_model", "eval_report") for m in ("lora", "qlora")),
}


def requested(result) -> set[tuple[str, str | None]]:
    out = set()
    for key in ("base_model", "sft_dataset", "quantized_base", "base_eval", "leaderboard"):
        if result.get_num_requested(dg.AssetKey(key)):
            out.add((key, None))
    for key in ("adapter", "merged_model", "eval_report"):
        for p in result.get_requested_partitions(dg.AssetKey(key)):
            out.add((key, p))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A tiny project materialized as `make demo` does, on a persistent test instance."""
    root = tmp_path_factory.mktemp("auto")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    (root / "recipe.yaml").write_text(yaml.safe_dump(make_recipe(tiny_model_dir)))
    home = root / "ft_home"
    with dg.instance_for_test() as instance:
        recipe = load_recipe(root / "recipe.yaml")
        defs = build_definitions(recipe, home=str(home))
        materialize_all(defs, instance, say=lambda *_: None)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        yield {"root": root, "home": home, "instance": instance, "defs": defs, "cursor": first.cursor,
               "first": first}


def step(world, defs=None, observe_first=True):
    """One daemon tick: the observation sensor's (its events recorded), then the automation's."""
    defs = defs or world["defs"]
    if observe_first:
        record_sources(defs, world["instance"])
    result = dg.evaluate_automation_conditions(defs=defs, instance=world["instance"], cursor=world["cursor"])
    world["cursor"] = result.cursor
    return requested(result)


def run_requested(world, defs, got):
    """Do what the daemon would: launch the requested runs (unpartitioned together, then per partition)."""
    plain = [k for k, p in got if p is None]
    if plain:
        dg.materialize(list(defs.assets), resources=defs.resources, instance=world["instance"], selection=plain)
    for part in sorted({p for _, p in got if p}):
        keys = [k for k, p in got if p == part]
        dg.materialize(list(defs.assets), resources=defs.resources, instance=world["instance"],
                       partition_key=part, selection=keys)


def settle(world, defs, got):
    """Run ticks until nothing more is requested; returns what each later tick requested."""
    later = []
    while got:
        run_requested(world, defs, got)
        got = step(world, defs, observe_first=False)
        later.append(got)
    return later


def test_opening_the_ui_after_the_demo_runs_nothing(world):
    """`make demo`, then `make ui`: the automation's first tick, then the observation sensor's
    first observations (the same versions the demo consumed), then more ticks: no run."""
    assert requested(world["first"]) == set()
    assert step(world) == set() and step(world) == set()


def materialize_adapter(world, partition, **run_config):
    defs = world["defs"]
    config = dg.RunConfig(ops={"adapter": _common.TrainingRun(**run_config)}) if run_config else None
    result = dg.materialize(list(defs.assets), resources=defs.resources, instance=world["instance"],
                            partition_key=partition, selection=["adapter"], run_config=config)
    messages = [e.user_message for e in world["instance"].all_logs(result.run_id)]
    return result.asset_materializations_for_node("adapter")[0].metadata, messages


def test_same_inputs_give_the_same_adapter_version_without_training_and_nothing_downstream(world, monkeypatch):
    before = ArtifactStore(world["home"]).latest("adapter", "lora").version

    def no_training(*args, **kwargs):
        raise AssertionError("trained although inputs, code and settings are unchanged")

    monkeypatch.setattr(train, "train", no_training)
    meta, messages = materialize_adapter(world, "lora")
    assert meta["data_version"].value == before and meta["reused"].value is True
    assert any("reused, nothing trained" in m for m in messages)
    assert step(world) == set()  # a re-materialization with the same version is not news downstream


def test_force_retrains_into_a_version_of_its_own_which_downstream_follows(world):
    store = ArtifactStore(world["home"])
    before = store.latest("adapter", "lora")
    meta, messages = materialize_adapter(world, "lora", force=True)
    forced = store.latest("adapter", "lora")
    assert meta["data_version"].value == forced.version != before.version and "reused" not in meta
    assert any("training (force: true)" in m for m in messages)
    manifest = forced.manifest()
    assert manifest["version_basis"] == "derivation" and manifest["derivation"]["forced_by"]
    assert len(manifest["content_hash"]) == 16  # what the bytes hash to, kept as a fact
    got = step(world)
    assert got == {("merged_model", "lora"), ("eval_report", "lora")}
    assert settle(world, world["defs"], got) == [set()]  # eval_report's content did not change: no leaderboard
    # an unforced identical request now reuses the forced version (the latest made from these inputs)
    meta, _ = materialize_adapter(world, "lora")
    assert meta["data_version"].value == forced.version and meta["reused"].value is True
    assert step(world) == set()


def test_rewriting_a_file_with_the_same_bytes_triggers_nothing(world):
    data_file = world["root"] / "data" / "qa.jsonl"
    data_file.write_bytes(data_file.read_bytes())  # new mtime, same content
    assert step(world) == set()


def test_recipe_edit_of_one_method_reruns_only_that_partition(world):
    path = world["root"] / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["methods"]["lora"]["training"] = {"lr": 1e-3}
    path.write_text(yaml.safe_dump(recipe))
    defs = build_definitions(load_recipe(path), home=str(world["home"]))
    got = step(world, defs)
    assert got == {("adapter", "lora"), ("merged_model", "lora"), ("eval_report", "lora")}
    # the unpartitioned leaderboard follows on the next tick, once eval_report[lora] is new
    assert settle(world, defs, got) == [{("leaderboard", None)}, set()]
    world["defs"] = defs


def test_code_version_bump_reruns_that_stage_and_below(world, monkeypatch):
    bumped = str(int(_common.STAGE_VERSIONS["merged_model"]) + 1)
    monkeypatch.setitem(_common.STAGE_VERSIONS, "merged_model", bumped)
    defs = build_definitions(load_recipe(world["root"] / "recipe.yaml"), home=str(world["home"]))
    got = step(world, defs)
    assert got == {("merged_model", "lora"), ("merged_model", "qlora"), ("eval_report", "lora"),
                   ("eval_report", "qlora")}
    # the bump changed no bytes: merged models and reports keep their versions, so the
    # leaderboard (which reads only report versions) has nothing new to show
    assert settle(world, defs, got) == [set()]
    world["defs"] = defs  # keep the bumped version for the tests after this one


def test_editing_one_row_reruns_exactly_the_descendants(world):
    rows = qa_rows()
    rows[3]["answer"] = "$999 million"
    write_jsonl(world["root"] / "data" / "qa.jsonl", rows)
    got = step(world)
    assert ("base_model", None) not in got  # the base model does not read the data
    later = settle(world, world["defs"], got)
    ran = got.union(*later)
    assert ran == EVERYTHING_BELOW_DATA, sorted(ran ^ EVERYTHING_BELOW_DATA, key=str)
    assert step(world) == set()  # and then it is quiet


def test_retrain_schedule_requests_every_method_partition(tiny_model_dir, tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "qa.jsonl", qa_rows())
    raw = make_recipe(tiny_model_dir, automation={"retrain_cron": "0 3 * * 0", "retrain_schedule_running": True})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    defs = build_definitions(load_recipe(tmp_path / "r.yaml"), home=str(tmp_path / "home"))
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == "0 3 * * 0"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    ctx = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 11, 29, 3, 0),
                                    repository_def=defs.get_repository_def())
    requests = schedule.evaluate_tick(ctx).run_requests
    assert sorted(r.partition_key for r in requests) == ["lora", "qlora"]
    assert all(r.run_config == {} and r.tags["ft_assets/retrain"] == "changed" for r in requests)
    job = defs.resolve_job_def("retrain_job")
    # downstream follows the adapter's version through automation: nothing re-runs below a reused adapter
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"adapter"}

    raw["automation"].update(retrain_force=True, eager=False)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    defs = build_definitions(load_recipe(tmp_path / "r.yaml"), home=str(tmp_path / "home"))
    requests = defs.resolve_schedule_def("retrain_schedule").evaluate_tick(ctx).run_requests
    assert all(r.run_config == {"ops": {"adapter": {"config": {"force": True}}}} for r in requests)
    assert all(r.tags["ft_assets/retrain"] == "force" for r in requests)
    job = defs.resolve_job_def("retrain_job")  # no automation: the job merges and evaluates itself
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"adapter", "merged_model", "eval_report"}


def test_scheduled_retrain_trains_only_what_changed_and_says_so(world):
    """The schedule's run, executed: an unchanged method is reused and logged as such."""
    raw = yaml.safe_load((world["root"] / "recipe.yaml").read_text())
    raw["automation"] = {"retrain_cron": "0 3 * * 0"}
    (world["root"] / "scheduled.yaml").write_text(yaml.safe_dump(raw))
    defs = build_definitions(load_recipe(world["root"] / "scheduled.yaml"), home=str(world["home"]))
    ctx = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 11, 29, 3, 0),
                                    repository_def=defs.get_repository_def())
    request = next(r for r in defs.resolve_schedule_def("retrain_schedule").evaluate_tick(ctx).run_requests
                   if r.partition_key == "qlora")
    before = ArtifactStore(world["home"]).latest("adapter", "qlora").version
    result = defs.resolve_job_def("retrain_job").execute_in_process(
        instance=world["instance"], partition_key=request.partition_key, run_config=request.run_config,
        tags=request.tags)
    messages = [e.user_message for e in world["instance"].all_logs(result.run_id)]
    assert any("adapter[qlora]: version " in m and "reused" in m for m in messages)
    assert ArtifactStore(world["home"]).latest("adapter", "qlora").version == before


def test_gpu_assets_share_one_pool(project, ft_home):
    defs = build_definitions(load_recipe(project / "recipe.yaml"), home=str(ft_home))
    pools = {}
    for a in defs.assets:
        if isinstance(a, dg.AssetsDefinition):
            for key in a.keys:
                pools[key.to_user_string()] = a.node_def.pool if hasattr(a.node_def, "pool") else None
    assert {k for k, p in pools.items() if p == "gpu"} == {
        "base_model", "quantized_base", "adapter", "merged_model", "base_eval", "eval_report",
        "champion"}  # the champion scores its model again when the held-out rows changed
    assert pools["sft_dataset"] is None and pools["leaderboard"] is None
    assert json.dumps(pools)  # plain data


def test_one_running_automation_sensor_covers_data_files_too(project, ft_home):
    # A sensor that leaves the observable sources out makes Dagster add a default sensor for
    # them that starts STOPPED: data files would never be observed under `dagster dev`.
    defs = build_definitions(load_recipe(project / "recipe.yaml"), home=str(ft_home))
    sensors = {s.name: s for s in defs.get_repository_def().sensor_defs}
    assert {n: s.default_status for n, s in sensors.items()} == {
        "ft_assets_automation": dg.DefaultSensorStatus.RUNNING, "ft_assets_observe_sources": dg.DefaultSensorStatus.RUNNING,
        "ft_assets_dead_runs": dg.DefaultSensorStatus.RUNNING}
    targeted = sensors["ft_assets_automation"].asset_selection.resolve(defs.resolve_asset_graph())
    assert {dg.AssetKey(["raw", "qa"]), dg.AssetKey(["recipe", "method"]), dg.AssetKey("adapter")} <= targeted


def test_observation_sensor_records_only_changed_sources(project, ft_home):
    recipe = load_recipe(project / "recipe.yaml")
    sensor = build_definitions(recipe, home=str(ft_home)).resolve_sensor_def("ft_assets_observe_sources")
    with dg.instance_for_test() as instance:
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        keys = sorted((e.asset_key.to_user_string(), e.partition) for e in first.asset_events)
        assert keys == [("raw/qa", None), ("recipe/method", "lora"), ("recipe/method", "qlora")]
        again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert again.asset_events == [] and again.skip_message == "no data file or method setting changed"
        data_file = project / "data" / "qa.jsonl"
        data_file.write_bytes(data_file.read_bytes())  # touched, same bytes: nothing
        assert sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor)).asset_events == []
        rows = qa_rows()
        rows[0]["answer"] = "changed"
        write_jsonl(data_file, rows)
        changed = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert [(e.asset_key.to_user_string(), e.tags["dagster/data_version"]) for e in changed.asset_events] == [
            ("raw/qa", json.loads(changed.cursor)["raw/qa"])]


@pytest.mark.parametrize("shipped", [DEFAULT_RECIPE, DEMO_RECIPE], ids=["default", "demo"])
def test_the_shipped_recipes_start_with_the_retrain_schedule_stopped(ft_home, shipped):
    defs = build_definitions(load_recipe(shipped), home=str(ft_home))
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED and schedule.cron_schedule == "0 3 * * 0"
