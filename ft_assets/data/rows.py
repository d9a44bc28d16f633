"""Load, validate, format and split SFT data.

A row goes through four steps, each of which can only reject it with a reason:
1. read:     the file parses (else DataFileError with file and line: nothing is written);
             `hf` directories/ids and `arrow` files are read by `data.hfdata` (rows, not lines);
             `json` (one array of records) is scanned record by record, never loaded whole
             (records numbered by their 1-based index in the array);
2. validate: the mapped fields of the dataset's `schema` exist, are text, are not blank, and
             the row is not a duplicate (`messages`: a well-formed conversation, `data.chat`);
3. format:   the base model's chat template renders it; labels mask everything but the answer
             (for `messages`: the assistant turns `train_on` selects) and its end-of-turn
             token; it fits `max_length` without cutting the answer;
4. split:    a stable, seeded hash of the row's key puts it in train or eval, so editing one
             row never reshuffles the others.

Hostile rows are rejected like any bad row, never crash or stall the build: a row over
MAX_ROW_BYTES (16 MiB: a 128k-token context is ~0.5-1 MB; a JSONL line, a JSON array's record,
or an Arrow row's buffers) is refused unread; a row nested deeper than MAX_ROW_DEPTH lists/objects (JSON lines,
JSON text in a cell) is refused instead of raising RecursionError; a CSV record over the cap is a
DataFileError naming the line it starts at (the usual cause, an unclosed quote, leaves no next
record to resume at; csv's field_size_limit is raised to the cap). A value quoted in a reason is
cut to SHOWN_CHARS characters with its length, and a rejected row over WHOLE_ROW_CHARS of JSON is
stored in rejected.jsonl with its long values cut the same way (smaller rows whole, as before).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .types import (IGNORE_INDEX, MAX_ROW_BYTES, TOO_DEEP, DataFileError, Example, NestedTooDeep, Rejected,
                    UnreadableRow, batch_rows, loads_shallow, over_cap_reason, shown, stored_row)

# --------------------------------------------------------------------------------------
# 1. read
# --------------------------------------------------------------------------------------


def read_rows(path: str | Path, fmt: str, split: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs. Line numbers are 1-based lines of the file (csv: of the record;
    parquet, arrow, hf: the row's 1-based position). `split`: format hf only."""
    rows = list(iter_rows(path, fmt, split))
    if not rows:
        raise DataFileError(path, "the dataset has no rows" if fmt == "hf" else "file has no rows (only blank lines)")
    return rows


