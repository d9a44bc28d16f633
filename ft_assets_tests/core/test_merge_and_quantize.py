"""Merging reproduces base+adapter; QLoRA merges into dequantized NF4 weights, not 4-bit ones."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ft_assets.core import data, merge, quantize, train
from ft_assets.core.methods import get_method
from ft_assets.core.models import load_model
from ft_assets.recipe import LoraSpec
from ft_assets_tests.conftest import qa_rows

SPEC = LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)


def examples(model_dir, n=8):
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i, row in enumerate(qa_rows(n)):
        ex = data.Example(row["id"], row["question"], row["context"], row["answer"], i + 1)
        data.format_example(tok, ex, data.build_messages(ex, None, "{context} {question}", "{question}"), 128)
        out.append(ex)
    return out


def trained_adapter(model, method_name, exs, out_dir):
    method = get_method(method_name)
    model = method.wrap(model, SPEC)
    train.train(model, method, SPEC, exs, train.TrainConfig(max_steps=3, batch_size=4, lr=2e-2, warmup_ratio=0.0,
                                                             optimizer="adamw"), pad_id=2)
    method.save(model, out_dir)
    return model


def test_lora_merge_matches_base_plus_adapter(tiny_model_dir, tmp_path):
    exs = examples(tiny_model_dir)
    trained = trained_adapter(load_model(tiny_model_dir), "lora", exs, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    merged = merge.merged(get_method("lora"), tiny_model_dir, tmp_path / "ad", None, "cpu")
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = load_model(tiny_model_dir)
    assert merge.max_logit_difference(reloaded, trained, exs, 2, "cpu") < 1e-4
    assert merge.max_logit_difference(reloaded, base, exs, 2, "cpu") > 1e-3  # the merge changed something


def test_nf4_quantize_then_qlora_merge_into_dequantized_weights(tiny_model_dir, tmp_path):
    exs = examples(tiny_model_dir)
    q = quantize.quantize(tiny_model_dir, tmp_path / "q", "nf4", True, torch.float32, "cpu")
    assert q.config.quantization_config.bnb_4bit_use_double_quant
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    reloaded_q = quantize.load_quantized(tmp_path / "q", "cpu", torch.float32)
    trained = trained_adapter(reloaded_q, "qlora", exs, tmp_path / "ad")
    merged = merge.merged(get_method("qlora"), tiny_model_dir, tmp_path / "ad", tmp_path / "q", "cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert merge.max_logit_difference(merged, trained, exs, 2, "cpu") < 1e-3
