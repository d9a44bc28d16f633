"""What every reader and step of the data room shares: `Example` (one formatted row),
`Rejected` (a row refused, with its reason), `DataFileError` (a file refused as a whole), and
the limits on hostile rows (MAX_ROW_BYTES, MAX_ROW_DEPTH; values quoted in reasons cut to
SHOWN_CHARS). Nothing here imports torch, datasets or Dagster."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

IGNORE_INDEX = -100
MAX_ROW_BYTES = 16 * 2**20  # one row: a JSONL line, a CSV record, an Arrow row's buffers
MAX_ROW_DEPTH = 100  # lists/objects inside each other in one row (the row itself is level 1)
SHOWN_CHARS = 200  # of a value quoted in a rejection reason
WHOLE_ROW_CHARS = 2**20  # a rejected row's JSON up to this is stored whole in rejected.jsonl


class DataFileError(ValueError):
    """The file as a whole cannot be used (unparseable, empty, wrong columns)."""

    def __init__(self, path: str | Path, message: str, line: int | None = None,
                 rejected: list["Rejected"] | None = None):
        self.path, self.line, self.rejected = str(path), line, rejected or []
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class UnreadableRow(dict):
    """What a reader yields for a row it refuses (over MAX_ROW_BYTES, nested deeper than
    MAX_ROW_DEPTH): no columns, and the reason `validate_row` rejects it with."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


class NestedTooDeep(ValueError):
    """JSON text nests lists/objects deeper than MAX_ROW_DEPTH."""


def over_cap_reason(size: int) -> str:
    return (f"row is {size:,} bytes, over the {MAX_ROW_BYTES >> 20} MiB a row may hold (data.MAX_ROW_BYTES); "
            "shorten or split it")


TOO_DEEP = f"nested deeper than {MAX_ROW_DEPTH} levels (data.MAX_ROW_DEPTH)"


def cut(text: str) -> str:
    """`text`, or its first SHOWN_CHARS characters and its length when longer."""
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


def shown(value: Any) -> str:
    """A value as a reason quotes it: its repr, cut to SHOWN_CHARS."""
    return cut(repr(value))


def stored_row(row: dict[str, Any]) -> dict[str, Any]:
    """A rejected row as rejected.jsonl keeps it: whole, or when its JSON is over WHOLE_ROW_CHARS,
    with each key and value whose text is over SHOWN_CHARS cut (as text)."""
    if len(json.dumps(row, ensure_ascii=False, default=str)) <= WHOLE_ROW_CHARS:
        return row
    return {_short(str(k)): _short(v) for k, v in row.items()}


def _short(value: Any) -> Any:
    """`value`, or its text (JSON unless a string) cut, when that is over SHOWN_CHARS."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return value if len(text) <= SHOWN_CHARS else cut(text)


def nested_too_deep(value: Any, text: str | bytes) -> bool:
    """Whether `value` (parsed from JSON `text`) nests lists/objects deeper than MAX_ROW_DEPTH;
    iterative, and skipped when `text` has too few brackets to be that deep."""
    brackets = (b"[", b"{") if isinstance(text, bytes) else ("[", "{")
    if text.count(brackets[0]) + text.count(brackets[1]) <= MAX_ROW_DEPTH:
        return False
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > MAX_ROW_DEPTH:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def loads_shallow(text: str | bytes) -> Any:
    """`json.loads`, raising NestedTooDeep past MAX_ROW_DEPTH (json's own RecursionError comes
    near Python's recursion limit, wherever the stack already is)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise NestedTooDeep(TOO_DEEP) from None
    if nested_too_deep(value, text):
        raise NestedTooDeep(TOO_DEEP)
    return value


@dataclass
class Rejected:
    line: int
    reason: str
    field: str | None = None
    id: str | None = None
    row: dict[str, Any] | None = None


@dataclass
class Example:
    id: str
    question: str
    context: str | None
    answer: str
    line: int
    task: str = ""
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    # schema `messages`: the checked conversation (question/answer: its last user/assistant turn)
    messages: list[dict[str, str]] | None = None
    # where the reference answer (the last assistant turn) starts in input_ids, when earlier
    # tokens are labelled too (multi-turn); None: at the first labelled token
    answer_start: int | None = None

    @property
    def prompt_len(self) -> int:
        """Tokens before the reference answer: the prompt evaluation generates from."""
        if self.answer_start is not None:
            return self.answer_start
        return next((i for i, lab in enumerate(self.labels) if lab != IGNORE_INDEX), len(self.labels))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def batch_rows(batch) -> Iterator[dict[str, Any]]:
    """A pyarrow RecordBatch's (or Table's) rows as dicts; a row whose buffers are over
    MAX_ROW_BYTES as an UnreadableRow, never converted (rows are measured only in a batch over it)."""
    if batch.nbytes <= MAX_ROW_BYTES:
        yield from batch.to_pylist()
        return
    for i in range(batch.num_rows):
        one = batch.slice(i, 1)
        yield UnreadableRow(over_cap_reason(one.nbytes)) if one.nbytes > MAX_ROW_BYTES else one.to_pylist()[0]
