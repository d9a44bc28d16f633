"""GGUF export (publish/gguf.py) on the tiny random-init Llama with the real SmolLM2 tokenizer:
llama.cpp's converter writes f16/bf16/q8_0, transformers reads each back, the metadata carries
the chat template and special tokens, and the Ollama Modelfile says the right things."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ft_assets.publish import gguf as export
from ft_assets.config.recipe import RecipeError, parse_recipe
from ft_assets_tests.conftest import make_recipe

SYSTEM = "Answer from the context with the exact figure only."
PROMPTS = ["<|im_start|>user\nContext: revenue was $1,204 million.\nQuestion: What was total revenue?<|im_end|>\n"
           "<|im_start|>assistant\n", "The gross profit of Company 7 in 2024 was"]
# max |logit difference| / max |logit| against the safetensors model, per type: the rounding of
# the weights each type stores (f16: 2^-11 relative per weight; bf16: 2^-8; q8_0: one scale per
# 32 weights and 8-bit integers, ~1/254 of a block's largest weight) spread over the 2 layers'
# sums; measured on this model (2026-11-30): f16 2.7e-4, bf16 2.3e-3, q8_0 7.6e-3; the bounds are
# 7-9x that.
TOLERANCE = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    if not (export.llama_cpp_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"llama.cpp's converter is missing at {export.llama_cpp_dir()}: run `make install`")
    out = tmp_path_factory.mktemp("gguf")
    facts = export.export_gguf(tiny_model_dir, out, ["q8_0", "f16", "bf16"], SYSTEM)
    return out, facts


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs of Ollama's Modelfile grammar: `#` comments, one instruction
    per line, an argument that opens with triple quotes runs to the closing triple quotes."""
    out, rest = [], text
    while rest:
        line, _, after = rest.partition("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            rest = after
            continue
        word, _, arg = line.strip().partition(" ")
        if arg.startswith('"""'):
            body, sep, tail = (arg[3:] + "\n" + after).partition('"""')
            assert sep, f"unterminated triple quote after {word}"
            out.append((word.upper(), body))
            rest = tail.partition("\n")[2]
        else:
            out.append((word.upper(), arg))
            rest = after
    return out


def logits(model, tok) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits
    return out, batch["attention_mask"].bool()


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_transformers_reads_the_gguf_back_with_the_same_logits(exported, tiny_model_dir, kind):
    out, facts = exported
    assert facts.files[kind] == f"model-{kind}.gguf" and (out / facts.files[kind]).stat().st_size == facts.bytes[kind]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref, mask = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tok)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=facts.files[kind], dtype=torch.float32)
    got, _ = logits(back, tok)
    rel = ((got - ref).abs()[mask].max() / ref[mask].abs().max()).item()
    print(f"{kind}: max |logit diff| / max |logit| = {rel:.3g}")
    assert rel < TOLERANCE[kind], f"{kind}: logits off by {rel:.3g} of their scale (tolerance {TOLERANCE[kind]})"
    assert rel > 0 or kind == "f16"  # bf16 and q8_0 do round: a zero would mean the original was read


def test_sizes_follow_the_types(exported):
    out, facts = exported
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-bf16.gguf", "model-f16.gguf", "model-q8_0.gguf"]
    assert facts.bytes["q8_0"] < 0.75 * facts.bytes["f16"]
    assert abs(facts.bytes["bf16"] - facts.bytes["f16"]) < 0.01 * facts.bytes["f16"]


def test_gguf_metadata_carries_chat_template_and_special_tokens(exported, tiny_model_dir):
    out, facts = exported
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for kind, name in facts.files.items():
        meta = export.read_metadata(out / name)
        assert meta["general.architecture"] == "llama"
        # byte-level BPE with its merges, and the pre-tokenizer llama.cpp recognized by hashing how
        # the tokenizer splits its probe text: SmolLM2's, as in the bundled GGUF
        assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm"), kind
        assert meta["tokenizer.chat_template"] == tok.chat_template, kind
        assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
        assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
        assert meta["tokenizer.ggml.add_bos_token"] is False  # SmolLM2's tokenizer adds no BOS
    # and the tokenizer transformers rebuilds from the GGUF tokenizes a chat like the original
    back = AutoTokenizer.from_pretrained(out, gguf_file=facts.files["q8_0"])
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What was revenue in 2024?"}]
    assert back.apply_chat_template(msgs, add_generation_prompt=True) == tok.apply_chat_template(msgs, add_generation_prompt=True)
    # (transformers' GGUF reader names <|im_start|> as eos here, as for the bundled GGUF whose metadata
    # also says 2: a quirk of that reader, which base_model corrects with models.base_model.fix_special_tokens;
    # llama.cpp reads the id above)


