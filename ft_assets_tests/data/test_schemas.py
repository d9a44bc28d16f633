"""Dataset schemas (messages, prompt_completion, alpaca), `format: hf`/`arrow` and chat templates,
on the real SmolLM2 tokenizer: masks checked token by token against literal ChatML text."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ft_assets.data import chat, rows as data, hfdata, sft_dataset
from ft_assets.config import chat_templates
from ft_assets.config.recipe import RecipeError, parse_recipe
from ft_assets.artifacts.store import file_hash
from ft_assets_tests.conftest import write_jsonl

MSG_COLS = {"messages": "messages", "role": "role", "content": "content", "roles": {}, "id": None}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def source(path, schema, columns, **kw):
    spec = dict(name="d", path=path, format="jsonl", columns=columns, eval_fraction=0.25, split_seed=1,
                max_rejected_fraction=0.9, schema=schema)
    spec.update(kw)
    return data.SourceSpec(**spec)


def build(tok, *sources, max_length=256, system=None, **kw):
    return sft_dataset.build_sft_dataset(sources, tok, system=system, template="Context:\n{context}\n\nQuestion: {question}",
                                  template_without_context="Question: {question}", max_length=max_length, **kw)


def conv(*pairs, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return turns


def expected(tok, segments):
    """(ids, labels) from (text, trained?) segments, each tokenized on its own: the boundaries
    are special tokens, so this is how the whole conversation must tokenize."""
    ids, labels = [], []
    for text, trained in segments:
        seg = tok(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if trained else [data.IGNORE_INDEX] * len(seg)
    return ids, labels


TWO_TURNS = conv(("Revenue in 2024?", "$5 million"), ("And in 2023?", "$4 million"), system="Be brief.")


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_messages_mask_token_by_token(tok, train_on):
    turns, reason = chat.conversation(TWO_TURNS, "messages")
    assert reason is None
    ids, labels, answer_start = chat.mask_conversation(tok, turns, train_on, 256)
    want_ids, want_labels = expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nRevenue in 2024?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("$5 million<|im_end|>", train_on == "all_assistant"),
        ("\n<|im_start|>user\nAnd in 2023?<|im_end|>\n<|im_start|>assistant\n", False),
        ("$4 million<|im_end|>", True),
    ])
    assert ids == want_ids
    assert labels == want_labels  # every position: masked, or the token itself
    assert tok.decode(ids[:answer_start]).endswith("And in 2023?<|im_end|>\n<|im_start|>assistant\n")
    assert labels[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_messages_rows_through_the_build(tok, tmp_path):
    rows = [{"id": f"c{i}", "messages": conv((f"Revenue of unit {i}?", f"${i} million"), ("And costs?", f"${i + 1}"))}
            for i in range(8)]
    ds = build(tok, source(write_jsonl(tmp_path / "c.jsonl", rows), "messages", {**MSG_COLS, "id": "id"}),
               system="Answer briefly.")
    ex = (ds.train + ds.eval)[0]
    assert ex.messages is not None and ex.question == "And costs?" and ex.answer.startswith("$")
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")  # prompt.system when it has none
    labelled = tok.decode([t for t in ex.labels if t != data.IGNORE_INDEX])
    assert labelled == f"{ex.messages[1]['content']}<|im_end|>{ex.answer}<|im_end|>"
    assert tok.decode(ex.input_ids[ex.prompt_len:]) == f"{ex.answer}<|im_end|>"  # eval: the last reply
    assert ds.stats["train_rows"] == 6 and ds.stats["eval_rows"] == 2


BAD = [
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "turn 2: unknown role 'bot'"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "turn 1: assistant first; expected user"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
     "turn 2: user after user; expected assistant"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "turn 2 (assistant): content is empty"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
     "must end with an assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "turn 2: system after user"),
    ([{"role": "system", "content": "s"}], "only a system turn"),
    ([{"content": "q"}], "turn 1 has no 'role' key"),
    ([{"role": ["user"], "content": "q"}], "turn 1: role ('role') is list, expected text"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "turn 1 (user): content ('content') is int"),
    ([], "empty conversation"),
    ("not json", "not a JSON list of turns"),
    ({"role": "user"}, "is dict, expected a list"),
]


def test_bad_conversations_are_rejected_with_line_and_reason(tok, tmp_path):
    good = [{"messages": conv((f"q{i}", f"a{i}"))} for i in range(len(BAD) + 2)]
    long = {"messages": conv(("q", "word " * 300))}
    rows = good + [{"messages": m} for m, _ in BAD] + [long, {"messages": good[0]["messages"]}]
    ds = build(tok, source(write_jsonl(tmp_path / "c.jsonl", rows), "messages", MSG_COLS), max_length=128)
    reasons = {r.line: r.reason for _, r in ds.rejected}
    first_bad = len(good) + 1
    for i, (_, why) in enumerate(BAD):
        assert why in reasons[first_bad + i], (first_bad + i, reasons.get(first_bad + i))
    assert "conversation is" in reasons[first_bad + len(BAD)] and "> max_length 128 (turn 2" in reasons[first_bad + len(BAD)]
    assert reasons[len(rows)] == "exact duplicate of line 1"
    assert len(ds.rejected) == len(BAD) + 2


def test_sharegpt_keys_and_role_names_map(tok, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(4)]
    cols = {"messages": "conversations", "role": "from", "content": "value", "roles": {"human": "user", "gpt": "assistant"},
            "id": None}
    ds = build(tok, source(write_jsonl(tmp_path / "s.jsonl", rows), "messages", cols))
    assert not ds.rejected and {e.answer for e in ds.train + ds.eval} == {"a0", "a1", "a2", "a3"}


def test_prompt_completion_and_alpaca_render_the_user_turn(tok, tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(4)])
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Classify.", "input": "Profits rose.", "output": "positive"},
                                             {"instruction": "Name a bank.", "input": "", "output": "Copper Run"},
                                             {"instruction": "Name a city.", "output": "Oslo"},
                                             {"instruction": "Sum 1+1.", "input": None, "output": "2"}])
    ds = build(tok, source(pc, "prompt_completion", {"prompt": "prompt", "completion": "completion", "id": None}),
               source(alp, "alpaca", {"instruction": "instruction", "input": "input", "output": "output", "id": None},
                      name="a"))
    assert not ds.rejected
    by_answer = {e.answer: e for e in ds.train + ds.eval}
    assert tok.decode(by_answer["positive"].input_ids).endswith(
        "<|im_start|>user\nClassify.\n\nProfits rose.<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>")
    assert tok.decode(by_answer["Copper Run"].input_ids).endswith(
        "<|im_start|>user\nName a bank.<|im_end|>\n<|im_start|>assistant\nCopper Run<|im_end|>")
    ex = by_answer["2"]
    assert tok.decode(ex.input_ids[ex.prompt_len:]) == "2<|im_end|>"
    assert tok.decode(by_answer["3"].input_ids).endswith("<|im_start|>user\nSay 3.<|im_end|>\n<|im_start|>assistant\n3<|im_end|>")


def test_csv_messages_cell_is_json_and_missing_columns_name_the_schema(tok, tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('messages\n"[{""role"": ""user"", ""content"": ""q""}, {""role"": ""assistant"", ""content"": ""a""}]"\n'
                 '"[{""role"": ""user"", ""content"": ""q2""}, {""role"": ""assistant"", ""content"": ""a2""}]"\n')
    ds = build(tok, source(p, "messages", MSG_COLS, format="csv"))
    assert {e.answer for e in ds.train + ds.eval} == {"a", "a2"}
    with pytest.raises(data.DataFileError, match=r"column\(s\) \['prompt'\] not found"):
        build(tok, source(p, "prompt_completion", {"prompt": "prompt", "completion": "messages", "id": None}, format="csv"))


# --------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------


@pytest.fixture
def bare_tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = None
    return t


def test_no_template_anywhere_is_refused_with_what_to_set(bare_tok, tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv(("q", "a"))}, {"messages": conv(("q2", "a2"))}])
    with pytest.raises(chat.ChatTemplateError, match="set prompt.chat_template"):
        build(bare_tok, source(p, "messages", MSG_COLS))


def test_named_and_file_templates_render_and_are_given_back(bare_tok, tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv((f"q{i}", f"a{i}"))} for i in range(4)])
    ds = build(bare_tok, source(p, "messages", MSG_COLS), chat_template=chat_templates.chat_template_text("chatml"))
    ex = ds.train[0]
    assert bare_tok.decode(ex.input_ids) == f"<|im_start|>user\n{ex.question}<|im_end|>\n<|im_start|>assistant\n{ex.answer}<|im_end|>"
    assert bare_tok.chat_template is None  # the override does not outlive the build
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}<|im_end|>{% endfor %}"
                                      "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    recipe = parse_recipe({"name": "t", "datasets": [{"name": "c", "path": str(p)}], "allow_paths_outside_root": True,
                           "prompt": {"chat_template": str(tmp_path / "t.jinja")}, "methods": {"lora": {}}})
    ds = build(bare_tok, source(p, "messages", MSG_COLS), chat_template=recipe.chat_template_text())
    ex = ds.train[0]
    assert bare_tok.decode(ex.input_ids) == f"[user]\n{ex.question}<|im_end|>[assistant]\n{ex.answer}<|im_end|>"
    assert bare_tok.decode([t for t in ex.labels if t != data.IGNORE_INDEX]) == f"{ex.answer}<|im_end|>"


def test_a_template_that_is_not_prefix_stable_rejects_the_rows(tok, tmp_path):
    unstable = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv((f"q{i}", f"a{i}"))} for i in range(3)])
    with pytest.raises(data.DataFileError, match="renders turn 2 differently with and without the reply") as err:
        build(tok, source(p, "messages", MSG_COLS), chat_template=unstable)
    assert len(err.value.rejected) == 3


def test_recipe_checks_schema_columns_and_keys():
    def problems(**ds):
        try:
            parse_recipe({"name": "t", "datasets": [{"name": "c", "path": "d.jsonl", **ds}], "methods": {"lora": {}}})
        except RecipeError as exc:
            return "\n".join(exc.problems)
        return ""

    assert "unknown key(s) ['question'] for schema 'messages'" in problems(schema="messages", columns={"question": "q"})
    assert "train_on applies to schema messages only" in problems(train_on="last_assistant")
    assert "split applies to format hf only" in problems(split="train")
    assert "'qa', 'messages', 'prompt_completion' or 'alpaca'" in problems(schema="chat")
    assert problems(schema="alpaca", columns={"input": None}) == ""
    assert problems(schema="messages", format="hf", split="test", train_on="last_assistant") == ""
    with pytest.raises(RecipeError, match="neither a built-in template"):
        parse_recipe({"name": "t", "datasets": [{"name": "c", "path": "d"}], "methods": {"lora": {}},
                      "prompt": {"chat_template": "mistral"}})


# --------------------------------------------------------------------------------------
# format: hf and arrow
# --------------------------------------------------------------------------------------

HF_ROWS = [{"messages": conv((f"Revenue of unit {i}?", f"${i} million"))} for i in range(6)]


def test_hf_save_to_disk_dataset_dict_needs_a_split_and_says_row(tok, tmp_path):
    import datasets

    rows = HF_ROWS + [{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(HF_ROWS[:2])})
    dd.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(data.DataFileError, match=r"splits \['test', 'train'\]; choose one with datasets\[\]\.split"):
        data.read_rows(tmp_path / "ds", "hf")
    with pytest.raises(data.DataFileError, match=r"no split 'validation'"):
        data.read_rows(tmp_path / "ds", "hf", "validation")
    assert [n for n, _ in data.read_rows(tmp_path / "ds", "hf", "train")] == list(range(1, 8))
    with pytest.raises(data.DataFileError, match=r"1 of 7 rows rejected .*First: row 7: turn 2: user after user"):
        build(tok, source(tmp_path / "ds", "messages", MSG_COLS, format="hf", split="train", max_rejected_fraction=0.0))
    ds = build(tok, source(tmp_path / "ds", "messages", MSG_COLS, format="hf", split="train"))
    assert ds.stats["train_rows"] + ds.stats["eval_rows"] == 6 and ds.rejected[0][1].line == 7


def test_hf_hub_layout_dir_and_cached_id_load_offline(tmp_path, monkeypatch):
    hub = tmp_path / "hub" / "datasets--acme--finchat"
    snap = hub / "snapshots" / "0123abcd"
    (snap / "data").mkdir(parents=True)
    write_jsonl(snap / "data" / "train.jsonl", HF_ROWS)
    write_jsonl(snap / "data" / "test.jsonl", HF_ROWS[:2])
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0123abcd")
    assert len(data.read_rows(snap, "hf", "test")) == 2  # a local directory in Hub layout
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from pathlib import Path

    rows = data.read_rows(Path("acme/finchat"), "hf", "train")  # an id, from the cache only
    assert [r["messages"][1]["content"] for _, r in rows] == [f"${i} million" for i in range(6)]
    assert hfdata.source_version(Path("acme/finchat")) == hfdata.source_version(snap) != "missing"
    with pytest.raises(data.DataFileError, match="no dataset with this id in the local Hugging Face cache"):
        data.read_rows(Path("acme/other"), "hf", "train")
    assert hfdata.source_version(Path("acme/other")) == "missing"


def test_hf_version_is_a_content_hash_and_arrow_files_read(tmp_path):
    import datasets

    for name in ("a", "b"):
        datasets.Dataset.from_list(HF_ROWS).save_to_disk(str(tmp_path / name))
    datasets.Dataset.from_list(HF_ROWS[:5]).save_to_disk(str(tmp_path / "c"))
    va, vb, vc = (hfdata.source_version(tmp_path / n) for n in "abc")
    assert va == vb != vc and len(va) == 16
    arrow = next((tmp_path / "a").glob("*.arrow"))
    rows = data.read_rows(arrow, "arrow")
    assert [n for n, _ in rows] == list(range(1, 7)) and rows[0][1] == json.loads(json.dumps(HF_ROWS[0]))
    assert hfdata.source_version(arrow) == file_hash(arrow)[:16]  # a single file: the hash raw/ always used
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(data.DataFileError, match="not a readable Arrow IPC file"):
        data.read_rows(bad, "arrow")
