"""Hostile rows and slow paths: what a data file from anywhere can do to the data stage.

Each test writes a real file and builds it the way the `sft_dataset` asset does
(`sft_dataset.write_sft_dataset` / `build_sft_dataset` over `data.iter_rows`), or the preference
build for the DPO rows. Typical bad rows keep their reasons, rejected.jsonl bytes and versions
(literals computed on the code before the caps existed)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from ft_assets.data import rows as D
from ft_assets.data import preferences
from ft_assets.data import sft_dataset as S
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import qa_rows, write_jsonl

QA = {"question": "question", "context": "context", "answer": "answer", "id": "id"}
MESSAGES = {"messages": "messages", "id": "id"}
PREFS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id"}
PROMPT = dict(system=None, template="Context:\n{context}\n\nQuestion: {question}",
              template_without_context="{question}")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def source(path, name="qa", fmt="jsonl", columns=QA, schema="qa", **kw):
    return D.SourceSpec(name, path, fmt, columns, eval_fraction=0.2, split_seed=5, max_rejected_fraction=0.5,
                        schema=schema, **kw)


def build(tok, *sources, max_length=128):
    return S.build_sft_dataset(list(sources), tok, max_length=max_length, num_proc=1, **PROMPT)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def chat(n_turns: int, word: str = "turn") -> list[dict]:
    return [(user if i % 2 == 0 else assistant)(f"{word} {i}") for i in range(n_turns)]


def reasons(built) -> list[tuple]:
    return [(s, r.line, r.field, r.reason) for s, r in built.rejected]


# --------------------------------------------------------------------------------------
# legitimate files keep their rejections byte for byte, and their versions
# --------------------------------------------------------------------------------------


def typical_files(tmp_path):
    """Three sources with the bad rows real files have (blank, missing, wrong type, duplicate,
    too long, bad conversations, an over-long chat of many turns)."""
    qa = qa_rows(30)
    qa[2] = {**qa[2], "answer": "  "}
    qa[4] = {**qa[4], "question": 42}
    qa[6] = {k: v for k, v in qa[6].items() if k != "answer"}
    qa[8] = {**qa[8], "question": ["What was", "revenue?"]}
    qa[9] = {**qa[9], "context": "long " * 400}
    qa.append(dict(qa[7]))
    conv = [{"id": f"c{i}", "messages": [user(f"hi {i}"), assistant(f"hello {i}")]} for i in range(20)]
    conv[1]["messages"] = [user("a"), {"role": "bot", "content": "b"}]
    conv[3]["messages"] = [user("a"), user("b"), assistant("c")]
    conv[5]["messages"] = [user("a"), assistant("b"), user("c")]
    conv[7]["messages"] = chat(40)  # over max_length 128 at its 7th turn
    conv[9]["messages"] = chat(200)  # many turns, over max_length
    conv[13]["messages"] = [user("q"), assistant("a " * 60), *chat(120, "a somewhat longer turn")]
    conv[15]["messages"] = chat(68, "x")[:-1] + [assistant("the last reply " * 20)]  # over at its last turn
    conv[11]["messages"] = [user("q"), {"role": "assistant"}]
    csv_path = tmp_path / "t.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "question", "context", "answer"])
        for i, r in enumerate(qa_rows(12)):
            w.writerow([r["id"], "" if i == 3 else r["question"], "two\nlines" if i == 5 else r["context"],
                        r["answer"]])
    table = [{**r, "answer": None if i == 2 else r["answer"]} for i, r in enumerate(qa_rows(10))]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "t.parquet")
    return [source(write_jsonl(tmp_path / "qa.jsonl", qa)),
            source(write_jsonl(tmp_path / "conv.jsonl", conv), name="conv", columns=MESSAGES, schema="messages"),
            source(csv_path, name="table", fmt="csv"), source(tmp_path / "t.parquet", name="pq", fmt="parquet")]


def written(tok, tmp_path, sources):
    return S.write_sft_dataset(ArtifactStore(tmp_path / "store"), sources, tok, max_length=128, seed=3, num_proc=1,
                               inputs={}, recipe_hash="r", code_version="c", **PROMPT)


def test_typical_bad_rows_keep_their_reasons_rejected_jsonl_and_version(tok, tmp_path):
    made = written(tok, tmp_path, typical_files(tmp_path))
    over = "> max_length 128 (turn {}, assistant, ends at token {}); truncating would cut a reply; shorten it or " \
           "raise prompt.max_length"
    assert [(s, r.line, r.field, r.reason) for s, r in made.rejected] == [
        ("qa", 3, "answer", "answer (column 'answer') is empty or whitespace"),
        ("qa", 5, "question", "question (column 'question') is int 42, expected text; quote it"),
        ("qa", 7, "answer", "answer (column 'answer') is missing or null"),
        ("qa", 9, "question", "question (column 'question') is list ['What was', 'revenue?'], expected text; quote it"),
        ("qa", 31, None, "exact duplicate of line 8"),
        ("qa", 10, "prompt", "prompt alone is 443 tokens, max_length is 128; shorten the context or raise "
                             "prompt.max_length"),
        ("conv", 2, "messages", "turn 2: unknown role 'bot'; expected system, user or assistant (map other names with "
                                "columns.roles)"),
        ("conv", 4, "messages", "turn 2: user after user; expected assistant (an optional system turn first, then user "
                                "and assistant alternating)"),
        ("conv", 6, "messages", "the last turn (turn 3) is user; a conversation must end with an assistant turn"),
        ("conv", 12, "messages", "turn 2 (assistant): content ('content') is missing, expected text"),
        ("conv", 8, "messages", "conversation is 390 tokens " + over.format(14, 143)),
        ("conv", 10, "messages", "conversation is 2010 tokens " + over.format(14, 143)),
        ("conv", 14, "messages", "conversation is 1602 tokens " + over.format(6, 138)),
        ("conv", 16, "messages", "conversation is 712 tokens " + over.format(14, 143)),
        ("table", 5, "question", "question (column 'question') is empty or whitespace"),
        ("pq", 3, "answer", "answer (column 'answer') is missing or null"),
    ]
    rejected_jsonl = (Path(made.artifact.path) / "rejected.jsonl").read_bytes()
    # both computed on the code before the row caps (the rows are stored whole, as before)
    want = "230d5e74cf529eb10ee9e83c750aaa9f804a5adff7c04aa4f4e5ebe747fb4dcc"
    assert hashlib.sha256(rejected_jsonl).hexdigest() == want
    assert made.artifact.version == "193cf5f56d512e41"

def typical_pairs(tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(16)]
    rows[1] = {**rows[1], "rejected": rows[1]["chosen"]}
    rows[3] = {**rows[3], "chosen": None}
    rows[5] = {**rows[5], "prompt": 7}
    rows[7] = dict(rows[6])
    rows[9] = {**rows[9], "chosen": [{"role": "user", "content": "not an answer"}]}
    rows[11] = {**rows[11], "prompt": [user("a"), assistant("b")]}
    rows[13] = {**rows[13], "chosen": "long " * 300}
    return preferences.PreferenceSource("prefs", write_jsonl(tmp_path / "p.jsonl", rows), "jsonl", PREFS, 0.25, 1, 0.9,
                                        schema="messages")


def test_typical_bad_pairs_keep_their_reasons_and_rows(tok, tmp_path):
    built = preferences.build_preference_dataset(typical_pairs(tmp_path), tok, system=None, max_length=128)
    assert [(r.line, r.field, r.reason) for r in built.rejected] == [
        (2, "rejected", "chosen and rejected are the same text; a pair needs two different answers"),
        (4, "chosen", "chosen (column 'chosen'): missing or null"),
        (6, "prompt", "prompt: messages (column 'prompt') is int, expected a list of {role, content} turns"),
        (8, None, "exact duplicate of line 7"),
        (10, "chosen", "chosen (column 'chosen'): its turn has role 'user'; an answer is an assistant turn"),
        (12, "prompt", "prompt: the last turn (turn 2) is assistant; the prompt must end with a user turn (chosen and "
                       "rejected are the assistant's reply)"),
        (14, "prompt", "prompt+answer is 336 tokens > max_length 128; truncating would cut an answer; raise "
                       "prompt.max_length"),
    ]
    rows = json.dumps([r.row for r in built.rejected]).encode()  # computed on the code before the caps
    assert hashlib.sha256(rows).hexdigest() == "8870c01dabe04c04d2f1c20b68135ac15a8a026d6b3de189aed70b6e3e0ba825"


# --------------------------------------------------------------------------------------
# one byte cap per row, in every format
# --------------------------------------------------------------------------------------

CAP = 16 * 2**20  # data.MAX_ROW_BYTES


def write_rows(rows: list[dict], path, fmt: str):
    if fmt == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if fmt == "json":  # one array, pretty-printed as alpaca_data.json ships
        path.with_suffix(".json").write_text(json.dumps(rows, indent=4))
        return path.with_suffix(".json")
    table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        pq.write_table(table, path.with_suffix(".parquet"))
        return path.with_suffix(".parquet")
    if fmt == "arrow":
        with pa.OSFile(str(path.with_suffix(".arrow")), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        return path.with_suffix(".arrow")
    import datasets

    datasets.Dataset(table).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow", "hf"])
def test_a_row_over_the_byte_cap_is_rejected_with_its_size_and_the_rest_builds(tok, tmp_path, fmt):
    rows = [{**r, "notes": ""} for r in qa_rows(10)]
    # no answer, so the code before the cap rejected it quickly too (storing the whole row)
    rows.insert(3, {"id": "huge", "question": "q", "context": "c", "answer": None, "notes": "x" * (CAP + 1000)})
    built = build(tok, source(write_rows(rows, tmp_path / "d", fmt), fmt=fmt))
    [(name, rej)] = built.rejected
    assert (name, rej.line, rej.row) == ("qa", 4, None)
    assert rej.reason.startswith("row is ")
    assert rej.reason.endswith("bytes, over the 16 MiB a row may hold (data.MAX_ROW_BYTES); shorten or split it")
    size = int(rej.reason.split()[2].replace(",", ""))
    assert CAP < size < CAP + 2000 and len(rej.reason) < 300
    assert len(built.train) + len(built.eval) == 10
    assert D.MAX_ROW_BYTES == CAP


def test_a_csv_field_over_128_kib_reads_and_a_record_over_the_cap_names_its_first_line(tok, tmp_path):
    long_context = "word " * 40_000  # 200 KB: over Python csv's default field_size_limit (131072)
    p = tmp_path / "long.csv"
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "question", "context", "answer"])
        for i, r in enumerate(qa_rows(8)):
            w.writerow([r["id"], "two\nlines?" if i == 3 else r["question"], long_context if i == 3 else r["context"],
                        r["answer"]])
    assert [len(r["context"]) for line, r in D.read_rows(p, "csv") if line == 6] == [len(long_context)]
    built = build(tok, source(p, fmt="csv"), max_length=128)
    [(_, rej)] = built.rejected  # read whole (lines 5-6: one record), then too long for max_length 128
    assert rej.line == 6 and rej.reason.startswith("prompt alone is ") and int(rej.reason.split()[3]) > 40_000

    bad = tmp_path / "unclosed.csv"  # an unclosed quote runs the record on to the end of the file
    bad.write_text("id,question,context,answer\nt1,q,c,a\nt2,\"q,c,a\n" + ("more text\n" * (CAP // 10 + 10)))
    with pytest.raises(D.DataFileError) as err:
        list(D.iter_rows(bad, "csv"))
    msg = str(err.value)
    assert msg.startswith(f"{bad}:3: the CSV record that starts at line 3 is over 16 MiB (data.MAX_ROW_BYTES)")
    assert "unclosed quote" in msg and err.value.line == 3

    stray = tmp_path / "stray.csv"  # a bare carriage return in line 5, after a record of two lines
    stray.write_bytes(b'id,question,context,answer\nt1,q,c,a\nt2,"multi\nline",c,a\nt3,q\rx,c,a\n')
    with pytest.raises(D.DataFileError, match=r"stray\.csv:5: not valid CSV \(new-line character seen"):
        list(D.iter_rows(stray, "csv"))


# --------------------------------------------------------------------------------------
# nesting
# --------------------------------------------------------------------------------------


def test_a_deeply_nested_row_is_rejected_and_the_rest_of_the_file_builds(tok, tmp_path):
    deep_list = "[" * 100_000 + "]" * 100_000
    deep_object = '{"a": ' * 5_000 + "1" + "}" * 5_000
    lines = [json.dumps(r) for r in qa_rows(10)]
    lines[2] = '{"id": "deep", "question": ' + deep_list + ', "answer": "a"}'
    lines[5] = '{"id": "deeper", "question": ' + deep_object + ', "answer": "a"}'
    rows = qa_rows(10)
    lines[7] = json.dumps({**rows[7], "meta": json.loads("[" * 100 + "]" * 100)})  # 101 levels: json parses it
    lines[8] = json.dumps({**rows[8], "meta": json.loads("[" * 99 + "]" * 99)})  # 100 levels: the limit, kept
    p = tmp_path / "deep.jsonl"
    p.write_text("\n".join(lines) + "\n")
    built = build(tok, source(p))
    too_deep = "row is nested deeper than 100 levels (data.MAX_ROW_DEPTH); flatten it"
    assert [(r.line, r.row, r.reason) for _, r in built.rejected] == [(3, None, too_deep), (6, None, too_deep),
                                                                    (8, None, too_deep)]
    assert len(built.train) + len(built.eval) == 7

    # JSON text in a CSV cell (a conversation, a preference prompt) is parsed later: the same limit
    conv = tmp_path / "conv.csv"
    with conv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "messages"])
        for i in range(6):
            w.writerow([f"c{i}", deep_list if i == 2 else json.dumps([user(f"hi {i}"), assistant(f"yo {i}")])])
    built = build(tok, source(conv, fmt="csv", columns=MESSAGES, schema="messages"))
    assert [(r.line, r.reason) for _, r in built.rejected] == [
        (4, "messages (column 'messages') is JSON nested deeper than 100 levels (data.MAX_ROW_DEPTH)")]
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "chosen", "rejected"])
        for i in range(6):
            w.writerow([f"p{i}", f"q{i}?", deep_list if i == 1 else f"good {i}", f"bad {i}"])
    src = preferences.PreferenceSource("prefs", pairs, "csv", PREFS, 0.25, 1, 0.9, schema="messages")
    built = preferences.build_preference_dataset(src, tok, system=None, max_length=128)
    assert [(r.line, r.reason) for r in built.rejected] == [
        (3, "chosen (column 'chosen'): JSON nested deeper than 100 levels (data.MAX_ROW_DEPTH)")]


def test_a_role_that_is_a_list_or_object_is_rejected_not_a_crash(tok, tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(6)]
    rows[1] = {**rows[1], "chosen": [{"role": ["assistant"], "content": "a"}]}
    rows[3] = {**rows[3], "prompt": [user("q"), {"role": {"a": 1}, "content": "x"}]}
    src = preferences.PreferenceSource("prefs", write_jsonl(tmp_path / "p.jsonl", rows), "jsonl", PREFS, 0.25, 1, 0.9,
                                       schema="messages")
    built = preferences.build_preference_dataset(src, tok, system=None, max_length=128)
    assert [(r.line, r.reason) for r in built.rejected] == [
        (2, "chosen (column 'chosen'): its turn has role ['assistant']; an answer is an assistant turn"),
        (4, "prompt: turn 2: role ('role') is dict, expected text"),
    ]


# --------------------------------------------------------------------------------------
# reasons and stored rows of a readable size
# --------------------------------------------------------------------------------------


def test_a_huge_value_is_cut_in_reasons_and_rejected_rows(tok, tmp_path):
    huge = "y" * 5_000_000
    rows = qa_rows(10)
    rows[1] = {**rows[1], "question": [huge]}
    rows[3] = {**rows[3], "answer": {"value": list(range(80))}}
    conv = [{"id": f"c{i}", "messages": [user(f"hi {i}"), assistant(f"yo {i}")]} for i in range(8)]
    conv[2]["messages"] = [user("a"), {"role": huge, "content": "b"}]
    sources = [source(write_jsonl(tmp_path / "qa.jsonl", rows)),
               source(write_jsonl(tmp_path / "conv.jsonl", conv), name="conv", columns=MESSAGES, schema="messages")]
    made = written(tok, tmp_path, sources)
    got = {(s, r.line): r.reason for s, r in made.rejected}
    assert got[("qa", 2)] == (f"question (column 'question') is list ['{'y' * 198}... (5,000,004 characters), "
                              "expected text; quote it")
    # a reason quoting 321 characters, cut too (the code before quoted it whole)
    assert got[("qa", 4)] == ("answer (column 'answer') is dict {'value': [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, "
                              "13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, "
                              "35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49,... (321 characters), "
                              "expected text; quote it")
    assert got[("conv", 3)] == (f"turn 2: unknown role '{'y' * 199}... (5,000,002 characters); expected system, "
                                "user or assistant (map other names with columns.roles)")
    rejected_jsonl = Path(made.artifact.path) / "rejected.jsonl"
    assert rejected_jsonl.stat().st_size < 10_000  # not the 5 MB values, neither as reason nor as row
    stored = {(r["source"], r["line"]): r["row"] for r in map(json.loads, rejected_jsonl.read_text().splitlines())}
    assert stored[("qa", 2)] == {**rows[1], "question": f'["{"y" * 198}... (5,000,004 characters)'}
    assert stored[("qa", 4)] == rows[3]  # a row under 1 MiB is stored whole, as before
    assert stored[("conv", 3)]["messages"] == f'[{{"role": "user", "content": "a"}}, {{"role": "{"y" * 155}... ' \
                                              "(5,000,064 characters)"


# --------------------------------------------------------------------------------------
# a conversation's length is checked before every turn is rendered
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float):
    """TimeoutError in this thread after `seconds` (a slow path fails the test instead of hanging it)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_a_conversation_of_10000_turns_is_rejected_as_too_long_in_bounded_time(tok, tmp_path):
    conv = [{"id": f"c{i}", "messages": [user(f"hi {i}"), assistant(f"yo {i}")]} for i in range(8)]
    conv[4]["messages"] = chat(10_000)
    p = write_jsonl(tmp_path / "conv.jsonl", conv)
    # the code before rendered every prefix (quadratic): 1,600 turns took 59 s, so 10,000 would
    # take about half an hour; bisection takes seconds. The deadline, not a timing, is the check.
    with deadline(60):
        built = build(tok, source(p, columns=MESSAGES, schema="messages"))
    [(_, rej)] = built.rejected
    # the reply that crosses max_length is the one the code before named for chat(200)
    assert rej.line == 5 and rej.reason.startswith("conversation is ")
    assert "tokens > max_length 128 (turn 14, assistant, ends at token 143)" in rej.reason
    assert int(rej.reason.split()[2]) > 100_000
