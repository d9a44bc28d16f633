"""`gguf_model[method]` in the Dagster graph (tiny model): built only when the recipe asks, converts
the merged model its champion[method] names, writes the GGUF + Modelfile; a method that cannot
merge says so. (test_champion.py: the export follows the champion, not the newest model.)"""

from __future__ import annotations

import json

import dagster as dg
import yaml

from ft_assets.publish.gguf import read_metadata
from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore


def test_gguf_model_materializes_per_method(project, ft_home):
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    assert "gguf_model" not in {k.to_user_string() for k in build_definitions(load_recipe(project / "recipe.yaml"))
                                .resolve_asset_graph().get_all_asset_keys()}  # no export: no asset
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "prompt": {"num_virtual_tokens": 4}}
    recipe["training"]["max_steps"] = 2
    recipe["prompt"]["system"] = "Answer with the figure."
    recipe["export"] = {"gguf": ["q8_0"]}
    recipe["evaluation"]["gate"] = {"min_delta": -1.0}  # any model becomes champion: the gate is not tested here
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    defs = build_definitions(load_recipe(project / "recipe.yaml"), home=str(ft_home))
    instance = dg.DagsterInstance.ephemeral()
    assets = list(defs.assets)
    dg.materialize(assets, instance=instance, resources=defs.resources, selection=["base_model", "sft_dataset", "base_eval"])
    results = {}
    for method in ("lora", "prompt"):
        results[method] = dg.materialize(assets, instance=instance, resources=defs.resources, partition_key=method,
                                         selection=["adapter", "merged_model", "eval_report", "champion", "gguf_model"])
        assert results[method].success, method

    store = ArtifactStore(ft_home)
    lora = store.latest("gguf_model", "lora")
    manifest = lora.manifest()
    assert manifest["inputs"] == {"merged_model[lora]": store.latest("merged_model", "lora").version,
                                  "champion[lora]": store.latest("champion", "lora").version}
    assert sorted(p.name for p in lora.dir.iterdir()) == ["Modelfile", "export_status.json", "manifest.json",
                                                          "model-q8_0.gguf"]
    assert manifest["gguf"]["bytes"]["q8_0"] == (lora.dir / "model-q8_0.gguf").stat().st_size
    assert read_metadata(lora.dir / "model-q8_0.gguf")["tokenizer.ggml.eos_token_id"] == 2
    modelfile = (lora.dir / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and 'SYSTEM """Answer with the figure."""' in modelfile
    [materialization] = results["lora"].asset_materializations_for_node("gguf_model")
    assert materialization.metadata["bytes_q8_0"].value == manifest["gguf"]["bytes"]["q8_0"]
    assert materialization.metadata["eos_token_id"].value == 2

    prompt = store.latest("gguf_model", "prompt")
    status = json.loads((prompt.dir / "export_status.json").read_text())
    assert status["exported"] is False and "cannot merge" in status["reason"]
    assert not list(prompt.dir.glob("*.gguf"))
    [materialization] = results["prompt"].asset_materializations_for_node("gguf_model")
    assert materialization.metadata["exported"].value is False