def iter_rows(path: str | Path, fmt: str, split: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """`read_rows` one row at a time (a build of millions of rows never holds them all; every
    format streams). The caller raises "no rows" when it gets none."""
    path = Path(path)
    if fmt == "hf":
        from .hfdata import read_hf

        yield from read_hf(path, split)
        return
    if not path.is_file():
        raise DataFileError(path, "file not found; check datasets[].path in the recipe")
    if path.stat().st_size == 0:
        raise DataFileError(path, "file is empty; it needs at least one row")
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt == "json":
        yield from _read_json_array(path)
    elif fmt == "csv":
        yield from _read_csv(path)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
            line = 0
            for batch in batches:
                for r in batch_rows(batch):
                    line += 1
                    yield line, r
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataFileError(path, f"not a readable parquet file ({exc})") from None
    elif fmt == "arrow":
        from .hfdata import read_arrow

        yield from read_arrow(path)
    else:
        raise DataFileError(path, f"unknown format {fmt!r}; use jsonl, json, csv, parquet, arrow or hf")


def row_word(fmt: str) -> str:
    """How errors locate a row: `line 12` in text files, `record 12` in a JSON array (a record may
    span lines), `row 12` in tables and datasets."""
    return {"jsonl": "line", "csv": "line", "json": "record"}.get(fmt, "row")


def _lines(path: Path) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, size without the newline) of each line; bytes None for a line over
    MAX_ROW_BYTES, which is read through in chunks and never held whole."""
    with path.open("rb") as fh:
        lineno = 0
        while raw := fh.readline(MAX_ROW_BYTES + 1):
            lineno += 1
            if len(raw) <= MAX_ROW_BYTES or raw.endswith(b"\n"):
                yield lineno, raw, len(raw) - raw.endswith(b"\n")
                continue
            size = len(raw)
            while not raw.endswith(b"\n") and (raw := fh.readline(1 << 20)):
                size += len(raw)
            yield lineno, None, size - raw.endswith(b"\n")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, raw, size in _lines(path):
        if raw is None:
            yield lineno, UnreadableRow(over_cap_reason(size))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFileError(
                path, f"not UTF-8 (byte {exc.start} of the line); re-save the file as UTF-8", lineno
            ) from None
        if not line.strip():
            continue
        hint = ("; this file is one JSON array of records (as alpaca_data.json and ShareGPT exports ship): "
                "use format json") if lineno == 1 and line.lstrip().startswith("[") else ""
        try:
            obj = loads_shallow(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(
                path, f"not valid JSON ({exc.msg} at column {exc.colno}); fix or delete this line{hint}", lineno
            ) from None
        except NestedTooDeep:
            yield lineno, UnreadableRow(f"row is {TOO_DEEP}; flatten it")
            continue
        if not isinstance(obj, dict):
            raise DataFileError(path, f"each line must be a JSON object, got {type(obj).__name__}{hint}", lineno)
        yield lineno, obj


def json_layout(path: Path) -> str:
    """A .json file's format by its first byte that is not blank: `json` (an array of records) or
    `jsonl` (an object on each line)."""
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            text = chunk.lstrip()
            if text:
                return "json" if text.startswith(b"[") else "jsonl"
    return "json"


JSON_STRUCTURE = re.compile(rb'["\\\[\]{}]')  # what changes a scan's state: quotes, escapes, brackets
JSON_CHUNK = 1 << 20


def _read_json_array(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """`format: json`: a file holding one JSON array of objects, read record by record (a file of
    gigabytes never in memory: each record's bytes are found by a scan of brackets and strings,
    then parsed alone). Rows are numbered by their 1-based index in the array; a record over
    MAX_ROW_BYTES is scanned through (never held) and yielded unreadable, as a long JSONL line is."""
    with path.open("rb") as fh:
        scan = _JsonArrayScan(path, fh)
        for index, raw, size in scan.records():
            if raw is None:
                yield index, UnreadableRow(over_cap_reason(size))
                continue
            try:
                obj = loads_shallow(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataFileError(path, f"record {index}: not UTF-8 (byte {exc.start} of the record); re-save "
                                          "the file as UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataFileError(path, f"record {index}: not valid JSON ({exc.msg} at character {exc.pos} of "
                                          "the record); fix or delete it") from None
            except NestedTooDeep:
                yield index, UnreadableRow(f"row is {TOO_DEEP}; flatten it")
                continue
            if not isinstance(obj, dict):
                raise DataFileError(path, f"record {index} must be a JSON object, got {type(obj).__name__}")
            yield index, obj


class _JsonArrayScan:
    """The records of a top-level JSON array as byte strings (module-level helper of
    `_read_json_array`): depth and string state carried across 1 MiB chunks."""

    def __init__(self, path: Path, fh):
        self.path, self.fh = path, fh
        self.buf, self.pos, self.eof = b"", 0, False

    def _more(self) -> bool:
        chunk = self.fh.read(JSON_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def _next_significant(self) -> int | None:
        """The next byte that is not whitespace (consumed), or None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in b" \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                self.pos += 1
                return self.buf[self.pos - 1]
            if not self._more():
                return None

    def _fail(self, message: str):
        raise DataFileError(self.path, message)

    def records(self) -> Iterator[tuple[int, bytes | None, int]]:
        """(1-based index, the record's bytes or None when over MAX_ROW_BYTES, its size)."""
        first = self._next_significant()
        if first is None:
            self._fail("file has no rows (only blank space)")
        if first != ord("["):
            self._fail(f"format json reads one JSON array of records, and the file starts with {chr(first)!r}"
                       + ("; one object per line is format jsonl" if first == ord("{") else ""))
        index = 0
        while True:
            c = self._next_significant()
            if c == ord("]") and index == 0:
                break
            if c == ord("]"):
                self._fail(f"a ',' after record {index} and no record after it (a trailing comma is not JSON); remove it")
            if c is None:
                self._fail("the file ends before the array's closing ']'"
                           + (f" (after record {index}'s ',')" if index else "") + ": it is cut short")
            index += 1
            self.pos -= 1  # the record's first byte
            yield (index, *self._record(index))
            c = self._next_significant()
            if c == ord("]"):
                break
            if c != ord(","):
                self._fail(f"after record {index}: expected ',' or ']', got "
                           f"{'the end of the file' if c is None else repr(chr(c))}")
        if self._next_significant() is not None:
            self._fail(f"text after the array's closing ']' (after record {index}); a file holds one array")

    def _record(self, index: int) -> tuple[bytes | None, int]:
        """The object (or array) from `pos`: its bytes (None past MAX_ROW_BYTES) and size; `pos`
        after it. Only quotes, backslashes and brackets are looked at (`JSON_STRUCTURE`)."""
        first = self.buf[self.pos]
        if first not in b"{[":
            kind = {ord('"'): "str", ord("t"): "bool", ord("f"): "bool", ord("n"): "null"}.get(first, "number")
            self._fail(f"record {index} must be a JSON object, got {kind}")
        depth, in_string, escaped, held, size, start = 0, False, False, [], 0, self.pos
        while True:
            found = JSON_STRUCTURE.search(self.buf, self.pos) if not escaped else None
            if escaped:  # the byte after a backslash, whatever it is
                if self.pos < len(self.buf):
                    self.pos, escaped = self.pos + 1, False
                    continue
            elif found is not None:
                c, self.pos = self.buf[found.start()], found.end()
                if in_string:
                    escaped, in_string = c == 0x5C, c != 0x22
                elif c == 0x22:
                    in_string = True
                else:
                    depth += 1 if c in b"[{" else -1
                    if depth == 0:
                        part = self.buf[start:self.pos]
                        size += len(part)
                        return (b"".join(held) + part if size <= MAX_ROW_BYTES else None), size
                continue
            part = self.buf[start:]  # the chunk ends inside the record: keep it (under the cap) and read on
            size += len(part)
            if size <= MAX_ROW_BYTES:
                held.append(part)
            else:
                held.clear()
            self.pos = len(self.buf)
            if not self._more():
                self._fail(f"record {index} is cut short: the file ends inside it")
            start = 0


