"""The whole graph, materialized with Dagster on the tiny model (ephemeral instance)."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ft_assets.methods.lora import LoraMethod
from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_all
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import qa_rows, write_jsonl, write_tiny_project


@pytest.fixture(scope="module")
def graph(tmp_path_factory, tiny_model_dir):
    """The whole graph of the tiny project, materialized once for the tests that only read it."""
    project = write_tiny_project(tmp_path_factory.mktemp("graph"), tiny_model_dir)
    ft_home = project / "ft_home"
    with pytest.MonkeyPatch.context() as mp:  # conftest's ft_home, for the materialization
        mp.setenv("FT_HOME", str(ft_home))
        recipe = load_recipe(project / "recipe.yaml")
        defs = build_definitions(recipe, home=str(ft_home))
        instance = dg.DagsterInstance.ephemeral()
        materialize_all(defs, instance, say=lambda *_: None)
    return recipe, defs, instance, ArtifactStore(ft_home)


def with_shared_assets(project, ft_home):
    """(defs, ephemeral instance) with the unpartitioned assets materialized."""
    defs = build_definitions(load_recipe(project / "recipe.yaml"), home=str(ft_home))
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(list(defs.assets), instance=instance, resources=defs.resources,
                   selection=["base_model", "sft_dataset", "quantized_base", "base_eval"])
    return defs, instance


def test_every_asset_materializes_with_manifest(graph):
    recipe, defs, instance, store = graph
    for asset in ("base_model", "sft_dataset", "quantized_base", "base_eval"):
        art = store.latest(asset)
        assert art is not None, asset
        m = art.manifest()
        assert m["asset"] == asset and m["version"] == art.version
        assert m["recipe_hash"] == recipe.recipe_hash and m["seed"] == recipe.seed
        assert "torch" in m["libraries"] and m["created"]
    for method in recipe.methods:
        for asset in ("adapter", "merged_model", "eval_report"):
            assert store.latest(asset, method) is not None, (asset, method)
    # manifests name the exact upstream versions
    lora = store.latest("adapter", "lora").manifest()
    assert lora["inputs"] == {"sft_dataset": store.latest("sft_dataset").version,
                              "base_model": store.latest("base_model").version}
    qlora = store.latest("adapter", "qlora").manifest()
    assert qlora["inputs"]["quantized_base"] == store.latest("quantized_base").version


def test_metrics_json_shape(graph):
    _, _, _, store = graph
    for method in ("lora", "qlora"):
        metrics = json.loads((store.latest("eval_report", method).dir / "metrics.json").read_text())
        for side in ("base", "tuned"):
            for key in ("exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity"):
                assert isinstance(metrics[side][key], float), (method, side, key)


def test_base_eval_and_eval_report_say_how_fast_the_questions_were_answered(graph):
    recipe, _, instance, _ = graph
    for key, partition in (("base_eval", None), ("eval_report", "lora")):
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None),
            limit=1).records[0]
        meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
        questions = meta["dagster/row_count"]  # the predictions table: one row per question
        # at least one token per question (end-of-turn), at most the budget; the rates are those
        # counts over the generation time (rounded: 2 decimals of seconds)
        tokens, seconds = meta["eval_generated_tokens"], meta["eval_generate_s"]
        assert questions <= tokens <= questions * recipe.evaluation.max_new_tokens, (key, meta)
        assert seconds > 0 and meta["eval_questions_per_s"] > 0 and meta["eval_generated_tokens_per_s"] > 0
        assert abs(meta["eval_questions_per_s"] * seconds - questions) <= 0.01 * meta["eval_questions_per_s"] + 0.01
        assert abs(meta["eval_generated_tokens_per_s"] * seconds - tokens) <= 0.01 * meta["eval_generated_tokens_per_s"] + 0.01


def test_adapters_train_and_load_with_plain_peft(graph):
    _, _, _, store = graph
    base_dir = store.latest("base_model").path
    lora = store.latest("adapter", "lora")
    log = json.loads((lora.dir / "train_log.json").read_text())
    assert log["steps"] == 4 and len(log["losses"]) == 4 and log["tokens_trained"] > 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora.path)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(store.latest("merged_model", "lora").path)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_asset_checks_pass(graph):
    _, defs, instance, _ = graph
    for check_key in (dg.AssetCheckKey(dg.AssetKey("sft_dataset"), "trainable"),
                      dg.AssetCheckKey(dg.AssetKey("merged_model"), "matches_adapter")):
        records = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=5)
        assert records, check_key
        for rec in records:
            evaluation = rec.event.dagster_event.event_specific_data
            assert evaluation.passed, (check_key, evaluation.metadata)
            if check_key.name == "matches_adapter":  # relative to the logit scale, well inside rounding
                meta = {k: v.value for k, v in evaluation.metadata.items()}
                assert 0 < meta["relative_diff"] < meta["tolerance"] and meta["logit_scale"] > 0, meta
                assert meta["layer_relative_diff"] < meta["layer_tolerance"], meta


def test_matches_adapter_fails_on_a_merge_that_drops_one_adapter_layer(project, ft_home, monkeypatch):
    """A planted merge bug: the last layer's q_proj update (the smallest effect measured on the tiny
    model) is left out of the QLoRA merge; the check must fail, on any CPU."""

    def merge_without_last_q_proj(self, base, adapter_dir):
        model = self.load(base, adapter_dir)
        q_projs = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_B")]
        q_projs[-1].lora_B["default"].weight.data.zero_()
        return model.merge_and_unload()

    monkeypatch.setattr(LoraMethod, "merge", merge_without_last_q_proj)
    defs, instance = with_shared_assets(project, ft_home)
    result = dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, partition_key="qlora",
                            selection=["adapter", "merged_model"])
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "matches_adapter" and not check.passed
    meta = {k: v.value for k, v in check.metadata.items()}
    assert meta["relative_diff"] > 100 * meta["tolerance"], meta
    assert meta["layer_relative_diff"] > 10_000 * meta["layer_tolerance"], meta
    assert meta["worst_layer"] == "model.layers.1.self_attn.q_proj" and "fold merge" in meta["expected"]


def test_definitions_load_from_the_module(monkeypatch, project, ft_home):
    monkeypatch.setenv("FT_RECIPE", str(project / "recipe.yaml"))
    from ft_assets import definitions

    defs = definitions.defs()
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"raw/qa", "sft_dataset", "base_model", "quantized_base", "adapter", "merged_model",
            "base_eval", "eval_report"} <= keys
    adapter = defs.resolve_assets_def("adapter")
    assert adapter.partitions_def.get_partition_keys() == ["lora", "qlora"]


def test_leaderboard_ranks_every_method_and_the_base(graph):
    recipe, _, _, store = graph
    board = json.loads((store.latest("leaderboard").dir / "leaderboard.json").read_text())
    assert board["missing"] == []
    by_method = {r["method"]: r for r in board["rows"]}
    assert set(by_method) == {"lora", "qlora", "base"}
    lora = by_method["lora"]
    tuned = json.loads((store.latest("eval_report", "lora").dir / "metrics.json").read_text())["tuned"]
    assert lora["token_f1"] == tuned["token_f1"] and lora["trainable_parameters"] > 0
    assert 0 < lora["trainable_percent"] < 100 and lora["adapter_bytes"] > 0 and lora["train_tokens_per_s"] > 0
    assert (store.latest("leaderboard").dir / "leaderboard.csv").read_text().startswith("method,type,token_f1")


def test_leaderboard_with_some_partitions_says_which_are_missing(project, ft_home):
    defs, instance = with_shared_assets(project, ft_home)
    assets, res = list(defs.assets), defs.resources
    dg.materialize(assets, instance=instance, resources=res, partition_key="lora",
                   selection=["adapter", "merged_model", "eval_report"])
    result = dg.materialize(assets, instance=instance, resources=res, selection=["leaderboard"])
    board = json.loads((ArtifactStore(ft_home).latest("leaderboard").dir / "leaderboard.json").read_text())
    assert board["missing"] == ["qlora"] and [r["method"] for r in board["rows"]] == ["lora", "base"]
    meta = result.asset_materializations_for_node("leaderboard")[0].metadata
    assert meta["missing_methods"].value == ["qlora"]


def test_inputs_are_the_versions_dagster_recorded_not_the_newest_directory(project, ft_home):
    defs, instance = with_shared_assets(project, ft_home)
    store = ArtifactStore(ft_home)
    recorded = store.latest("sft_dataset").version
    # another Dagster instance on the same FT_HOME writes a newer sft_dataset
    write_jsonl(project / "data" / "qa.jsonl", [dict(r, answer="$1 million") for r in qa_rows()])
    dg.materialize(list(defs.assets), instance=dg.DagsterInstance.ephemeral(), resources=defs.resources,
                   selection=["base_model", "sft_dataset"])
    assert store.latest("sft_dataset").version != recorded
    dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=["base_eval"])
    assert store.latest("base_eval").manifest()["inputs"]["sft_dataset"] == recorded  # what this instance shows

    fresh = dg.materialize(list(defs.assets), instance=dg.DagsterInstance.ephemeral(), resources=defs.resources,
                           selection=["base_eval"], raise_on_error=False)
    assert not fresh.success
    failures = [e.step_failure_data.user_failure_data.description for e in fresh.all_events if e.is_step_failure]
    assert any("Dagster has no materialization of" in f and "materialize it first" in f for f in failures)