def test_modelfile_names_the_gguf_template_system_and_stops(exported):
    out, facts = exported
    pairs = parse_modelfile((out / "Modelfile").read_text())
    words = [w for w, _ in pairs]
    assert words[:2] == ["FROM", "TEMPLATE"] and words.count("FROM") == 1 and words.count("TEMPLATE") == 1
    args = dict(pairs)
    assert args["FROM"] == "./model-q8_0.gguf" and (out / "model-q8_0.gguf").is_file()  # the first type listed
    assert args["SYSTEM"] == SYSTEM
    template = args["TEMPLATE"]
    for piece in ("<|im_start|>{{ .Role }}\n{{ .Content }}", "<|im_start|>system\n{{ .System }}<|im_end|>",
                  "<|im_start|>assistant\n", "range $i, $_ := .Messages"):
        assert piece in template
    assert template.count("{{") == template.count("}}")
    stops = [a.split(" ", 1)[1].strip('"') for w, a in pairs if w == "PARAMETER" and a.startswith("stop ")]
    assert stops == ["<|im_end|>", "<|im_start|>"]


def test_modelfile_without_a_recipe_system_uses_the_templates_default(tiny_model_dir):
    family, template, stop, system = export.modelfile_parts(tiny_model_dir, None)
    assert family == "chatml"
    assert system and "SmolLM" in system  # SmolLM2's template injects it when a chat has no system turn
    assert stop[0] == "<|im_end|>"


def test_a_template_of_no_known_family_leaves_the_modelfile_to_the_ggufs_own(tiny_model_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}")
    family, template, stop, system = export.modelfile_parts(model, SYSTEM)
    assert (family, template, stop, system) == (None, None, ["<|im_end|>"], SYSTEM)
    text = export.modelfile_text("model-f16.gguf", template, system, stop)
    assert "TEMPLATE" not in dict(parse_modelfile(text))
    assert "Ollama uses the template embedded in the GGUF (tokenizer.chat_template)" in text


def test_a_checkpoint_with_code_is_refused(tiny_model_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(export.ExportError, match="custom code.*modeling_evil.py"):
        export.export_gguf(model, tmp_path / "out", ["f16"], SYSTEM)


def test_k_quants_without_llama_quantize_say_run_make_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_LLAMA_CPP_DIR", str(tmp_path / "nothing-built"))
    with pytest.raises(export.ExportError, match=r"q4_k_m need llama.cpp's llama-quantize.*make install"):
        export.check_types(["f16", "q4_k_m"])
    with pytest.raises(export.ExportError, match="unknown GGUF type.*q3_k_xl"):
        export.check_types(["q3_k_xl"])


def test_recipe_validates_export_types(tiny_model_dir):
    assert parse_recipe(make_recipe(tiny_model_dir, export={"gguf": ["f16", "q4_k_m"]})).export.gguf == ["f16", "q4_k_m"]
    with pytest.raises(RecipeError, match=r"export\.gguf: unknown GGUF type\(s\) 'q9'; known: f16, bf16, q8_0"):
        parse_recipe(make_recipe(tiny_model_dir, export={"gguf": ["f16", "q9"]}))
    with pytest.raises(RecipeError, match="listed twice"):
        parse_recipe(make_recipe(tiny_model_dir, export={"gguf": ["f16", "f16"]}))
    # a recipe without `export:` keeps its hash (the section is left out of the dump when empty)
    plain = parse_recipe(make_recipe(tiny_model_dir))
    assert "export" not in plain.model_dump(mode="json")
