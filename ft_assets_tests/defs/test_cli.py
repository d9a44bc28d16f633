"""`python -m ft_assets artifacts` and `lineage` over a real materialized chain."""

from __future__ import annotations

import json
import subprocess
import sys

import dagster as dg

from ft_assets.definitions import build_definitions
from ft_assets.recipe import load_recipe
from ft_assets.store import ArtifactStore


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
    from ft_assets.store import file_hash

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