def _csv_lines(path: Path, record: dict[str, int]) -> Iterator[str]:
    """The file's lines decoded one by one (a decoding error names its line; a BOM is dropped).
    `record` counts the bytes of the record being read (its reader zeroes `bytes` after each):
    past MAX_ROW_BYTES, a DataFileError names the line the record starts at."""
    for lineno, raw, size in _lines(path):
        if record["bytes"] or raw is None or raw.strip():  # blank lines between records belong to none
            if not record["bytes"]:
                record["start"] = lineno
            record["bytes"] += size + 1  # with its newline, which a quoted field holds too
        if raw is None or record["bytes"] > MAX_ROW_BYTES:
            raise DataFileError(
                path, f"the CSV record that starts at line {record['start']} is over {MAX_ROW_BYTES >> 20} MiB "
                      f"(data.MAX_ROW_BYTES) at line {lineno}; most often an unclosed quote runs a record on: check "
                      "the quotes from there, or shorten the row (a long row may also go in jsonl or parquet)",
                record["start"])
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataFileError(path, "not UTF-8; re-save the file as UTF-8", lineno) from None
        yield line[1:] if lineno == 1 and line.startswith("\ufeff") else line


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # one field may fill a row (csv's default, 128 KiB, fails long contexts); _csv_lines caps the record
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))
    record = {"start": 1, "bytes": 0}
    reader = csv.DictReader(_csv_lines(path, record))
    try:
        reader.fieldnames  # reads the header first, so that each record counts its own bytes
        record["bytes"] = 0
        for rec in reader:
            if None in rec:  # more cells than header columns
                raise DataFileError(path, "more cells than header columns; quote fields with commas", reader.line_num)
            record["bytes"] = 0
            yield reader.line_num, dict(rec)  # values stay strings: no type guessing
    except csv.Error as exc:  # the line being parsed (DictReader's own line_num is the last record's)
        raise DataFileError(path, f"not valid CSV ({exc})", reader.reader.line_num) from None


