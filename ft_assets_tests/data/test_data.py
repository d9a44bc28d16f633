"""Reading, validating, formatting/masking and splitting SFT data with the real tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ft_assets.data import rows as data, sft_dataset
from ft_assets.data.sft_dataset import canonical_version
from ft_assets_tests.conftest import qa_rows, write_jsonl

COLS = {"question": "question", "context": "context", "answer": "answer", "id": "id"}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def source(path, **kw):
    spec = dict(name="qa", path=path, format="jsonl", columns=COLS, eval_fraction=0.25, split_seed=1,
                max_rejected_fraction=0.5)
    spec.update(kw)
    return data.SourceSpec(**spec)


def build(tok, *sources, max_length=128):
    return sft_dataset.build_sft_dataset(sources, tok, system=None, template="Context:\n{context}\n\nQuestion: {question}",
                                  template_without_context="Question: {question}", max_length=max_length)


def test_only_answer_and_end_of_turn_are_labelled(tok):
    ex = data.Example("1", "What was revenue?", "Revenue was $5 million.", "$5 million", 1)
    msgs = data.build_messages(ex, "Be brief.", "Context:\n{context}\n\nQuestion: {question}", "Q: {question}")
    assert data.format_example(tok, ex, msgs, 256) is None
    labelled = [t for t in ex.labels if t != data.IGNORE_INDEX]
    assert tok.decode(labelled) == "$5 million<|im_end|>"
    assert labelled[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.decode(ex.input_ids[: ex.prompt_len])
    assert prompt.endswith("<|im_start|>assistant\n") and "Be brief." in prompt and "Revenue was $5 million." in prompt
    assert ex.input_ids[ex.prompt_len:] == labelled  # labels equal inputs where not masked; nothing after eos


def test_too_long_rows_are_rejected_with_the_reason(tok):
    ex = data.Example("1", "q?", "word " * 300, "a", 7)
    msgs = data.build_messages(ex, None, "{context} {question}", "{question}")
    assert "prompt alone is" in data.format_example(tok, ex, msgs, 64)
    ex2 = data.Example("2", "q?", "c", "long answer " * 40, 8)
    msgs2 = data.build_messages(ex2, None, "{context} {question}", "{question}")
    assert "would cut the answer" in data.format_example(tok, ex2, msgs2, 64)


def test_unparseable_line_reports_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "a", "context": "b", "answer": "c"}\n{"question": oops}\n')
    with pytest.raises(data.DataFileError, match=r"d\.jsonl:2: not valid JSON"):
        data.read_rows(p, "jsonl")


def test_non_utf8_empty_and_missing_files(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(data.DataFileError, match=r"latin\.jsonl:1: not UTF-8"):
        data.read_rows(p, "jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataFileError, match="file is empty"):
        data.read_rows(tmp_path / "empty.jsonl", "jsonl")
    with pytest.raises(data.DataFileError, match="file not found"):
        data.read_rows(tmp_path / "nope.jsonl", "jsonl")


def test_missing_columns_lists_what_was_found(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "ctx": "b", "answer": "c"}])
    rows = data.read_rows(p, "jsonl")
    with pytest.raises(data.DataFileError) as err:
        data.check_columns(p, rows, {"question": "question", "context": "context", "answer": "answer"})
    msg = str(err.value)
    assert "['context', 'question'] not found" in msg and "['answer', 'ctx', 'q']" in msg and "question <- 'question'" in msg


def test_row_problems_are_rejected_with_reasons(tmp_path):
    rows = [(1, {"question": "q", "context": "c", "answer": "a"}),
            (2, {"question": "  ", "context": "c", "answer": "a"}),
            (3, {"question": "q", "context": "c", "answer": 42}),
            (4, {"question": "q", "context": "c"}),
            (5, {"question": "q", "context": "c", "answer": "a"})]
    kept, rejected = data.validate_rows(rows, {"question": "question", "context": "context", "answer": "answer"})
    assert [k.line for k in kept] == [1]
    reasons = {r.line: r.reason for r in rejected}
    assert "empty or whitespace" in reasons[2]
    assert "is int 42, expected text" in reasons[3]
    assert "missing or null" in reasons[4]
    assert reasons[5] == "exact duplicate of line 1"


def test_csv_keeps_strings_as_strings(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('question,context,answer\n"Ticker code?","Code 0042, listed.",0042\n')
    rows = data.read_rows(p, "csv")
    assert rows == [(2, {"question": "Ticker code?", "context": "Code 0042, listed.", "answer": "0042"})]


def test_csv_streams_line_by_line_with_bom_multiline_cells_and_the_bad_bytes_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b'\xef\xbb\xbfquestion,context,answer\r\n"Q1?","two\nlines",a1\r\nQ2?,c2,a2\r\n')
    assert data.read_rows(p, "csv") == [(3, {"question": "Q1?", "context": "two\nlines", "answer": "a1"}),
                                         (4, {"question": "Q2?", "context": "c2", "answer": "a2"})]
    p.write_bytes(b"question,context,answer\nQ1?,c1,a1\nQ2?,caf\xe9,a2\n")
    rows = data.iter_rows(p, "csv")
    assert next(rows) == (2, {"question": "Q1?", "context": "c1", "answer": "a1"})  # read before the bad line
    with pytest.raises(data.DataFileError, match=r"d\.csv:3: not UTF-8; re-save the file as UTF-8"):
        next(rows)


def test_build_splits_and_counts(tok, tmp_path):
    ds = build(tok, source(write_jsonl(tmp_path / "d.jsonl", qa_rows(40))))
    assert ds.stats["train_rows"] == 30 and ds.stats["eval_rows"] == 10 and not ds.rejected
    assert {e.id for e in ds.train}.isdisjoint({e.id for e in ds.eval})


def test_split_is_stable_when_another_row_changes(tok, tmp_path):
    rows = qa_rows(40)
    first = build(tok, source(write_jsonl(tmp_path / "a.jsonl", rows)))
    rows[3] = {**rows[3], "answer": "edited"}
    second = build(tok, source(write_jsonl(tmp_path / "b.jsonl", rows)))
    assert [e.id for e in first.eval] == [e.id for e in second.eval]


def test_rejected_fraction_over_limit_fails_the_file(tok, tmp_path):
    rows = qa_rows(10) + [{"id": f"bad{i}", "question": "", "context": "c", "answer": "a"} for i in range(5)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(data.DataFileError, match=r"5 of 15 rows rejected \(33% > max_rejected_fraction 10%\)"):
        build(tok, source(p, max_rejected_fraction=0.1))
    ok = build(tok, source(p, max_rejected_fraction=0.5))
    assert ok.stats["rejected_rows"] == 5


def test_every_row_bad_fails(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "question": "", "context": "c", "answer": "a"}])
    with pytest.raises(data.DataFileError, match="every row was rejected"):
        build(tok, source(p, max_rejected_fraction=1.0))


def test_build_is_deterministic(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", qa_rows(20))
    out = []
    for name in ("x", "y"):
        d = tmp_path / name
        d.mkdir()
        sft_dataset.save_dataset(build(tok, source(p)), d, {"k": 1})
        out.append((canonical_version(d), [(e.id, e.input_ids, e.labels) for e in sft_dataset.load_split(d, "train")]))
    assert out[0] == out[1]
