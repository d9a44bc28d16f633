"""`python -m ft_assets artifacts` and `lineage` over a real materialized chain; the steps
`validate` predicts, checked against the data stage's real training split."""

from __future__ import annotations

import json
import subprocess
import sys

import dagster as dg
import yaml

from ft_assets.cli.main import main
from ft_assets.data import rows as data, sft_dataset
from ft_assets.training.steps import steps_for, validation_rows
from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import qa_rows, write_jsonl


def cli(*args, home):
    return subprocess.run([sys.executable, "-m", "ft_assets", *args, "--home", str(home)],
                          capture_output=True, text=True, check=True).stdout


def test_artifacts_and_lineage_walk_back_to_the_raw_file(project, ft_home):
    recipe = load_recipe(project / "recipe.yaml")
    defs = build_definitions(recipe, home=str(ft_home))
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(list(defs.assets), resources=defs.resources, instance=instance,
                   selection=["base_model", "sft_dataset", "base_eval", "quantized_base"])
    dg.materialize(list(defs.assets), resources=defs.resources, instance=instance, partition_key="qlora",
                   selection=["adapter"])
    store = ArtifactStore(ft_home)

    rows = json.loads(cli("artifacts", "--json", home=ft_home))
    assert {(r["asset"], r["partition"]) for r in rows} == {
        ("base_model", None), ("sft_dataset", None), ("base_eval", None), ("quantized_base", None), ("adapter", "qlora")}
    assert all(r["data_version"] and r["created"] and r["path"] for r in rows)

    adapter = store.latest("adapter", "qlora")
    tree = json.loads(cli("lineage", str(adapter.dir / "adapter_config.json"), "--json", home=ft_home))
    assert tree["asset"] == "adapter" and tree["partition"] == "qlora"
    inputs = {n["asset"]: n for n in tree["inputs"]}
    assert set(inputs) == {"sft_dataset", "base_model", "quantized_base"}  # the adapter read these three
    raw = [n for n in inputs["sft_dataset"]["inputs"] if n.get("raw_file")]
    from ft_assets.artifacts.store import file_hash

    assert raw == [{"asset": "raw/qa", "version": file_hash(project / "data" / "qa.jsonl")[:16], "raw_file": True}]
    text = cli("lineage", str(adapter.dir), home=ft_home)
    assert "adapter[qlora]" in text and "raw/qa" in text and "(raw data file)" in text


def test_same_inputs_twice_give_bit_identical_dataset_and_adapter(project, tmp_path):
    recipe = load_recipe(project / "recipe.yaml")
    versions = []
    for home in (tmp_path / "a", tmp_path / "b"):
        defs = build_definitions(recipe, home=str(home))
        instance = dg.DagsterInstance.ephemeral()
        dg.materialize(list(defs.assets), resources=defs.resources, instance=instance,
                       selection=["base_model", "sft_dataset", "base_eval", "quantized_base"])
        dg.materialize(list(defs.assets), resources=defs.resources, instance=instance, partition_key="lora",
                       selection=["adapter"])
        store = ArtifactStore(home)
        versions.append((store.latest("sft_dataset").version, store.latest("adapter", "lora").dir))
    # sft_dataset versions are content hashes: equal versions mean bit-identical files
    assert versions[0][0] == versions[1][0]
    # adapter versions are what made them (inputs, code, settings, seed): the same in both homes
    assert versions[0][1].name == versions[1][1].name
    # bytes may differ between two trainings (reduction order), so compare the weights themselves
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter_model.safetensors")) for _, d in versions)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------
# validate: the steps a run will take
# --------------------------------------------------------------------------------------


def qa_file(path, long_row=False):
    """48 usable QA rows, one with a blank answer and one exact duplicate (rejected before
    tokenization), and optionally one whose context is too long for max_length 128 (rejected
    only by the tokenizer)."""
    rows = qa_rows(48)
    rows += [{**rows[0], "id": "blank", "answer": "  "}, {**rows[1], "id": rows[1]["id"]}]
    if long_row:
        rows.append({"id": "long", "question": "What was total revenue?", "answer": "$1 million",
                     "context": "Revenue grew in every segment of the business. " * 40})
    (path.parent).mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, rows)


def validate_recipe(tmp_path, capsys, **overrides) -> str:
    recipe = {
        "name": "steps", "seed": 7,
        "datasets": [{"name": "qa", "path": "data/qa.jsonl", "columns": {"id": "id"}, "eval_fraction": 0.25}],
        "prompt": {"max_length": 128},
        "training": {"max_steps": 90, "batch_size": 4},
        "methods": {"lora": {}},
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["validate", str(path)]) == 0
    return capsys.readouterr().out


def real_train_rows(tmp_path, tokenizer_dir) -> int:
    """The training split the sft_dataset stage builds for tmp_path/recipe.yaml."""
    from transformers import AutoTokenizer

    recipe = load_recipe(tmp_path / "recipe.yaml")
    built = sft_dataset.build_sft_dataset(
        data.sft_sources(recipe), AutoTokenizer.from_pretrained(tokenizer_dir), system=recipe.prompt.system,
        template=recipe.prompt.template, template_without_context=recipe.prompt.template_without_context,
        max_length=recipe.prompt.max_length, mixture_seed=recipe.seed)
    return len(built.train)


