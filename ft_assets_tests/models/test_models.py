"""Base model resolution: local path, hub id from the local cache, bundled GGUF; safe by default."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ft_assets.models import base_model as models
from ft_assets.models.base_model import LoadOptions, ModelSourceError


def test_local_path_saved_as_safetensors_with_fixed_tokens(tiny_model_dir, tmp_path):
    facts = models.save_base("local", tmp_path / "out", local_path=tiny_model_dir)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["parameters"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list((tmp_path / "out").glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="only pickle weights"):
        models.save_base("local", tmp_path / "out", local_path=d)
    # allowed only when the recipe says so (then loading proceeds past the safety check)
    models.check_weights_are_safe(d, LoadOptions(allow_pickle_weights=True))


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ModelSourceError, match="not a model directory"):
        models.save_base("local", tmp_path / "out", local_path=tmp_path)


def test_hub_id_is_read_from_the_local_cache_only(tiny_model_dir, tmp_path, monkeypatch):
    # Lay the tiny model out as the HF cache does: models--org--name/snapshots/<rev>/...
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("transformers.utils.hub.HF_HUB_CACHE", str(cache), raising=False)
    facts = models.save_base("hub", tmp_path / "out", hub_id="acme/tiny-llama")
    assert facts["origin"] == "hub:acme/tiny-llama"
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache.*`hf download acme/not-there`"):
        models.save_base("hub", tmp_path / "out2", hub_id="acme/not-there")


def test_bundled_gguf_missing_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelSourceError, match="make install"):
        models.save_base("bundled", tmp_path / "out")


def test_tokenizer_model_mismatch_is_caught(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(100)
    with pytest.raises(ModelSourceError, match="do not belong together"):
        models.check_tokenizer_matches(tok, model)


def test_loading_a_model_and_peft_leaves_scikit_learn_and_scipy_unimported(tiny_model_dir):
    """ft_assets hides them from transformers (its package doc: ~1.5 CPU-s a process); lm-eval's
    metric that needs scikit-learn still imports and computes it."""
    import subprocess
    import sys

    code = ("import sys, ft_assets\n"
            "from ft_assets.models.base_model import load_model\n"
            "import peft\n"
            f"load_model({str(tiny_model_dir)!r})\n"
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))\n"
            "from lm_eval.api.metrics import f1_score\n"
            "print(f1_score([(1, 1), (0, 0), (1, 0)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", str(2 / 3)], out.stdout