# --------------------------------------------------------------------------------------
# 2. validate
# --------------------------------------------------------------------------------------


# The column-map keys that name a column every row must have, per schema (alpaca's `input` is
# optional per row; `messages`' role/content/roles name keys inside the turns).
REQUIRED_COLUMNS = {
    "qa": ("question", "context", "answer", "id"),
    "prompt_completion": ("prompt", "completion", "id"),
    "alpaca": ("instruction", "output", "id"),
    "messages": ("messages", "id"),
}


def check_columns(path: str | Path, rows: list[tuple[int, dict]], columns: dict[str, Any],
                  schema: str | None = None) -> None:
    check_column_names(path, {k for _, r in rows for k in r}, columns, schema)


def check_column_names(path: str | Path, names: Iterable[str], columns: dict[str, Any],
                       schema: str | None = None) -> None:
    """DataFileError unless every mapped column is among `names` (the columns seen in the file):
    with a dataset `schema`, the columns its map names; without (preference pairs), every one."""
    found = sorted(set(names))
    if schema is not None:
        columns = {f: columns.get(f) for f in REQUIRED_COLUMNS[schema]}
    missing = {f: c for f, c in columns.items() if c is not None and c not in found}
    if missing:
        expected = ", ".join(f"{f} <- {c!r}" for f, c in columns.items() if c is not None)
        raise DataFileError(
            path,
            f"column(s) {sorted(missing.values())} not found. Columns in the file: {found}. "
            f"The recipe maps: {expected}; fix datasets[].columns or the file's header",
        )


def validate_rows(
    rows: list[tuple[int, dict]], columns: dict[str, Any], task: str = "", schema: str = "qa", unit: str = "line"
) -> tuple[list[Example], list[Rejected]]:
    """Rows of `schema` as Examples (question = the user turn, answer = the trained reply),
    or rejected with the field and reason. `unit` names a row's place in messages ("line")."""
    kept, rejected = [], []
    seen: dict[Any, int] = {}
    for lineno, row in rows:
        ex, rej = validate_row(lineno, row, columns, task, schema)
        if rej is not None:
            rejected.append(rej)
            continue
        key = duplicate_key(ex)
        if key in seen:
            rejected.append(Rejected(lineno, f"exact duplicate of {unit} {seen[key]}", None, row_id(row, columns),
                                     stored_row(row)))
            continue
        seen[key] = lineno
        kept.append(ex)
    return kept, rejected


def validate_row(lineno: int, row: dict, columns: dict[str, Any], task: str = "", schema: str = "qa"
                 ) -> tuple[Example | None, Rejected | None]:
    """One row's Example, or its rejection (duplicates aside: see `duplicate_key`)."""
    if isinstance(row, UnreadableRow):
        return None, Rejected(lineno, row.reason)
    rid = row_id(row, columns)
    ex, key, problem = _row_example(row, columns, schema, lineno, task)
    if problem:
        return None, Rejected(lineno, problem[1], problem[0], rid, stored_row(row))
    # qa keeps its historical id (question, context, answer) so existing splits do not move
    ex.id = rid or (_stable_id(*key) if schema == "qa" else _stable_id(schema, json.dumps(key)))
    return ex, None


