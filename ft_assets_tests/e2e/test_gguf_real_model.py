"""The real SmolLM2-135M-Instruct, tuned briefly through the graph and exported by gguf_model:
llama.cpp's own binary (built by `make install`) answers held-out prompts greedily as
transformers does on the merged safetensors model. Slow (minutes on CPU); never skipped: without
`make install`'s llama.cpp build it fails and says so."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from ft_assets.core import data, evaluate, export
from ft_assets.core.models import bundled_gguf_path, load_model, load_tokenizer
from ft_assets.definitions import build_definitions
from ft_assets.recipe import DEMO_RECIPE, load_recipe
from ft_assets.artifacts.store import ArtifactStore

pytestmark = pytest.mark.slow

PROMPTS = 6
MAX_NEW_TOKENS = 16


def test_llama_cpp_answers_like_transformers(tmp_path, ft_home):
    missing = [str(p) for p in (bundled_gguf_path(),) if not p.is_file()]
    missing += [n for n in ("llama-completion", "llama-quantize") if export.tool(n) is None]
    assert not missing, f"missing {', '.join(missing)}: run `make install`"
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["root"] = str(DEMO_RECIPE.parent.parent.parent)
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    recipe["training"].update({"max_steps": 3, "batch_size": 4, "checkpoint_every": 2})
    recipe["export"] = {"gguf": ["f16", "q8_0"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    defs = build_definitions(load_recipe(tmp_path / "r.yaml"), home=str(ft_home))
    instance, assets = dg.DagsterInstance.ephemeral(), list(defs.assets)
    dg.materialize(assets, instance=instance, resources=defs.resources, selection=["base_model", "sft_dataset"])
    assert dg.materialize(assets, instance=instance, resources=defs.resources, partition_key="lora",
                          selection=["adapter", "merged_model", "gguf_model"]).success

    store = ArtifactStore(ft_home)
    merged, gguf = store.latest("merged_model", "lora").dir, store.latest("gguf_model", "lora").dir
    tok = load_tokenizer(merged)
    examples = data.load_split(store.latest("sft_dataset").dir, "eval")[:PROMPTS]
    expected = evaluate.generate_answers(load_model(merged), tok, examples, max_new_tokens=MAX_NEW_TOKENS,
                                         batch_size=1, device="cpu")
    assert sum(any(ch.isalpha() or ch.isdigit() for ch in a) for a in expected) >= PROMPTS - 1  # real answers
    prompts = [tok.decode(ex.input_ids[: ex.prompt_len]) for ex in examples]  # the chat text, special tokens in
    runs = {kind: [export.llama_cpp_generate(gguf / export.gguf_file(kind), p, MAX_NEW_TOKENS) for p in prompts]
            for kind in ("f16", "q8_0")}
    f16 = [r.text for r in runs["f16"]]
    assert f16 == expected, "\n".join(f"transformers {e!r} / llama.cpp f16 {g!r}" for e, g in zip(expected, f16))
    # it stops where the model ends its turn (<|im_end|>, from the GGUF metadata): answers shorter
    # than the budget in transformers are shorter in llama.cpp too
    hf_lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in expected]
    for n_hf, run in zip(hf_lengths, runs["f16"]):
        if n_hf < MAX_NEW_TOKENS - 1:
            assert run.generated_tokens <= n_hf + 1, (n_hf, run)
    # q8_0 rounds every weight: the same answer for most prompts, and close text for all
    q8 = [r.text for r in runs["q8_0"]]
    same = sum(a == b for a, b in zip(q8, expected))
    assert same >= PROMPTS - 2, "\n".join(f"transformers {e!r} / llama.cpp q8_0 {g!r}" for e, g in zip(expected, q8))
