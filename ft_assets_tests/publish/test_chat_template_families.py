"""GGUF export for every chat template (publish/gguf.py): tiny random-init models of the Llama 3,
Mistral and Gemma 3 architectures, each with its family's chat template (as the official
instruct checkpoints ship it) on the real SmolLM2 tokenizer plus the family's special tokens,
built offline, exported to f16 by llama.cpp's converter:
- the template travels in the GGUF, and llama.cpp (llama-server's /apply-template and /tokenize,
  the endpoint `serve` starts) renders and tokenizes a conversation exactly as transformers does;
- the Modelfile carries the family's Go template and its stops (ChatML's is test_export.py's).
Ollama itself does not run here: its rendering of these Go templates is untested.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ft_assets.publish import gguf as export
from ft_assets.publish.serve import Server
from ft_assets_tests.publish.test_export import parse_modelfile

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# family: (architecture, template, its special tokens, bos, eos, Go template pieces, stops)
FAMILIES = {
    "llama3": ("LlamaForCausalLM", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>"], "<|begin_of_text|>",
               "<|eot_id|>", ["<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"],
               ["<|eot_id|>", "<|start_header_id|>"]),
    "mistral": ("MistralForCausalLM", MISTRAL, ["[INST]", "[/INST]"], "<s>", "</s>",
                ["[INST] {{ if and $.System (eq $i 0) }}", "{{ .Content }}{{ if not $last }}</s>{{ end }}"],
                ["[INST]", "</s>", "[/INST]"]),
    "gemma": ("Gemma3ForCausalLM", GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              ["<start_of_turn>model\n{{ .Content }}", "<start_of_turn>user\n"],
              ["<end_of_turn>", "<eos>", "<start_of_turn>"]),
}
CONVERSATION = [{"role": "user", "content": "Revenue was $5M in 2023."}, {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": "What was revenue in 2023?"}]


def tiny_model(family: str, tokenizer_dir: Path, out: Path) -> Path:
    arch, template, specials, bos, eos, *_ = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": specials + [bos, eos]})
    tok.bos_token, tok.eos_token, tok.chat_template = bos, eos, template
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    if arch == "Gemma3ForCausalLM":
        from transformers import Gemma3TextConfig as Config

        common["head_dim"] = 16
    elif arch == "MistralForCausalLM":
        from transformers import MistralConfig as Config
    else:
        from transformers import LlamaConfig as Config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Config(**common))
    assert type(model).__name__ == arch
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exports(real_tokenizer_dir, tmp_path_factory) -> dict[str, tuple[Path, Path, export.GgufExport]]:
    """{family: (model dir, export dir, facts)}, each model exported to f16 once."""
    if not (export.llama_cpp_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"llama.cpp's converter is missing at {export.llama_cpp_dir()}: run `make install`")
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model = tiny_model(family, real_tokenizer_dir, root / "model")
        (root / "gguf").mkdir()
        out[family] = (model, root / "gguf", export.export_gguf(model, root / "gguf", ["f16"], None))
    return out


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_renders_and_tokenizes_a_conversation_as_transformers_does(exports, family):
    model, out, facts = exports[family]
    assert facts.metadata["tokenizer.chat_template"] == FAMILIES[family][1]  # the template travels as it is
    tok = AutoTokenizer.from_pretrained(model)
    want = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    want_ids = tok(want, add_special_tokens=False)["input_ids"]
    assert set(FAMILIES[family][2]) <= set(tok.convert_ids_to_tokens(want_ids))  # its special tokens, one id each
    port = _free_port()
    server = Server.start(out / "model-f16.gguf", port=port, ctx=512, threads=2)
    try:
        got = _post(f"http://127.0.0.1:{port}/apply-template", {"messages": CONVERSATION})["prompt"]
        ids = _post(f"http://127.0.0.1:{port}/tokenize",
                    {"content": want, "add_special": False, "parse_special": True})["tokens"]
    finally:
        server.stop()
    assert got == want
    assert ids == want_ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_modelfile_carries_the_familys_go_template_and_stops(exports, family):
    _, out, facts = exports[family]
    assert facts.template_family == family
    pairs = parse_modelfile((out / "Modelfile").read_text())
    template = dict(pairs)["TEMPLATE"]
    for piece in FAMILIES[family][5]:
        assert piece in template, piece
    assert template.count("{{") == template.count("}}") and "EOS" not in template
    stops = [a.split(" ", 1)[1].strip('"') for w, a in pairs if w == "PARAMETER" and a.startswith("stop ")]
    assert stops == FAMILIES[family][6]