def duplicate_key(ex: Example) -> tuple:
    """Two rows with the same key are exact duplicates (the later one is rejected): the whole
    conversation for `messages`, else the texts the row was made of."""
    if ex.messages is not None:
        return tuple((t["role"], t["content"]) for t in ex.messages)
    return (ex.question, ex.context, ex.answer)


def _row_example(row: dict, columns: dict[str, Any], schema: str, lineno: int, task: str
                 ) -> tuple[Example | None, Any, tuple[str, str] | None]:
    """(example, duplicate key, None) or (None, None, (field, reason)) for one row."""
    if schema == "qa":
        v, problem = text_fields(row, columns, ("question", "context", "answer"))
        if problem:
            return None, None, problem
        return Example("", v["question"], v["context"], v["answer"], lineno, task), (
            v["question"], v["context"], v["answer"]), None
    if schema == "prompt_completion":
        v, problem = text_fields(row, columns, ("prompt", "completion"))
        if problem:
            return None, None, problem
        return Example("", v["prompt"], None, v["completion"], lineno, task), (v["prompt"], v["completion"]), None
    if schema == "alpaca":
        v, problem = text_fields(row, columns, ("instruction", "output"))
        if problem:
            return None, None, problem
        inp, col = None, columns.get("input")
        if col is not None and row.get(col) is not None:  # input is optional: absent, null or blank = none
            if not isinstance(row[col], str):
                return None, None, ("input", f"input (column {col!r}) is {type(row[col]).__name__} "
                                             f"{shown(row[col])}, expected text")
            inp = row[col].strip() or None
        return Example("", v["instruction"], inp, v["output"], lineno, task), (v["instruction"], inp, v["output"]), None
    if schema == "messages":
        from .chat import conversation

        turns, reason = conversation(row.get(columns["messages"]), columns["messages"], columns.get("role") or "role",
                                     columns.get("content") or "content", columns.get("roles"))
        if reason:
            return None, None, ("messages", reason)
        last_user = next(t["content"] for t in reversed(turns) if t["role"] == "user")
        ex = Example("", last_user, None, turns[-1]["content"], lineno, task, messages=turns)
        return ex, tuple((t["role"], t["content"]) for t in turns), None
    raise ValueError(f"unknown schema {schema!r}")


def text_fields(row: dict, columns: dict[str, str | None], fields: tuple[str, ...]
                ) -> tuple[dict[str, str | None], tuple[str, str] | None]:
    """The stripped text of each field (None where the mapping leaves the field out), or the
    first problem as (field, reason): missing, not text, or empty."""
    values: dict[str, str | None] = {}
    for fld in fields:
        col = columns.get(fld)
        if col is None:
            values[fld] = None
            continue
        v = row.get(col)
        if v is None:
            return values, (fld, f"{fld} (column {col!r}) is missing or null")
        if not isinstance(v, str):
            return values, (fld, f"{fld} (column {col!r}) is {type(v).__name__} {shown(v)}, expected text; quote it")
        if not v.strip():
            return values, (fld, f"{fld} (column {col!r}) is empty or whitespace")
        values[fld] = v.strip()
    return values, None


def row_id(row: dict, columns: dict[str, str | None]) -> str | None:
    id_col = columns.get("id")
    return str(row[id_col]) if id_col and row.get(id_col) is not None else None


