"""The real SmolLM2-135M-Instruct (bundled GGUF) through the Dagster graph. Slow: ~2 min on CPU."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from ft_assets.core.models import bundled_gguf_path
from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_all
from ft_assets.recipe import DEMO_RECIPE, load_recipe
from ft_assets.artifacts.store import ArtifactStore

pytestmark = pytest.mark.slow


def test_bundled_model_trains_and_is_evaluated(tmp_path, ft_home):
    if not bundled_gguf_path().is_file():
        pytest.skip("bundled GGUF missing; run `make install`")
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["root"] = str(DEMO_RECIPE.parent.parent.parent)
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    recipe["training"].update({"max_steps": 3, "batch_size": 4, "checkpoint_every": 2})
    recipe["evaluation"] = {"max_new_tokens": 12, "batch_size": 8, "max_examples": 8}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = load_recipe(tmp_path / "r.yaml")
    defs = build_definitions(r, home=str(ft_home))
    materialize_all(defs, dg.DagsterInstance.ephemeral(), say=lambda *_: None)

    store = ArtifactStore(ft_home)
    base = store.latest("base_model").manifest()["model"]
    assert base["architecture"] == "LlamaForCausalLM" and base["layers"] == 30
    assert 134_000_000 < base["parameters"] < 135_000_000
    info = json.loads((store.latest("sft_dataset").dir / "dataset_info.json").read_text())
    assert info["eos_token_id"] == 2 and info["rejected_rows"] == 0
    metrics = json.loads((store.latest("eval_report", "lora").dir / "metrics.json").read_text())
    assert metrics["tuned"]["examples"] == 8
    # The untuned model must produce real text (a broken tokenizer or dequantization gives garbage).
    preds = [json.loads(line)["prediction"] for line in (store.latest("base_eval").dir / "predictions.jsonl").open()]
    assert sum(any(ch.isalpha() for ch in p) for p in preds) >= 6
    assert metrics["base"]["perplexity"] < 1000
    log = json.loads((store.latest("adapter", "lora").dir / "train_log.json").read_text())
    assert log["steps"] == 3 and all(l < 20 for _, l in log["losses"])
