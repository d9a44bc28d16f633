"""Several recipes in one deployment: each a pipeline with prefixed keys, its own groups, jobs,
sensors and store namespace; the base model read from one file is converted once and shared."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ft_assets.definitions import build_definitions
from ft_assets.defs.automation import record_sources
from ft_assets import demo
from ft_assets.config.recipe import RecipeError, load_recipes
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def two_recipes(root: Path, model_dir: Path, **second) -> Path:
    """recipes/finance.yaml and recipes/legal.yaml: one base model file, the same method name
    (`lora`) with different learning rates, each its own data file."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    write_jsonl(root / "data" / "legal.jsonl", qa_rows()[::-1][:-2])
    recipes = root / "recipes"
    recipes.mkdir(exist_ok=True)
    common = {"quantization": {"method": "none"}, "root": "..",
              "training": {"max_steps": 3, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0},
              "evaluation": {"max_new_tokens": 4, "batch_size": 8, "max_examples": 4}}
    finance = make_recipe(model_dir, name="finance", methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, **common)
    legal = make_recipe(model_dir, name="legal-qa", methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                                      "training": {"lr": 1e-2}}}, **common)
    legal["datasets"] = [{**legal["datasets"][0], "name": "legal", "path": "data/legal.jsonl"}]
    legal.update(second)
    (recipes / "finance.yaml").write_text(yaml.safe_dump(finance, sort_keys=False))
    (recipes / "legal.yaml").write_text(yaml.safe_dump(legal, sort_keys=False))
    return recipes


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir):
    """What `FT_RECIPE=<dir> make demo` does: both pipelines materialized end to end by the demo,
    in its persistent instance (the gpu pool limited to 1) and one store."""
    root = tmp_path_factory.mktemp("deployment")
    recipes_dir = two_recipes(root, tiny_model_dir)
    home = root / "ft_home"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"FT_RECIPE": str(recipes_dir), "FT_HOME": str(home),
                            "DAGSTER_HOME": str(home / "dagster")}.items():
            mp.setenv(name, value)
        sigterm = signal.getsignal(signal.SIGTERM)  # the demo installs its own handler
        try:
            with contextlib.redirect_stdout(out):
                rc = demo.main()
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        assert rc == 0, out.getvalue()
        instance = demo.ensure_instance(home)
    recipes = load_recipes(recipes_dir)
    yield recipes, build_definitions(recipes, home=str(home)), instance, home, out.getvalue()
    instance.dispose()


def latest(instance, key: str, partition: str | None = None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey.from_user_string(key),
                              asset_partitions=[partition] if partition else None), limit=1).records
    return records[0].asset_materialization


def test_each_recipe_is_a_pipeline_of_its_own(deployment):
    recipes, defs, instance, home, _ = deployment
    assert [r.pipeline for r in recipes] == ["finance", "legal_qa"]
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for p in ("finance", "legal_qa"):
        assert {f"{p}/adapter", f"{p}/merged_model", f"{p}/eval_report", f"{p}/leaderboard", f"{p}/base_model",
                f"{p}/recipe/method"} <= keys
    assert keys == {k for k in keys if k.split("/")[0] in ("finance", "legal_qa")}  # nothing unprefixed
    assert {"finance/raw/qa", "legal_qa/raw/legal"} <= keys
    for key in graph.get_all_asset_keys():  # the UI lists each pipeline's groups apart
        node = graph.get(key)
        assert node.group_name.startswith(key.path[0] + "_"), key
        assert node.is_external or node.tags["ft_assets/pipeline"] == key.path[0], key
    assert {s.name for s in defs.sensors} == {"finance__ft_assets_observe_sources", "legal_qa__ft_assets_observe_sources",
                                              "ft_assets_automation", "ft_assets_dead_runs"}

    # same method name, separate artifacts: each pipeline's adapter trained on its own data and settings
    fin, leg = ArtifactStore(home, "finance"), ArtifactStore(home, "legal_qa")
    fin_adapter, leg_adapter = fin.latest("adapter", "lora"), leg.latest("adapter", "lora")
    assert fin_adapter.asset == "finance.adapter" and leg_adapter.asset == "legal_qa.adapter"
    assert fin_adapter.version != leg_adapter.version
    assert fin_adapter.version == latest(instance, "finance/adapter", "lora").tags["dagster/data_version"]
    fin_inputs = fin_adapter.manifest()["inputs"]
    assert fin_inputs["finance.sft_dataset"] == fin.latest("sft_dataset").version != leg.latest("sft_dataset").version
    assert fin.latest("eval_report", "lora").manifest()["inputs"]["finance.merged_model[lora]"] == \
        fin.latest("merged_model", "lora").version


