"""Model cards: the pending cards of `adapter` / `merged_model`, the complete `model_card[method]`
repo (front matter read back with huggingface_hub, metrics equal to the eval report's, files that
load), and the `publish` option (off by default; on without a token: fails before any upload).
The runs on the tiny model (`cards_pipeline` in conftest.py) are shared with test_chat.py."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from huggingface_hub import ModelCard

from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets_tests.defs.conftest import tiny_recipe, write_project


def test_adapter_and_merged_model_cards_carry_lineage_and_say_metrics_are_pending(cards_pipeline):
    recipe, store, *_ = cards_pipeline
    adapter, merged = store.latest("adapter", "lora"), store.latest("merged_model", "lora")
    sft = store.latest("sft_dataset").manifest()
    for art in (adapter, merged):
        card = ModelCard.load(art.dir / "README.md")
        assert card.data.library_name == ("peft" if art is adapter else "transformers")
        assert card.data.datasets == ["qa"] and "lora" in card.data.tags
        assert not card.data.eval_results and "Metrics pending" in card.text and "model_card[lora]" in card.text
        for fact in (store.latest("base_model").version, sft["version"], sft["inputs"]["raw/qa"],
                     recipe.recipe_hash, f"seed `{recipe.seed}`"):
            assert fact in card.text, (art.asset, fact)
        # merged_model is content-versioned: its card names no derived version, so equal weights keep one version
        assert (adapter.version in card.text) == (art is adapter), art.asset
    assert "PeftModel.from_pretrained(base, 'REPO')" in ModelCard.load(adapter.dir / "README.md").text
    assert "AutoModelForCausalLM.from_pretrained('REPO')" in ModelCard.load(merged.dir / "README.md").text


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_model_card_repo_is_complete_with_the_reports_metrics(cards_pipeline, method):
    recipe, store, results, _ = cards_pipeline
    art = store.latest("model_card", method)
    report = store.latest("eval_report", method)
    tuned = json.loads((report.dir / "metrics.json").read_text())["tuned"]
    card = ModelCard.load(art.dir / "README.md")
    assert card.data.model_name == f"tiny-{method}" and card.data.datasets == ["qa"]
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scores == {"exact_match": tuned["exact_match"], "f1": tuned["token_f1"], "rougeL": tuned["rouge_l"],
                      "loss": tuned["eval_loss"], "perplexity": tuned["perplexity"]}
    assert "model-index:" in (art.dir / "README.md").read_text() and "Metrics pending" not in card.text
    manifest = art.manifest()
    assert manifest["inputs"][f"eval_report[{method}]"] == report.version
    assert manifest["inputs"][f"champion[{method}]"] == store.latest("champion", method).version
    assert report.version in card.text and store.latest("adapter", method).version in card.text
    files = sorted(p.name for p in art.dir.iterdir())
    if method == "lora":  # merged weights and tokenizer: loads with transformers alone
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert card.data.library_name == "transformers" and "merge_status.json" not in files
        AutoModelForCausalLM.from_pretrained(art.dir)
        AutoTokenizer.from_pretrained(art.dir)
    else:  # the peft adapter: loads on the base with peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert card.data.library_name == "peft" and "adapter_config.json" in files
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(store.latest("base_model").dir), art.dir)


def test_push_is_off_by_default(cards_pipeline):
    recipe, _, results, _ = cards_pipeline
    assert load_recipe().publish.push is False and recipe.publish.push is False  # shipped and test recipes
    for method, materialization in results.items():
        assert materialization.metadata["pushed_to"].value == "not pushed (publish.push is false)", method


def test_push_without_token_fails_before_anything_is_written_or_uploaded(cards_pipeline, tiny_model_dir, monkeypatch):
    _, store, _, (root, instance) = cards_pipeline
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = store.latest("model_card", "lora")
    (root / "push").mkdir()
    recipe = load_recipe(write_project(root / "push", tiny_recipe(
        tiny_model_dir, publish={"push": True, "repo_id": "someone/tiny-{method}"})))
    defs = build_definitions(recipe, home=str(store.home))
    result = dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, partition_key="lora",
                            selection=["model_card"], raise_on_error=False)
    assert not result.success
    [failure] = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
    assert "$HF_TOKEN is not set: nothing was uploaded" in failure, failure
    assert store.latest("model_card", "lora") == before  # no new version
    assert not list(store.slot("model_card", "lora").glob(".staging-*"))


def test_push_with_a_token_refuses_to_go_online_when_offline(monkeypatch):
    from ft_assets.publish import card

    monkeypatch.setenv("MY_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(card.PushError, match="HF_HUB_OFFLINE is set"):
        card.check_push("someone/repo", "MY_TOKEN")
    with pytest.raises(card.PushError, match="publish.repo_id is not set"):
        card.check_push(None, "MY_TOKEN")
