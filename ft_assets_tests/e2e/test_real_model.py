"""The real SmolLM2-135M-Instruct (bundled GGUF) through the Dagster graph, materialized once for
the module (the demo recipe with a short LoRA run, an evaluation section and a GGUF export):
- it trains and is evaluated, and the untuned model produces real text (skipped without the
  bundled GGUF);
- gguf_model's f16 export runs in llama.cpp's own binary (built by `make install`) and answers
  held-out prompts greedily as transformers does on the merged safetensors model (never skipped:
  without the bundled GGUF or the llama.cpp build it fails and says so). The quantized types'
  agreement on the real model is a measurement (bench/gguf_export.py, its results file), and
  their rounding is bounded on the tiny model (publish/test_export.py).
Slow: a few minutes on CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ft_assets.artifacts.store import ArtifactStore
from ft_assets.data import sft_dataset
from ft_assets.evaluation import heldout as evaluate
from ft_assets.models.base_model import bundled_gguf_path, load_model, load_tokenizer
from ft_assets.publish import gguf as export
from ft_assets.definitions import build_definitions
from ft_assets.demo import materialize_all
from ft_assets.config.recipe import DEMO_RECIPE, load_recipe

pytestmark = pytest.mark.slow

PROMPTS = 6
MAX_NEW_TOKENS = 16


@dataclass
class BundledRun:
    home: Path  # FT_HOME of the run: the store
    instance: dg.DagsterInstance  # the ephemeral instance it ran in


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    """The whole graph of the demo recipe on the bundled model, materialized once (minutes on CPU)
    for both tests. Requested by name inside each test, after its own check of what must be
    installed, so a missing GGUF skips or fails before anything runs."""
    work = tmp_path_factory.mktemp("real_model")
    home = work / "ft_home"
    with pytest.MonkeyPatch.context() as mp:  # conftest's ft_home, for the whole module
        mp.setenv("FT_HOME", str(home))
        recipe = yaml.safe_load(DEMO_RECIPE.read_text())
        recipe["root"] = str(DEMO_RECIPE.parent.parent.parent)
        recipe["quantization"] = {"method": "none"}
        recipe["methods"] = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
        recipe["training"].update({"max_steps": 3, "batch_size": 4, "checkpoint_every": 2})
        recipe["evaluation"] = {"max_new_tokens": 12, "batch_size": 8, "max_examples": 8,
                                "gate": {"min_delta": -1.0}}  # the export follows the champion: any model is one here
        recipe["export"] = {"gguf": ["f16"]}
        (work / "r.yaml").write_text(yaml.safe_dump(recipe))
        defs = build_definitions(load_recipe(work / "r.yaml"), home=str(home))
        instance = dg.DagsterInstance.ephemeral()
        # failures are not asserted here: each test checks the assets it reads
        materialize_all(defs, instance, say=lambda *_: None)
        yield BundledRun(home, instance)


def test_bundled_model_trains_and_is_evaluated(request):
    if not bundled_gguf_path().is_file():
        pytest.skip("bundled GGUF missing; run `make install`")
    store = ArtifactStore(request.getfixturevalue("bundled_run").home)
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


def test_llama_cpp_answers_like_transformers(request):
    missing = [str(p) for p in (bundled_gguf_path(),) if not p.is_file()]
    missing += [n for n in ("llama-completion",) if export.tool(n) is None]
    assert not missing, f"missing {', '.join(missing)}: run `make install`"
    bundled = request.getfixturevalue("bundled_run")
    for name in ("adapter", "merged_model", "gguf_model"):  # the chain this test reads materialized
        assert "lora" in bundled.instance.get_materialized_partitions(dg.AssetKey(name)), f"{name}[lora] failed"

    store = ArtifactStore(bundled.home)
    merged, gguf = store.latest("merged_model", "lora").dir, store.latest("gguf_model", "lora").dir
    tok = load_tokenizer(merged)
    examples = sft_dataset.load_split(store.latest("sft_dataset").dir, "eval")[:PROMPTS]
    expected = evaluate.generate_answers(load_model(merged), tok, examples, max_new_tokens=MAX_NEW_TOKENS,
                                         batch_size=1, device="cpu")
    assert sum(any(ch.isalpha() or ch.isdigit() for ch in a) for a in expected) >= PROMPTS - 1  # real answers
    prompts = [tok.decode(ex.input_ids[: ex.prompt_len]) for ex in examples]  # the chat text, special tokens in
    runs = [export.llama_cpp_generate(gguf / export.gguf_file("f16"), p, MAX_NEW_TOKENS) for p in prompts]
    f16 = [r.text for r in runs]
    assert f16 == expected, "\n".join(f"transformers {e!r} / llama.cpp f16 {g!r}" for e, g in zip(expected, f16))
    # it stops where the model ends its turn (<|im_end|>, from the GGUF metadata): answers shorter
    # than the budget in transformers are shorter in llama.cpp too
    hf_lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in expected]
    for n_hf, run in zip(hf_lengths, runs):
        if n_hf < MAX_NEW_TOKENS - 1:
            assert run.generated_tokens <= n_hf + 1, (n_hf, run)
