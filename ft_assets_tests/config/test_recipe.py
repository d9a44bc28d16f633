"""Recipe validation: the shipped default is valid; each kind of bad recipe names key and fix."""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pytest
import yaml
from pydantic import Field

from ft_assets.config.method_spec import SPECS
from ft_assets.methods import REGISTRY, register
from ft_assets.methods.lora import LoraSpec
from ft_assets.config.method_spec import MethodSpecBase
from ft_assets.config.recipe import DEFAULT_RECIPE, DEMO_RECIPE, PACKAGE_DIR, RecipeError, load_recipe, parse_recipe

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


def test_demo_recipe_is_valid_and_declares_lora_and_qlora():
    recipe = load_recipe(DEMO_RECIPE)
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
        (with_("datasets.0.format", "xlsx"), "datasets[0].format: Input should be 'jsonl', 'json', 'csv', 'parquet', 'arrow' or 'hf'"),
        (with_("methods", {"magic": {}}), "unknown method type 'magic'"),
        (with_("methods.lora.training", {"lrr": 1}), "methods.lora.training: unknown key 'lrr' — did you mean 'lr'? "
                                                    "Allowed here: max_steps, epochs, batch_size"),
        (with_("policies", {"p": {"sft_from": "lora", "rewards": [{"type": "token_f1"}], "training": {"batchsize": 2}}}),
         "policies.p.training: unknown key 'batchsize' — did you mean 'batch_size'?"),
        (with_("methods.lora.training", {"lr": "fast"}), "methods.lora.training.lr: Input should be a valid number"),
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


def test_recipe_loading_imports_neither_torch_nor_dagster():
    """`validate` stays fast: the method registry (every spec) loads without the ML stack."""
    heavy = ("torch", "peft", "safetensors", "transformers", "trl", "bitsandbytes", "dagster")
    code = ("import sys; from ft_assets.config.recipe import load_recipe; "
            f"load_recipe({str(PACKAGE_DIR / 'recipes' / 'all_methods.yaml')!r}); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------------------
# a method registered outside recipe.py (as a new methods/<family>.py module would)
# --------------------------------------------------------------------------------------


class TinySpec(MethodSpecBase):
    """A test-only method's recipe keys."""

    type: Literal["tiny_test"]
    width: Annotated[int, Field(ge=1, le=8)] = 2
    partner: str | None = None

    def check_in_recipe(self, name: str, recipe: Any) -> None:
        if self.partner is not None and self.partner not in recipe.methods:
            raise ValueError(f"methods.{name}.partner: {self.partner!r} is not a method of this recipe")

    def training_defaults(self) -> dict[str, Any]:
        return {"lr": 1e-3}


@dataclass(frozen=True)
class TinyMethod:  # the recipe only needs it registered; training would call the Method hooks
    type: str = "tiny_test"
    uses_quantized_base: bool = False
    merge_rounding: str = "none"


@contextlib.contextmanager
def tiny_method_registered():
    register(TinyMethod(), spec=TinySpec)
    try:
        yield
    finally:
        del REGISTRY["tiny_test"], SPECS["tiny_test"]


def test_a_method_registered_after_import_is_accepted_with_its_keys_validated():
    """recipe.py names no method: the registry at validation time decides, with the usual errors."""
    tiny = with_("methods", {"tiny_test": {"width": 3}, "other": {"type": "tiny_test", "partner": "lora"}, "lora": {}})
    assert "unknown method type 'tiny_test'" in problems(tiny)
    with tiny_method_registered():
        r = parse_recipe(tiny)
        assert isinstance(r.methods["tiny_test"], TinySpec) and r.methods["tiny_test"].width == 3
        assert r.methods["other"].partner == "lora" and r.methods["other"].width == 2
        dumped = r.model_dump()["methods"]["tiny_test"]
        assert dumped == {"training": {}, "type": "tiny_test", "width": 3, "partner": None}
        assert r.training_for("tiny_test").lr == 1e-3 and r.training_for("lora").lr == r.training.lr
        narrow = parse_recipe(with_("methods.tiny_test", {"width": 1}))
        assert r.section_hash("seed", method="tiny_test") != narrow.section_hash("seed", method="tiny_test")
        assert ("methods.tiny_test: unknown key 'widht' — did you mean 'width'? Allowed here: training, "
                "continue_from, replay_fraction, type, width, partner") in problems(with_("methods.tiny_test", {"widht": 3}))
        assert "methods.tiny_test.width: Input should be less than or equal to 8 (got 9)" in problems(
            with_("methods.tiny_test", {"width": 9}))
        assert "methods.other.partner: 'nope' is not a method of this recipe" in problems(
            with_("methods.other", {"type": "tiny_test", "partner": "nope"}))
        unknown = problems(with_("methods.x", {"type": "tinny"}))
        assert "methods.x: unknown method type 'tinny'; known types: lora, qlora," in unknown
        assert unknown.rstrip().endswith(", dpo, orpo, simpo, kto, tiny_test")
    assert "unknown method type 'tiny_test'" in problems(tiny)


def test_register_refuses_a_spec_that_does_not_declare_the_type():
    with pytest.raises(ValueError, match=r"TinySpec.type allows \['tiny_test'\], not 'tiny_other'"):
        register(TinyMethod("tiny_other"), spec=TinySpec)

    class Clash(MethodSpecBase):
        type: Literal["tiny_clash", "qlora"]

    with pytest.raises(ValueError, match="type 'qlora' would be configured by both LoraSpec and Clash"):
        register(TinyMethod("tiny_clash"), spec=Clash)
    with pytest.raises(TypeError, match="MethodSpecBase subclass"):
        register(TinyMethod(), spec=dict)
    assert "tiny_other" not in REGISTRY and "tiny_clash" not in SPECS and SPECS["qlora"] is LoraSpec


def test_early_stopping_needs_validation_rows_and_dpo_cannot_use_them(tmp_path):
    from ft_assets.config.recipe import RecipeError, load_recipe

    base = yaml.safe_load(DEMO_RECIPE.read_text())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**base, "training": {**base.get("training", {}), "early_stopping_patience": 3}}))
    with pytest.raises(RecipeError, match="early_stopping_patience needs validation_fraction > 0"):
        load_recipe(path)
    beyond = yaml.safe_load((PACKAGE_DIR / "recipes" / "beyond_sft.yaml").read_text())
    beyond["training"] = {**beyond.get("training", {}), "validation_fraction": 0.1}
    path.write_text(yaml.safe_dump(beyond))
    with pytest.raises(RecipeError, match="dpo trains with TRL's loop"):
        load_recipe(path)