def method_line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(f"method {name} "))


def test_validate_prints_the_epoch_bound_when_it_stops_the_run_before_max_steps(tmp_path, capsys, real_tokenizer_dir):
    qa_file(tmp_path / "data" / "qa.jsonl")
    out = validate_recipe(tmp_path, capsys, methods={"lora": {}, "full": {"training": {"batch_size": 1}}})
    # 50 rows - 2 rejected = 48 usable, 12 held out: 36 train rows, 1 epoch at batch 4 = 9 steps, not 90
    lora = method_line(out, "lora")
    assert "lora (lora): 9 steps (1.0 epoch of ~36 train rows; max_steps 90 not reached), batch 4x1" in lora
    # the tokenizer could still reject up to 5 rows (max_rejected_fraction 0.1 of 50): 34..36 rows
    assert ("full (full): about 36 steps (1.0 epoch of ~36 train rows; max_steps 90 not reached; 34 if "
            "tokenization rejects as many rows as max_rejected_fraction allows), batch 1x1") in method_line(out, "full")
    real = real_train_rows(tmp_path, real_tokenizer_dir)
    assert real == 36
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert steps_for(real, recipe.training_for("lora")) == 9


def test_validate_prints_max_steps_when_it_binds(tmp_path, capsys, real_tokenizer_dir):
    qa_file(tmp_path / "data" / "qa.jsonl", long_row=True)
    out = validate_recipe(tmp_path, capsys, training={"max_steps": 5, "batch_size": 4})
    # 49 rows pass validation -> 37 train rows at most; the long row only fails at tokenization (36),
    # but 5 steps x 4 rows is less than an epoch either way: exactly max_steps
    assert "lora (lora): 5 steps (max_steps; 0.54 epoch of ~37 train rows), batch 4x1" in method_line(out, "lora")
    real = real_train_rows(tmp_path, real_tokenizer_dir)
    assert real == 36
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert steps_for(real, recipe.training_for("lora")) == 5


def test_validate_counts_the_rows_validation_holds_out_and_says_what_it_does(tmp_path, capsys, real_tokenizer_dir):
    qa_file(tmp_path / "data" / "qa.jsonl")
    out = validate_recipe(tmp_path, capsys, methods={"lora": {"training": {
        "validation_fraction": 0.25, "validation_every": 3, "early_stopping_patience": 2}}})
    # 36 train rows (as above), 9 of them held out for validation: 27 rows, 1 epoch at batch 4 = 7 steps
    assert ("lora (lora): 7 steps (1.0 epoch of ~27 train rows; max_steps 90 not reached), batch 4x1, lr "
            in method_line(out, "lora"))
    assert ("validation on 25% of the training rows every 3 steps (keeps the best, stops after 2 without a "
            "new best)") in method_line(out, "lora")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    cfg = recipe.training_for("lora")
    real = real_train_rows(tmp_path, real_tokenizer_dir)
    assert steps_for(real - validation_rows(real, cfg), cfg) == 7  # what the loop will take


def test_validate_counts_preference_pairs_for_dpo_and_uses_distillation_training(tmp_path, capsys):
    qa_file(tmp_path / "data" / "qa.jsonl")
    pairs = [{"id": f"p{i}", "prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)}
             for i in range(40)]
    write_jsonl(tmp_path / "data" / "prefs.jsonl", pairs + [{"id": "same", "prompt": "x", "chosen": "a", "rejected": "a"}])
    out = validate_recipe(
        tmp_path, capsys,
        methods={"lora": {}, "dpo": {"sft_from": "lora", "training": {"batch_size": 2}}},
        preferences={"name": "prefs", "path": "data/prefs.jsonl", "max_rejected_fraction": 0.03},
        distillation={"teacher": "lora", "training": {"max_steps": 3}})
    # 41 pairs - 1 rejected = 40, 6 held out: 34 train pairs; max_rejected_fraction 0.03 allows no
    # further rejection, so the count is exact (no ~)
    assert ("dpo (dpo): 17 steps (1.0 epoch of 34 train pairs; max_steps 90 not reached), batch 2x1"
            in method_line(out, "dpo"))
    distill = next(line for line in out.splitlines() if line.strip().startswith("distillation:"))
    assert "3 steps (max_steps; 0.33 epoch of ~36 train rows), batch 4x1" in distill


def test_validate_without_the_data_file_prints_max_steps_as_an_upper_bound(tmp_path, capsys):
    out = validate_recipe(tmp_path, capsys)
    assert "(file not found yet)" in out
    missing = tmp_path / "data" / "qa.jsonl"
    assert (f"lora (lora): at most 90 steps (max_steps is an upper bound; {missing} not found yet, "
            "rows not counted), batch 4x1") in method_line(out, "lora")
