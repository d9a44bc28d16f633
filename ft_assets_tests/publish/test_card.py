"""Model card rendering (`publish/card.py`) without training: front matter read back by
huggingface_hub, one model-index entry per task and metric, the usage snippet each weights
format needs (valid Python), and the link step of the publishable directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ft_assets.publish import card

METRICS = {"examples": 4, "exact_match": 0.25, "token_f1": 0.5, "rouge_l": 0.4, "eval_loss": 1.5, "perplexity": 4.48}


def lineage(method_type: str = "lora", origin: str = "gguf:SmolLM2-135M-Instruct.Q4_1.gguf") -> card.Lineage:
    return card.Lineage(method=method_type, method_type=method_type, base_origin=origin, base_version="b1",
                        sft_dataset_version="s1", data_files={"finqa": "abcd"}, adapter_asset=f"adapter[{method_type}]",
                        adapter_version="a1", recipe_hash="r1", code_version="1", seed=42,
                        training={"steps": 3, "tokens_trained": 90, "final_loss": 1.25})


def weights(tmp_path: Path, *files: str) -> Path:
    for f in files:
        (tmp_path / f).write_text("{}")
    return tmp_path


def render(tmp_path, lin, files, metrics=None, datasets=("finqa",), quantized=False) -> str:
    return card.card_text(lin, what="test weights", weights_dir=weights(tmp_path, *files), uses_quantized_base=quantized,
                          dataset_names=list(datasets), recipe_name="demo", metrics=metrics, pending_note="later.")


def test_one_model_index_entry_per_task_and_metric(tmp_path):
    metrics = {"base": METRICS, "tuned": METRICS, "evaluated_as": "merged",
               "per_task": {"finqa": {"base": METRICS, "tuned": METRICS},
                            "squad": {"base": METRICS, "tuned": {**METRICS, "token_f1": 0.75}}}}
    c = ModelCard(render(tmp_path, lineage(), ["config.json"], metrics, datasets=("finqa", "squad")))
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in c.data.eval_results}
    assert len(got) == 10 and got[("squad", "f1")] == 0.75 and got[("finqa", "rougeL")] == 0.4
    assert c.data.base_model == card.BUNDLED_BASE_ID and c.data.library_name == "transformers"
    assert c.data.datasets == ["finqa", "squad"] and "Metrics pending" not in c.text
    assert "| Token F1 | 0.5 | 0.5 |" in c.text


def test_pending_card_without_metrics_and_a_local_base_has_no_hub_base_model(tmp_path):
    c = ModelCard(render(tmp_path, lineage("lora", origin="local:/models/mine"), ["adapter_config.json"]))
    assert c.data.base_model is None and c.data.eval_results is None and c.data.library_name == "peft"
    assert "Metrics pending. later." in c.text and "a local checkpoint, `/models/mine`" in c.text


@pytest.mark.parametrize("method_type, files, quantized, needs", [
    ("lora", ["config.json", "tokenizer_config.json"], False, "AutoModelForCausalLM.from_pretrained('REPO')"),
    ("full", ["config.json"], False, f"AutoTokenizer.from_pretrained({card.BUNDLED_BASE_ID!r})"),
    ("dora", ["adapter_config.json"], False, "PeftModel.from_pretrained(base, 'REPO')"),
    ("qlora", ["adapter_config.json"], True, "BitsAndBytesConfig(load_in_4bit=True"),
    ("bottleneck", ["bottleneck.json"], False, "get_method('bottleneck').load(base, 'REPO')"),
    ("last_layers", ["last_layers.json"], False, "get_method('last_layers').load(base, 'REPO')"),
])
def test_usage_snippet_fits_the_weights_format(tmp_path, method_type, files, quantized, needs):
    snippet = card.usage(weights(tmp_path, *files), lineage(method_type), quantized)
    assert needs in snippet, snippet
    compile(snippet, "usage", "exec")  # valid Python


def test_link_files_leaves_out_manifest_card_and_merge_status(tmp_path):
    (tmp_path / "src").mkdir()
    src = weights(tmp_path / "src", "config.json", "manifest.json", "README.md", "merge_status.json")
    (src / "model.safetensors").write_bytes(b"w")
    out = tmp_path / "out"
    out.mkdir()
    assert card.link_files(out, src) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino  # a hard link
    assert json.loads((out / "config.json").read_text()) == {}
