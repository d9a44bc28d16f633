"""Recipe validation: the shipped default is valid; each kind of bad recipe names key and fix."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from ft_assets.recipe import DEFAULT_RECIPE, RecipeError, load_recipe, parse_recipe

GOOD = {
    "name": "r",
    "datasets": [{"name": "qa", "path": "data/qa.jsonl"}],
    "methods": {"lora": {"r": 8}},
}


def problems(data: dict) -> str:
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "recipe.yaml")
    return str(err.value)


def with_(path: str, value) -> dict:
    data = copy.deepcopy(GOOD)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[last] = value
    return data


def test_default_recipe_is_valid_and_declares_lora_and_qlora():
    recipe = load_recipe(DEFAULT_RECIPE)
    assert set(recipe.methods) >= {"lora", "qlora"}
    assert recipe.base_model.source == "bundled" and recipe.quantization.method == "nf4"
    assert recipe.dataset_path(recipe.datasets[0]).is_file()
    assert recipe.training_for("qlora").optimizer == "paged_adamw_8bit"
    assert recipe.training_for("lora").optimizer == "adamw"


def test_method_type_defaults_to_its_name_and_training_overrides_merge():
    r = parse_recipe(with_("methods", {"lora": {"training": {"lr": 0.01}}, "qlora": {}}))
    assert r.methods["lora"].type == "lora" and r.training_for("lora").lr == 0.01
    assert r.training_for("qlora").lr == r.training.lr


@pytest.mark.parametrize(
    "data, expected",
    [
        (with_("methods.lora.rnk", 8), "methods.lora: unknown key 'rnk' — did you mean 'r'?"),
        (with_("trainig", {}), "unknown key 'trainig' — did you mean 'training'?"),
        (with_("datasets.0.colums", {}), "datasets[0]: unknown key 'colums' — did you mean 'columns'?"),
        (with_("methods.lora.r", 0), "methods.lora.r: Input should be greater than or equal to 1"),
        (with_("methods.lora.r", "eight"), "methods.lora.r: Input should be a valid integer"),
        (with_("training.lr", -0.1), "training.lr: Input should be greater than 0"),
        (with_("datasets.0.eval_fraction", 1.0), "datasets[0].eval_fraction: Input should be less than 1"),
        (with_("datasets.0.format", "xlsx"), "datasets[0].format: Input should be 'jsonl', 'csv' or 'parquet'"),
        (with_("methods", {"magic": {}}), "unknown method type 'magic'"),
        (with_("methods.lora.training", {"lrr": 1}), "lrr"),
        (with_("datasets", []), "datasets: List should have at least 1 item"),
        (with_("base_model", {"source": "hub"}), "source 'hub' needs `id`"),
        (with_("methods", {"qlora": {}, "lora": {}}) | {"quantization": {"method": "none"}}, "need quantization.method: nf4"),
        (with_("datasets.0.path", "../../etc/passwd"), "outside the recipe root"),
        (with_("methods.dpo", {"sft_from": "lora"}) | {
            "preferences": {"name": "p", "path": "data/p.jsonl"},
            "automation": {"retrain_cron": "0 3 * * 0", "eager": False}}, "set automation.eager: true"),
    ],
)
def test_bad_recipes_name_the_key_and_what_is_allowed(data, expected):
    msg = problems(data)
    assert "recipe.yaml" in msg
    assert expected in msg, msg


def test_missing_required_key():
    data = copy.deepcopy(GOOD)
    del data["methods"]
    assert "methods: required key is missing" in problems(data)


def test_paths_outside_root_allowed_only_when_asked():
    r = parse_recipe(with_("datasets.0.path", "/tmp/x.jsonl") | {"allow_paths_outside_root": True})
    assert str(r.dataset_path(r.datasets[0])) == "/tmp/x.jsonl"


def test_section_hash_changes_only_with_its_section():
    a = parse_recipe(GOOD)
    b = parse_recipe(with_("methods.lora.r", 4))
    assert a.section_hash("datasets") == b.section_hash("datasets")
    assert a.section_hash("methods") != b.section_hash("methods")
    assert a.recipe_hash != b.recipe_hash


def test_cli_validate_exit_codes(tmp_path):
    good = subprocess.run([sys.executable, "-m", "ft_assets", "validate", str(DEFAULT_RECIPE)],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "is valid" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_("methods.lora.alpah", 3)))
    out = subprocess.run([sys.executable, "-m", "ft_assets", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean 'alpha'" in out.stderr and str(bad) in out.stderr
    (tmp_path / "notyaml.yaml").write_text("name: [unclosed")
    out = subprocess.run([sys.executable, "-m", "ft_assets", "validate", str(tmp_path / "notyaml.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not valid YAML" in out.stderr
