"""Fixtures of the defs tests: a tiny-model project run end to end for two methods (model cards, chat)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl

SYSTEM = "Answer from the context, briefly."


def tiny_recipe(model_dir: Path, **overrides) -> dict:
    """lora (merges) and prefix (cannot merge: its repo holds the adapter), no quantization; trained
    long enough that greedy answers are text (the untrained tiny model repeats newlines)."""
    return make_recipe(model_dir, quantization={"method": "none"},
                       training={"max_steps": 40, "batch_size": 8, "lr": 2e-2, "warmup_ratio": 0.0},
                       prompt={"max_length": 128, "system": SYSTEM},
                       methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                "prefix": {"num_virtual_tokens": 4, "training": {"lr": 0.1}}},
                       **overrides)


def write_project(root: Path, recipe: dict) -> Path:
    (root / "data").mkdir(exist_ok=True)
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root / "recipe.yaml"


@pytest.fixture(scope="session")
def cards_pipeline(tmp_path_factory, tiny_model_dir):
    """(recipe, store, {method: model_card materialization}) after both partitions ran end to end."""
    root = tmp_path_factory.mktemp("cards")
    # every method's model becomes its champion (what the cards publish): the gate is test_champion's
    recipe = load_recipe(write_project(root, tiny_recipe(tiny_model_dir, evaluation={
        "max_new_tokens": 8, "batch_size": 8, "gate": {"min_delta": -1.0}})))
    home = root / "ft_home"
    defs = build_definitions(recipe, home=str(home))
    instance = dg.DagsterInstance.ephemeral()
    assets, res = list(defs.assets), defs.resources
    dg.materialize(assets, instance=instance, resources=res, selection=["base_model", "sft_dataset", "base_eval"])
    results = {}
    for method in ("lora", "prefix"):
        r = dg.materialize(assets, instance=instance, resources=res, partition_key=method,
                           selection=["adapter", "merged_model", "eval_report", "champion", "model_card"])
        results[method] = r.asset_materializations_for_node("model_card")[0]
    return recipe, ArtifactStore(home), results, (root, instance)