def test_a_sweep_becomes_one_method_per_combination_named_after_its_settings(tmp_path):
    base = yaml.safe_load(DEMO_RECIPE.read_text())
    base["root"] = str(PACKAGE_DIR.parent)
    base["methods"] = {"lora": {"r": 16, "alpha": 32, "sweep": {"lr": [1.0e-4, 2.0e-4], "r": [8, 16]}},
                       "qlora": base["methods"]["qlora"]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(base))
    recipe = load_recipe(path)
    trials = [m for m in recipe.methods if m.startswith("lora@")]
    assert trials == ["lora@lr=1e-4@r=8", "lora@lr=1e-4@r=16", "lora@lr=2e-4@r=8", "lora@lr=2e-4@r=16"]
    t = recipe.methods["lora@lr=2e-4@r=8"]
    assert (t.type, t.r, t.alpha) == ("lora", 8, 32)
    training = recipe.training_for("lora@lr=2e-4@r=8")
    assert training.lr == 2.0e-4 and training.validation_fraction == 0.1  # trials are scored on held-out rows
    assert "qlora" in recipe.methods and "lora" not in recipe.methods

    base["methods"]["lora"]["sweep"] = {"validation_fraction": [0.1, 0.2]}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(RecipeError, match="validation_fraction: cannot be swept"):
        load_recipe(path)
    base["methods"]["lora"]["sweep"] = {"rnk": [4]}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(RecipeError, match="rnk"):
        load_recipe(path)


@pytest.mark.parametrize(
    "evaluation, expected",
    [
        ({"evaluators": [{"type": "magic"}]},
         "evaluation.evaluators[0]: unknown type 'magic'; known types: 'evaluate', 'judge', 'lm_eval'"),
        ({"evaluators": [{"type": "evaluate", "path": "m.py", "kep": ["x"]}]}, "unknown key 'kep' — did you mean 'keep'?"),
        ({"evaluators": [{"type": "evaluate", "path": "a.py"}, {"type": "evaluate", "path": "b.py"}]},
         "evaluator names must be unique; repeated: evaluate (give each a `name:`)"),
        ({"evaluators": [{"type": "evaluate", "name": "../x", "path": "a.py"}]}, "evaluation.evaluators[0].name"),
        ({"gate": {"metric": "figures.recall"}}, "gate: 'figures.recall' is neither a built-in score"),
        ({"gate": {"max_regression": {"token_f1": -0.1}}}, "evaluation.gate.max_regression.token_f1"),
    ],
)
def test_bad_evaluators_and_gates_name_the_key(evaluation, expected):
    msg = problems(with_("evaluation", evaluation))
    assert expected in msg, msg


def test_evaluators_and_gate_version_only_the_recipes_that_use_them():
    plain = parse_recipe(GOOD)
    assert plain.evaluation.gate.metric == "token_f1" and plain.evaluation.evaluators == []
    assert parse_recipe(with_("evaluation", {"gate": {"metric": "token_f1"}})).recipe_hash == plain.recipe_hash
    gated = parse_recipe(with_("evaluation", {"evaluators": [{"type": "evaluate", "name": "figures", "path": "m.py"}],
                                              "gate": {"metric": "figures.figure_recall", "min_delta": 0.01}}))
    assert gated.recipe_hash != plain.recipe_hash
    assert gated.evaluation.evaluators[0].label == "figures"
