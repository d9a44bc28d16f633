"""Preference pairs as users of TRL bring them: the standard text form, the conversational form
(prompt turns + one assistant turn per answer), the implicit-prompt form (two whole
conversations), ShareGPT keys, and `format: hf` read offline; on the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ft_assets.data import rows as data, preferences
from ft_assets.config.recipe import RecipeError, parse_recipe
from ft_assets_tests.conftest import qa_rows, write_jsonl

COLS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id"}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def source(path, schema="text", columns=None, **kw):
    spec = dict(name="prefs", path=path, format="jsonl", columns={**COLS, **(columns or {})}, eval_fraction=0.25,
                split_seed=1, max_rejected_fraction=0.9, schema=schema)
    return preferences.PreferenceSource(**{**spec, **kw})


def text_rows(n: int = 8) -> list[dict]:
    return [{"id": r["id"], "prompt": f"{r['context']} {r['question']}", "chosen": r["answer"],
             "rejected": r["answer"].replace("million", "billion")} for r in qa_rows(n)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def facts(built):
    return [[(p.id, p.prompt, p.chosen, p.rejected, p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in split]
            for split in (built.train, built.eval)]


def test_the_three_forms_of_one_pair_set_give_the_same_pairs(tok, tmp_path):
    """TRL's standard, conversational and implicit-prompt forms of the same pairs are the same
    training data: same ids, same tokens, same split."""
    rows = text_rows()
    standard = write_jsonl(tmp_path / "standard.jsonl", rows)
    conversational = write_jsonl(tmp_path / "conv.jsonl", [
        {"id": r["id"], "prompt": [user(r["prompt"])], "chosen": [assistant(r["chosen"])],
         "rejected": r["rejected"]} for r in rows])  # an answer may also be its text
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"id": r["id"], "chosen": [user(r["prompt"]), assistant(r["chosen"])],
         "rejected": [user(r["prompt"]), assistant(r["rejected"])]} for r in rows])
    built = [preferences.build_preference_dataset(src, tok, system="Be brief.", max_length=160) for src in (
        source(standard), source(conversational, "messages"), source(implicit, "messages", {"prompt": None}))]
    assert facts(built[0]) == facts(built[1]) == facts(built[2])
    assert len(built[0].train) + len(built[0].eval) == len(rows) and not built[1].rejected
    pair = built[1].train[0]
    assert pair.messages == [user(pair.prompt)]
    assert pair.prompt_text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_a_multi_turn_prompt_renders_its_own_turns_and_system(tok, tmp_path):
    turns = [{"role": "system", "content": "Answer in figures."}, user("Revenue in 2024 was $5 million. Revenue?"),
             assistant("$5 million"), user("And in 2023, when it was $4 million?")]
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": turns, "chosen": [assistant("$4 million")],
                                               "rejected": [assistant("$5 million")]}] + [
        {"id": f"b{i}", "prompt": [user(f"Q{i}?")], "chosen": "yes", "rejected": "no"} for i in range(3)])
    built = preferences.build_preference_dataset(source(path, "messages"), tok, system="Be brief.", max_length=160)
    pair = next(p for p in built.train + built.eval if p.id == "a")
    # the conversation's own system turn stands; the recipe's system is not added before it
    assert pair.prompt_text == tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert pair.prompt == "And in 2023, when it was $4 million?" and pair.messages == turns
    assert pair.chosen_text == "$4 million<|im_end|>" and pair.chosen_ids[-1] == tok.eos_token_id
    assert tok(pair.prompt_text + pair.chosen_text, add_special_tokens=False)["input_ids"] == (
        pair.prompt_ids + pair.chosen_ids)


def test_bad_conversational_pairs_are_rejected_with_line_field_and_reason(tok, tmp_path):
    good = {"prompt": [user("Revenue?")], "chosen": [assistant("$5 million")], "rejected": [assistant("$5 billion")]}
    rows = [
        {**good, "id": "ok1"},
        {**good, "id": "r2", "prompt": [user("Revenue?"), assistant("$5 million")]},
        {**good, "id": "r3", "chosen": [assistant("$5 million"), assistant("Sure.")]},
        {**good, "id": "r4", "rejected": [user("$5 billion")]},
        {**good, "id": "r5", "prompt": [{"role": "bot", "content": "Revenue?"}]},
        {**good, "id": "r6", "rejected": [assistant("$5 million")]},
        {**good, "id": "r7", "prompt": [user("  ")]},
        {**good, "id": "r8", "chosen": None},
        {**good, "id": "ok2", "prompt": [user("Costs?")]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    built = preferences.build_preference_dataset(source(path, "messages"), tok, system=None, max_length=160)
    got = {r.line: (r.field, r.reason) for r in built.rejected}
    assert set(got) == {2, 3, 4, 5, 6, 7, 8}
    assert got[2][0] == "prompt" and "must end with a user turn" in got[2][1]
    assert got[3][0] == "chosen" and "has 2 turns; an answer is one assistant turn" in got[3][1]
    assert got[4][0] == "rejected" and "role 'user'; an answer is an assistant turn" in got[4][1]
    assert got[5][0] == "prompt" and "unknown role 'bot'" in got[5][1]
    assert got[6][0] == "rejected" and "same text" in got[6][1]
    assert got[7][0] == "prompt" and "empty or whitespace" in got[7][1]
    assert got[8][0] == "chosen" and "missing or null" in got[8][1]
    assert sorted(p.id for p in built.train + built.eval) == ["ok1", "ok2"]

    implicit = write_jsonl(tmp_path / "i.jsonl", [
        {"id": "ok", "chosen": [user("Revenue?"), assistant("$5 million")],
         "rejected": [user("Revenue?"), assistant("$5 billion")]},
        {"id": "bad", "chosen": [user("Revenue?"), assistant("$5 million")],
         "rejected": [user("Costs?"), assistant("$5 billion")]},
        {"id": "ends", "chosen": [user("Revenue?")], "rejected": [user("Revenue?"), assistant("$5 billion")]},
    ])
    built = preferences.build_preference_dataset(source(implicit, "messages", {"prompt": None}), tok, system=None,
                                                 max_length=160)
    got = {r.line: (r.field, r.reason) for r in built.rejected}
    assert got[2][0] == "rejected" and "differ before their last turn" in got[2][1]
    assert got[3][0] == "chosen" and "must end with an assistant turn" in got[3][1]


def test_hf_dataset_in_sharegpt_keys_reads_offline_by_split_and_errors_say_row(tok, tmp_path):
    import datasets

    def sharegpt(i, chosen, rejected):
        return {"id": f"p{i}", "prompt": [{"from": "human", "value": f"Revenue of unit {i}?"}],
                "chosen": [{"from": "gpt", "value": chosen}], "rejected": [{"from": "gpt", "value": rejected}]}

    train = [sharegpt(i, f"${i} million", f"${i} billion") for i in range(6)] + [sharegpt(9, "same", "same")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(train[:2])}).save_to_disk(str(tmp_path / "ds"))
    cols = {"role": "from", "content": "value", "roles": {"human": "user", "gpt": "assistant"}}
    src = source(tmp_path / "ds", "messages", cols, format="hf", split="train", max_rejected_fraction=0.0)
    with pytest.raises(data.DataFileError, match=r"1 of 7 rows rejected .*row 7: chosen and rejected are the same"):
        preferences.build_preference_dataset(src, tok, system=None, max_length=160)
    src.max_rejected_fraction = 0.5
    built = preferences.build_preference_dataset(src, tok, system=None, max_length=160)
    assert sorted(p.id for p in built.train + built.eval) == [f"p{i}" for i in range(6)]
    assert {p.chosen for p in built.train} <= {f"${i} million" for i in range(6)}
    src.split = "validation"
    with pytest.raises(data.DataFileError, match=r"no split 'validation'; the dataset has \['test', 'train'\]"):
        preferences.build_preference_dataset(src, tok, system=None, max_length=160)


BASE = {"name": "r", "datasets": [{"name": "qa", "path": "data/qa.jsonl"}],
        "methods": {"lora": {}, "dpo": {"sft_from": "lora"}}}


@pytest.mark.parametrize("prefs, expected", [
    ({"columns": {"prompt": None}}, "columns.prompt null (the implicit prompt) needs schema: messages"),
    ({"split": "train"}, "split applies to format hf only"),
    ({"schema": "conversation"}, "schema: Input should be 'text' or 'messages'"),
])
def test_recipe_refuses_preference_keys_of_another_form(prefs, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe({**BASE, "preferences": {"name": "p", "path": "p.jsonl", **prefs}}, "recipe.yaml")
    assert expected in str(err.value), str(err.value)


def test_recipe_accepts_each_preference_form():
    for prefs in ({"schema": "messages"}, {"schema": "messages", "columns": {"prompt": None}},
                  {"schema": "messages", "format": "hf", "split": "train",
                   "columns": {"role": "from", "content": "value", "roles": {"human": "user", "gpt": "assistant"}}}):
        parse_recipe({**BASE, "preferences": {"name": "p", "path": "p.jsonl", **prefs}}, "recipe.yaml")
