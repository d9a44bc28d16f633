"""`format: json`: one JSON array of records, as alpaca_data.json and ShareGPT exports ship
(`data.rows._read_json_array`), in the data stage and in `init`.

- the same records build the same dataset as JSON Lines, and a bad record is rejected with its
  1-based index in the array (`record 3`), like a bad line;
- a file that is not one array of objects fails with the record (or place) and what to do;
- the file is read record by record: a 12 MiB array is read with a bounded buffer, never whole;
- `init` tells an array from JSON Lines in a .json file by its first byte, and `--format jsonl`
  on an array says to use format json.
"""

from __future__ import annotations

import io
import json
import tracemalloc

import pytest
from transformers import AutoTokenizer

from ft_assets.cli import init
from ft_assets.config.recipe import load_recipe
from ft_assets.data import rows as D
from ft_assets.data.types import DataFileError
from ft_assets_tests.conftest import qa_rows, write_jsonl
from ft_assets_tests.data.test_hostile_rows import build, source


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_an_array_builds_what_the_same_rows_as_json_lines_build_and_rejects_by_record(tok, tmp_path):
    rows = qa_rows(12)
    rows[2] = {**rows[2], "answer": "  "}  # record 3: a blank answer
    array = tmp_path / "qa.json"
    array.write_text(json.dumps(rows, indent=4))  # records span lines, as alpaca_data.json's do
    lines = write_jsonl(tmp_path / "qa.jsonl", rows)
    from_array, from_lines = build(tok, source(array, fmt="json")), build(tok, source(lines))
    assert [(e.id, e.input_ids) for e in from_array.train] == [(e.id, e.input_ids) for e in from_lines.train]
    assert [(e.id, e.input_ids) for e in from_array.eval] == [(e.id, e.input_ids) for e in from_lines.eval]
    [(name, rej)] = from_array.rejected
    assert (name, rej.line, rej.field) == ("qa", 3, "answer")  # the record's index (here also the jsonl line)
    assert D.row_word("json") == "record"


@pytest.mark.parametrize("text, said", [
    ('{"question": "q"}\n', "format json reads one JSON array of records, and the file starts with '{'; "
                            "one object per line is format jsonl"),
    ('[{"question": "q"}, ["a"]]', "record 2 must be a JSON object, got list"),
    ('[{"question": "q"}, "text"]', "record 2 must be a JSON object, got str"),
    ('[{"question": "q"},\n {"question": "q2",}]', "record 2: not valid JSON (Expecting property name enclosed in "
                                                   "double quotes at character 18 of the record); fix or delete it"),
    ('[{"question": "q"}, {"question": "cut', "record 2 is cut short: the file ends inside it"),
    ('[{"question": "q"}', "after record 1: expected ',' or ']', got the end of the file"),
    ('[{"question": "q"} {"question": "r"}]', "after record 1: expected ',' or ']', got '{'"),
    ('[{"question": "q"}]\n[{"question": "r"}]', "text after the array's closing ']' (after record 1); "
                                                 "a file holds one array"),
    ('[{"question": "q"},]', "a ',' after record 1 and no record after it (a trailing comma is not JSON); remove it"),
    ('[{"question": "q"},', "the file ends before the array's closing ']' (after record 1's ','): it is cut short"),
    ('[', "the file ends before the array's closing ']': it is cut short"),
    ('  \n ', "file has no rows (only blank space)"),
])
def test_a_file_that_is_not_one_array_of_objects_says_where_and_what_to_do(tmp_path, text, said):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataFileError) as err:
        D.read_rows(path, "json")
    assert str(err.value) == f"{path}: {said}"


def test_an_empty_array_has_no_rows(tmp_path):
    (tmp_path / "e.json").write_text("[ ]\n")
    with pytest.raises(DataFileError, match="file has no rows"):
        D.read_rows(tmp_path / "e.json", "json")


def test_an_array_is_read_record_by_record_not_whole(tmp_path):
    record = {"instruction": "Give three tips for staying healthy. \\\"[quoted]\\\" {braces}", "input": "",
              "output": "1. Eat well. 2. Exercise. 3. Sleep. " * 8}
    path = tmp_path / "big.json"
    path.write_text(json.dumps([record] * 30_000, indent=4))
    assert path.stat().st_size > 12 * 2**20
    tracemalloc.start()
    try:
        count = 0
        for index, row in D.iter_rows(path, "json"):
            count += 1
            assert row == record and index == count
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 30_000
    assert peak < 4 * 2**20, peak  # a 1 MiB read buffer and one record, not the 12 MiB file


def run_init(tok, *argv) -> tuple[int, str]:
    buf = io.StringIO()
    rc = init.main([str(a) for a in argv], load_tokenizer=lambda: tok, out=buf, err=buf)
    return rc, buf.getvalue()


def test_init_reads_alpaca_data_json_as_it_ships_and_jsonl_named_json(tok, tmp_path):
    alpaca = [{"instruction": r["question"], "input": r["context"], "output": r["answer"]} for r in qa_rows(40)]
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps(alpaca, indent=4))
    rc, text = run_init(tok, data, "-o", tmp_path / "a.yaml")
    assert rc == 0, text
    ds = load_recipe(tmp_path / "a.yaml").datasets[0]
    assert (ds.format, ds.schema) == ("json", "alpaca")
    assert text.count("--- row ") == 3

    lines = tmp_path / "lines.json"  # JSON Lines under a .json name: told apart by the first byte
    write_jsonl(lines, alpaca)
    rc, text = run_init(tok, lines, "-o", tmp_path / "l.yaml")
    assert rc == 0, text
    assert load_recipe(tmp_path / "l.yaml").datasets[0].format == "jsonl"

    rc, text = run_init(tok, data, "-o", tmp_path / "x.yaml", "--format", "jsonl")  # pretty-printed: "[" alone
    assert rc == 2
    assert text.endswith("fix or delete this line; this file is one JSON array of records (as alpaca_data.json "
                         "and ShareGPT exports ship): use format json\n"), text
    (tmp_path / "one_line.json").write_text(json.dumps(alpaca))  # the array on one line
    rc, text = run_init(tok, tmp_path / "one_line.json", "-o", tmp_path / "y.yaml", "--format", "jsonl")
    assert rc == 2 and "each line must be a JSON object, got list; this file is one JSON array of records" in text