def _stable_id(*parts: str | None) -> str:
    return hashlib.sha256("\x1f".join(p or "" for p in parts).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------
# 3. format and mask
# --------------------------------------------------------------------------------------


def build_messages(ex: Example, system: str | None, template: str, template_without_context: str,
                   schema: str = "qa") -> list[dict]:
    """The chat turns before the trained answer. qa: `template` fills the user turn;
    prompt_completion: the prompt is the user turn as written; alpaca: the instruction, then
    the input (when the row has one) after a blank line; messages: the conversation itself
    (the whole of it, assistant turns included), after `system` unless it has its own."""
    msgs = [{"role": "system", "content": system}] if system else []
    if schema == "messages":
        own_system = ex.messages and ex.messages[0]["role"] == "system"
        return list(ex.messages or []) if own_system else msgs + list(ex.messages or [])
    if schema == "qa":
        tpl = template if ex.context else template_without_context
        user = tpl.format(question=ex.question, context=ex.context or "")
    else:
        user = ex.question if not ex.context else f"{ex.question}\n\n{ex.context}"
    return msgs + [{"role": "user", "content": user}]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def format_example(tokenizer, ex: Example, messages: list[dict], max_length: int,
                   train_on: str = "all_assistant") -> str | None:
    """Fill ex.input_ids/labels. Returns a rejection reason, or None when the example is usable.

    Only the answer tokens and the end-of-turn token carry labels; the template's trailing
    newline after end-of-turn is dropped so the model learns to stop exactly there. A
    conversation (`ex.messages`; `messages` holds all its turns) labels the assistant turns
    `train_on` selects (`data.chat.mask_conversation`).
    """
    if ex.messages is not None:
        from .chat import mask_conversation

        masked = mask_conversation(tokenizer, messages, train_on, max_length)
        if isinstance(masked, str):
            return masked
        ex.input_ids, ex.labels, ex.answer_start = masked
        return None
    prompt = prompt_ids(tokenizer, messages)
    full = list(tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": ex.answer}], return_dict=True
    )["input_ids"])
    if full[: len(prompt)] != prompt:
        return "chat template renders the prompt differently with and without the answer; cannot mask it"
    completion = full[len(prompt):]
    eos = tokenizer.eos_token_id
    completion = completion[: completion.index(eos) + 1] if eos in completion else completion + [eos]
    if len(prompt) >= max_length:
        return f"prompt alone is {len(prompt)} tokens, max_length is {max_length}; shorten the context or raise prompt.max_length"
    if len(prompt) + len(completion) > max_length:
        return (f"prompt+answer is {len(prompt) + len(completion)} tokens > max_length {max_length}; "
                "truncating would cut the answer; raise prompt.max_length")
    ex.input_ids = prompt + completion
    ex.labels = [IGNORE_INDEX] * len(prompt) + completion
    return None


# --------------------------------------------------------------------------------------
# 4. split
# --------------------------------------------------------------------------------------


def eval_size(n_usable: int, eval_fraction: float) -> int:
    """How many of `n_usable` rows `split_examples` holds out (at least one, unless there is only one)."""
    return max(1, round(n_usable * eval_fraction)) if n_usable > 1 else 0


def split_rank(ex: Example, seed: int) -> str:
    """The row's place in the seeded split order (the smallest ranks are held out)."""
    return hashlib.sha256(f"{seed}:{ex.task}:{ex.id}".encode()).hexdigest()


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded hash order by row id: stable when other rows change, exact eval size."""
    order = sorted(examples, key=lambda e: split_rank(e, seed))
    n_eval = eval_size(len(examples), eval_fraction)
    eval_ids = {id(e) for e in order[:n_eval]}
    train = [e for e in examples if id(e) not in eval_ids]
    evals = [e for e in examples if id(e) in eval_ids]
    return train, evals


# --------------------------------------------------------------------------------------
# counting train rows without a tokenizer (for `python -m ft_assets validate`)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRowCount:
    """How many training rows a data file gives, from steps 1, 2 and 4 alone (no tokenizer).

    Step 3 (chat template, `max_length`) can only reject more rows, and a source fails when
    its rejections exceed `max_rejected_fraction`; so the training split of a build that
    succeeds has between `low` and `high` rows (`high`: the tokenizer rejects none). With
    mixture weights the total is the same: `data.mixture.mix` draws as many rows as the
    sources' training splits hold together."""

    rows: int  # rows read from the file(s)
    rejected: int  # rejected before tokenization (missing/blank fields, duplicates)
    low: int
    high: int

    def __add__(self, other: "TrainRowCount") -> "TrainRowCount":
        return TrainRowCount(self.rows + other.rows, self.rejected + other.rejected,
                             self.low + other.low, self.high + other.high)


