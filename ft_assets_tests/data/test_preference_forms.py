"""Preference pairs as users of TRL bring them: the standard text form, the conversational form
(prompt turns + one assistant turn per answer), the implicit-prompt form (two whole
conversations), ShareGPT keys, and `format: hf` read offline; and TRL's unpaired KTO form
(prompt, completion, label: text, turns or CSV), its row errors, split and length limit; on the
real SmolLM2 tokenizer."""

from __future__ import annotations

import json

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
    ({"schema": "conversation"}, "schema: Input should be 'text', 'messages' or 'unpaired'"),
    ({"schema": "unpaired", "columns": {"chosen": "good"}},
     "columns.chosen applies to schema text or messages (pairs), and this schema is unpaired"),
    ({"columns": {"label": "ok"}}, "columns.label applies to schema: unpaired, and this schema is text"),
    ({"schema": "unpaired", "columns": {"prompt": None}}, "columns.prompt null (the implicit prompt) needs schema: messages"),
])
def test_recipe_refuses_preference_keys_of_another_form(prefs, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe({**BASE, "preferences": {"name": "p", "path": "p.jsonl", **prefs}}, "recipe.yaml")
    assert expected in str(err.value), str(err.value)


def test_recipe_accepts_each_preference_form():
    for prefs in ({"schema": "messages"}, {"schema": "messages", "columns": {"prompt": None}},
                  {"schema": "messages", "format": "hf", "split": "train",
                   "columns": {"role": "from", "content": "value", "roles": {"human": "user", "gpt": "assistant"}}},
                  {"schema": "unpaired", "columns": {"completion": "answer", "label": "good", "role": "from"}}):
        parse_recipe({**BASE, "methods": {"lora": {}, "kto": {"sft_from": "lora"}},
                      "preferences": {"name": "p", "path": "p.jsonl", **prefs}}, "recipe.yaml")


def test_unpaired_columns_at_their_defaults_leave_the_hash_unchanged():
    """`completion` and `label` are new keys: a recipe that does not set them hashes as before."""
    plain = parse_recipe({**BASE, "preferences": {"name": "p", "path": "p.jsonl"}})
    explicit = parse_recipe({**BASE, "preferences": {"name": "p", "path": "p.jsonl",
                                                     "columns": {"completion": "completion", "label": "label"}}})
    assert "completion" not in plain.model_dump()["preferences"]["columns"]
    assert plain.recipe_hash == explicit.recipe_hash
    assert preferences.preference_source(plain).columns["completion"] == "completion"  # the build sees every column


# --------------------------------------------------------------------------------------
# unpaired: TRL's KTO form (prompt, completion, label), one labelled answer a row
# --------------------------------------------------------------------------------------

UNPAIRED = {"prompt": "prompt", "completion": "completion", "label": "label", "id": "id"}


def unpaired_rows(pairs: list[dict], label=lambda good: good) -> list[dict]:
    """Each pair as two rows, as TRL's unpaired KTO data is: chosen desirable, rejected undesirable."""
    return [{"id": f"{p['id']}-{'good' if good else 'bad'}", "prompt": p["prompt"],
             "completion": p["chosen" if good else "rejected"], "label": label(good)}
            for p in pairs for good in (True, False)]


def answer_facts(built):
    return [[(a.id, a.prompt, a.completion, a.label, a.prompt_ids, a.completion_ids) for a in split]
            for split in (built.train, built.eval)]


def test_unpaired_answers_read_alike_as_text_turns_and_csv_and_tokenize_like_pairs(tok, tmp_path):
    """The unpaired form in text, in TRL's conversational form and in a CSV (labels as text) is the
    same data; each answer has the ids the same answer has in the paired build."""
    import csv

    pairs = text_rows()
    rows = unpaired_rows(pairs)
    text = write_jsonl(tmp_path / "text.jsonl", rows)
    turns = write_jsonl(tmp_path / "turns.jsonl", [
        {**r, "prompt": [user(r["prompt"])], "completion": [assistant(r["completion"])]} for r in rows])
    with (tmp_path / "u.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(UNPAIRED))
        writer.writeheader()
        writer.writerows({**r, "label": "TRUE" if r["label"] else "0"} for r in rows)
    built = [preferences.build_preference_dataset(source(path, "unpaired", UNPAIRED, format=fmt), tok,
                                                  system="Be brief.", max_length=160)
             for path, fmt in ((text, "jsonl"), (turns, "jsonl"), (tmp_path / "u.csv", "csv"))]
    assert answer_facts(built[0]) == answer_facts(built[1]) == answer_facts(built[2])
    assert not built[0].rejected and len(built[0].train) + len(built[0].eval) == len(rows)
    assert preferences.is_unpaired(built[0].train) and built[0].stats["form"] == "unpaired"
    assert built[0].stats["train_desirable"] == sum(a.label for a in built[0].train) > 0
    paired = preferences.build_preference_dataset(source(write_jsonl(tmp_path / "p.jsonl", pairs)), tok,
                                                  system="Be brief.", max_length=160)
    by_pair = {p.id: p for p in paired.train + paired.eval}
    for a in built[0].train + built[0].eval:
        pair = by_pair[a.id.rsplit("-", 1)[0]]
        assert a.prompt_ids == pair.prompt_ids and a.prompt_text == pair.prompt_text
        assert a.completion_ids == (pair.chosen_ids if a.label else pair.rejected_ids)
        assert a.completion_text.endswith("<|im_end|>") and a.completion_ids[-1] == tok.eos_token_id
        assert tok(a.prompt_text + a.completion_text, add_special_tokens=False)["input_ids"] == (
            a.prompt_ids + a.completion_ids)
    assert "form" not in paired.stats  # a paired set's dataset_info keeps its keys


def test_bad_unpaired_rows_are_rejected_with_line_field_and_what_to_write(tok, tmp_path):
    ok = {"prompt": "Revenue?", "completion": "$5 million", "label": True}
    rows = [
        {**ok, "id": "ok1"},                                                      # 1
        {**ok, "id": "r2", "label": "yes"},                                       # 2
        {**ok, "id": "r3", "label": 2},                                           # 3
        {**ok, "id": "r4", "label": None},                                        # 4
        {**ok, "id": "r5", "label": 1.0},                                         # 5
        {**ok, "id": "r6", "completion": "  "},                                   # 6
        {**ok, "id": "r7", "completion": [user("$5 million")]},                   # 7
        {**ok, "id": "r8", "prompt": [user("Revenue?"), assistant("$5 million")]},  # 8
        {**ok, "id": "r9", "prompt": 5},                                          # 9
        {**ok, "id": "r10"},                                                      # 10: duplicate of 1
        {**ok, "id": "r11", "label": False},                                      # 11: contradicts 1
        {**ok, "id": "ok2", "completion": "$5 billion", "label": "False"},        # 12
        {**ok, "id": "ok3", "prompt": "Costs?", "label": 0},                      # 13
    ]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    src = source(path, "unpaired", UNPAIRED)
    built = preferences.build_preference_dataset(src, tok, system=None, max_length=160)
    got = {r.line: (r.field, r.reason) for r in built.rejected}
    assert set(got) == set(range(2, 12)), got
    for line in (2, 3, 4, 5):
        assert got[line][0] == "label" and got[line][1].startswith("label (column 'label') ")
        assert "write true (a desirable answer) or false (an undesirable one)" in got[line][1]
    assert "is str 'yes'" in got[2][1] and "is int 2" in got[3][1] and "missing or null" in got[4][1]
    assert "is float 1.0" in got[5][1]
    assert got[6] == ("completion", "completion (column 'completion'): empty or whitespace")
    assert got[7][0] == "completion" and "role 'user'; an answer is an assistant turn" in got[7][1]
    assert got[8][0] == "prompt" and "must end with a user turn (the completion is the assistant's reply)" in got[8][1]
    assert got[9][0] == "prompt" and "is int 5; write the user's text" in got[9][1]
    assert got[10] == (None, "exact duplicate of line 1")
    assert got[11][0] == "label" and "same prompt and completion as line 1, which labels it true" in got[11][1]
    kept = {a.id: a.label for a in built.train + built.eval}
    assert kept == {"ok1": True, "ok2": False, "ok3": False}
    out = tmp_path / "out"
    out.mkdir()
    preferences.save_preferences(built, out, {})
    stored = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in stored] == list(range(2, 12)) and stored[0]["row"]["label"] == "yes"
    src.max_rejected_fraction = 0.5  # 10 of 13 rejected: the build fails, naming file, line, field and fix
    with pytest.raises(data.DataFileError, match=r"u\.jsonl: 10 of 13 rows rejected .*line 2: label \(column "
                                                 r"'label'\) is str 'yes'; write true"):
        preferences.build_preference_dataset(src, tok, system=None, max_length=160)
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "Revenue?", "label": tru}\n')
    with pytest.raises(data.DataFileError, match=r"broken\.jsonl:2: not valid JSON"):
        preferences.build_preference_dataset(source(tmp_path / "broken.jsonl", "unpaired", UNPAIRED), tok,
                                             system=None, max_length=160)
    with pytest.raises(data.DataFileError, match=r"column\(s\) \['answer'\] not found"):
        preferences.build_preference_dataset(source(path, "unpaired", {**UNPAIRED, "completion": "answer"}), tok,
                                             system=None, max_length=160)