def test_the_base_model_is_converted_once_and_shared(deployment):
    recipes, defs, instance, home, _ = deployment
    first, second = latest(instance, "finance/base_model"), latest(instance, "legal_qa/base_model")
    assert first.tags["dagster/data_version"] == second.tags["dagster/data_version"]
    reused = [m.metadata["reused"].value if "reused" in m.metadata else False for m in (first, second)]
    assert sorted(reused) == [False, True]  # one converted, the other found that version and reused it
    store = ArtifactStore(home)
    assert [d.name for d in store.slot("base_model", None).iterdir() if not d.name.endswith(".json")] == \
        [first.tags["dagster/data_version"]]
    assert {v.asset for v in store.stored_versions()} >= {"base_model", "finance.adapter", "legal_qa.adapter"}
    # both adapters name that one version as their base
    for p in ("finance", "legal_qa"):
        adapter = ArtifactStore(home, p).latest("adapter", "lora")
        assert adapter.manifest()["inputs"]["base_model"] == first.tags["dagster/data_version"]


def test_the_demo_reports_each_pipeline(deployment):
    *_, home, out = deployment
    assert "(recipe finance, legal-qa)" in out
    for p in ("finance", "legal_qa"):
        assert f"[demo] {p}/    lora: token F1" in out and f"[demo] {p}/leaderboard: {home}/artifacts/{p}.leaderboard/" in out


def test_lineage_reads_a_pipelines_artifact_back(deployment):
    _, _, _, home, _ = deployment
    report = ArtifactStore(home, "finance").latest("eval_report", "lora")
    out = subprocess.run([sys.executable, "-m", "ft_assets", "lineage", report.path, "--json"],
                         env={**os.environ, "FT_HOME": str(home)}, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    tree = json.loads(out.stdout)
    names = set()

    def walk(node):
        names.add(node["asset"])
        assert not node.get("missing"), node
        for child in node.get("inputs", []):
            walk(child)
    walk(tree)
    assert {"finance.eval_report", "finance.merged_model", "finance.adapter", "finance.sft_dataset",
            "base_model"} <= names


def test_the_code_location_loads_several_recipes(tmp_path, tiny_model_dir):
    """What `make ui` loads (workspace.yaml's module), with FT_RECIPE naming a directory of recipes."""
    recipes_dir = two_recipes(tmp_path, tiny_model_dir)
    env = {**os.environ, "FT_RECIPE": str(recipes_dir), "FT_HOME": str(tmp_path / "ft_home"),
           "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                          str(REPO / "workspace.yaml")], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_pipelines_need_distinct_names_and_one_machine(tmp_path, tiny_model_dir):
    clash = two_recipes(tmp_path / "a", tiny_model_dir, name="finance")
    with pytest.raises(RecipeError, match="gives pipeline 'finance'.*own name"):
        load_recipes(clash)
    machines = two_recipes(tmp_path / "b", tiny_model_dir, compute={"device": "cpu", "threads": 1})
    with pytest.raises(RecipeError, match="same compute settings"):
        load_recipes(machines)
    one = load_recipes(f"{machines / 'finance.yaml'}")
    assert [r.pipeline for r in one] == [None]  # one recipe keeps today's bare keys
    with pytest.raises(ValueError, match="distinct pipeline names"):
        build_definitions([one[0], one[0]])


def test_a_data_edit_reruns_only_its_own_pipeline(deployment):
    """After the demo nothing is due; one row edited in legal's data file makes the automation's
    next tick request legal_qa's assets below it (the adapters follow on later ticks, once the
    new sft_dataset exists, as with one recipe) and nothing of finance's. (Runs last: it edits the file.)"""
    _, defs, instance, home, _ = deployment
    graph_keys = defs.resolve_asset_graph().get_all_asset_keys()

    def requested(result) -> set[str]:
        return {k.to_user_string() for k in graph_keys if result.get_num_requested(k)}

    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(first) == set()  # the demo recorded what both pipelines consumed
    rows = qa_rows()[::-1][:-2]
    rows[0]["answer"] = "an edited answer"
    write_jsonl(home.parent / "data" / "legal.jsonl", rows)
    record_sources(defs, instance)  # the observation sensors' tick
    got = requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor))
    assert {"legal_qa/sft_dataset", "legal_qa/base_eval"} <= got, got
    assert all(k.startswith("legal_qa/") for k in got), got