def most_rejections_allowed(n_rows: int, max_rejected_fraction: float) -> int:
    """The largest rejection count that `rejected / rows > max_rejected_fraction` lets through."""
    t = min(n_rows, int(n_rows * max_rejected_fraction))
    while t < n_rows and (t + 1) / n_rows <= max_rejected_fraction:
        t += 1
    while t > 0 and t / n_rows > max_rejected_fraction:
        t -= 1
    return t


def train_row_bounds(path: str | Path, n_rows: int, n_rejected: int, eval_fraction: float,
                     max_rejected_fraction: float) -> TrainRowCount:
    """Bounds on the training split of one source whose first `n_rejected` of `n_rows` rows are
    already rejected; DataFileError where the build would fail on those rejections alone."""
    allowed = most_rejections_allowed(n_rows, max_rejected_fraction)
    kept = n_rows - n_rejected
    if kept == 0:
        raise DataFileError(path, f"every row was rejected ({n_rejected} rows) before tokenization")
    if n_rejected > allowed:
        raise DataFileError(path, f"{n_rejected} of {n_rows} rows rejected before tokenization "
                                  f"({n_rejected / n_rows:.0%} > max_rejected_fraction {max_rejected_fraction:.0%})")
    fewest = max(1, n_rows - allowed)  # usable rows of a build that does not fail

    def train(usable: int) -> int:
        return usable - eval_size(usable, eval_fraction)

    return TrainRowCount(n_rows, n_rejected, train(fewest), train(kept))


def count_train_rows(sources: Iterable[SourceSpec]) -> TrainRowCount:
    """`build_sft_dataset`'s training rows, bounded without a tokenizer (see `TrainRowCount`).
    Raises DataFileError as the build would for an unreadable file or missing columns."""
    total = TrainRowCount(0, 0, 0, 0)
    for src in sources:
        rows = read_rows(src.path, src.format, src.split)
        check_columns(src.path, rows, src.columns, src.schema)
        kept, rejected = validate_rows(rows, src.columns, task=src.name, schema=src.schema, unit=row_word(src.format))
        total += train_row_bounds(src.path, len(rows), len(rejected), src.eval_fraction, src.max_rejected_fraction)
    return total


# --------------------------------------------------------------------------------------
# the whole step, and the files it writes
# --------------------------------------------------------------------------------------


@dataclass
class SourceSpec:
    name: str
    path: Path
    format: str
    columns: dict[str, str | None]
    eval_fraction: float
    split_seed: int
    max_rejected_fraction: float
    weight: float | None = None  # multi-task mixture weight (all sources or none)
    schema: str = "qa"  # qa | prompt_completion | alpaca | messages (which `columns` keys apply)
    train_on: str = "all_assistant"  # messages: which assistant turns carry loss
    split: str | None = None  # format hf: the split to read


def source_path(recipe, ds) -> Path:
    """Where a dataset's data is: its resolved path, or for `format: hf` a path that does not
    exist, the recipe's string as given (a dataset id, looked up in the local HF cache)."""
    path = recipe.dataset_path(ds)
    return Path(ds.path) if ds.format == "hf" and not path.exists() and not Path(ds.path).is_absolute() else path


def sft_sources(recipe) -> list[SourceSpec]:
    """The recipe's `datasets:` as build inputs (`recipe`: a `ft_assets.config.recipe.Recipe`)."""
    return [SourceSpec(ds.name, source_path(recipe, ds), ds.format, ds.columns.model_dump(), ds.eval_fraction,
                       recipe.split_seed(ds), ds.max_rejected_fraction, ds.weight, ds.schema, ds.train_on, ds.split)
            for ds in recipe.datasets]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def dataset_info(dataset_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(dataset_dir) / "dataset_info.json").read_text())


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer's vocabulary + template (to catch a dataset built with another one)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(vocab).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]