def test_unpaired_split_is_seeded_per_answer_and_a_long_answer_is_rejected_not_cut(tok, tmp_path):
    rows = unpaired_rows(text_rows(12))
    for r in rows:
        del r["id"]  # the id is a hash of prompt and completion: relabelling an answer keeps its place

    def split(rows, **kw):
        src = source(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired", {**UNPAIRED, "id": None}, **kw)
        built = preferences.build_preference_dataset(src, tok, system=None, max_length=160)
        return built, {a.id: "eval" for a in built.eval} | {a.id: "train" for a in built.train}

    built, where = split(rows)
    assert len(built.eval) == round(0.25 * len(rows)) and len(where) == len(rows)
    _, shuffled = split(rows[::-1])
    assert shuffled == where  # file order plays no part
    relabelled = [dict(r, label=not r["label"]) if i == 3 else r for i, r in enumerate(rows)]
    _, after = split(relabelled)
    assert after == where
    _, reseeded = split(rows, split_seed=2)
    assert reseeded != where

    long = dict(rows[0], completion="revenue " * 200, label=False)
    built = preferences.build_preference_dataset(
        source(write_jsonl(tmp_path / "long.jsonl", [*rows, long]), "unpaired", {**UNPAIRED, "id": None}), tok,
        system=None, max_length=160)
    (rej,) = built.rejected
    assert rej.line == len(rows) + 1 and rej.field == "prompt"
    assert "truncating would cut an answer; raise prompt.max_length" in rej.reason and "> max_length 160" in rej.reason
    assert max(preferences.sequence_tokens(a) for a in built.train + built.eval) <= 160
