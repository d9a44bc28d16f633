"""Preference data, paired or unpaired, with the same four steps as SFT data.

Paired (schema `text` or `messages`, for every preference method and reward model): a prompt and
two answers, chosen and rejected. Unpaired (schema `unpaired`, TRL's KTO form, for kto only): a
prompt, one answer (`completion`) and a `label` saying whether it is desirable; one answer a row.

1. read:     `data.rows.read_rows` (jsonl/csv/parquet/arrow, or `format: hf` offline; file +
             line/row errors, nothing written on failure; a row over `data.MAX_ROW_BYTES` or
             nested deeper than `data.MAX_ROW_DEPTH`, JSON text in a cell too, is rejected);
2. validate: schema `text` (TRL's standard form): prompt/chosen/rejected are non-blank text.
             Schema `messages` (TRL's conversational form): the prompt is a conversation ending
             with a user turn (an optional system turn first, `data.chat.conversation`'s rules) and
             each answer one assistant turn (a list of one turn, one turn, or text); with
             `columns.prompt` null (TRL's implicit prompt) chosen and rejected are whole
             conversations that must agree on every turn but their final assistant one, which
             are the answers. Chosen must differ from rejected; exact duplicate pairs are
             rejected with the line they repeat.
             Schema `unpaired`: the prompt is its user turn's text or a conversation (as in
             `messages`), the completion text or one assistant turn, and the label a JSON bool
             (also 1/0, and the text true/false/1/0 a CSV cell holds); any other label is
             rejected with what to write. An exact duplicate is rejected with the line it
             repeats, an answer labelled both ways (same prompt and completion) with the line it
             contradicts;
3. format:   the prompt turns (after the recipe's system prompt, unless the conversation has its
             own) are rendered with the base model's chat template (or `prompt.chat_template`) and
             generation prompt; each answer is the assistant turn up to and including end-of-turn
             (as SFT labels are); a row whose prompt + (longer) answer exceeds `max_length` is
             rejected, never truncated;
4. split:    the seeded per-id hash of `data.rows.split_examples` (stable under edits).

Each stored pair keeps both the token ids (for our own log-probability metrics) and the same
sequences as text (`prompt_text`, `chosen_text`, `rejected_text`), which is what TRL's
preference trainers consume; `trainers.preference` checks that TRL re-tokenizes them to the same ids.
A stored labelled answer (`LabelledAnswer`) keeps the same for its one answer (`completion_text`,
`completion_ids`) and its `label`; an unpaired set's `dataset_info.json` says `"form": "unpaired"`
(a paired set's files are what they always were). `load_pairs` reads either form back
(`is_unpaired` tells which).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .rows import (TrainRowCount, _stable_id, check_columns, prompt_ids, read_rows, row_id, row_word, split_examples,
                   text_fields, train_row_bounds, write_jsonl)
from .types import TOO_DEEP, DataFileError, NestedTooDeep, Rejected, UnreadableRow, loads_shallow, shown, stored_row


@dataclass
class LabelledAnswer:
    """A prompt and one answer labelled desirable (`label` true) or undesirable: a row of an unpaired
    set (schema `unpaired`), or one answer of a pair as KTO reads it (`PreferencePair.labelled`)."""

    id: str
    prompt: str
    completion: str
    label: bool
    line: int
    task: str = ""
    prompt_text: str = ""
    completion_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None  # the prompt turns (`prompt` is the last user turn)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreferencePair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    line: int
    task: str = ""
    prompt_text: str = ""
    chosen_text: str = ""
    rejected_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    chosen_ids: list[int] = field(default_factory=list)
    rejected_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None  # schema messages: the prompt turns (`prompt` is the last user turn)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def labelled(self) -> tuple[LabelledAnswer, LabelledAnswer]:
        """The pair as two labelled answers: chosen desirable, rejected undesirable."""
        return tuple(LabelledAnswer(self.id, self.prompt, answer, good, self.line, self.task, self.prompt_text, text,
                                    self.prompt_ids, ids, self.messages)
                     for answer, good, text, ids in ((self.chosen, True, self.chosen_text, self.chosen_ids),
                                                     (self.rejected, False, self.rejected_text, self.rejected_ids)))


def is_unpaired(rows: list) -> bool:
    """Whether stored preference rows are an unpaired set's labelled answers (not pairs)."""
    return bool(rows) and isinstance(rows[0], LabelledAnswer)


def sequence_tokens(row: PreferencePair | LabelledAnswer) -> int:
    """Tokens of the row's longest sequence: its prompt and (longer) answer."""
    if isinstance(row, LabelledAnswer):
        return len(row.prompt_ids) + len(row.completion_ids)
    return len(row.prompt_ids) + max(len(row.chosen_ids), len(row.rejected_ids))


@dataclass
class PreferenceSource:
    name: str
    path: Path
    format: str
    columns: dict[str, str | None]
    eval_fraction: float
    split_seed: int
    max_rejected_fraction: float
    schema: str = "text"  # text | messages (pairs) | unpaired (labelled answers)
    split: str | None = None  # format hf: the split to read


def preference_source(recipe) -> PreferenceSource:
    """The recipe's `preferences:` section as a build input (`recipe`: a `ft_assets.config.recipe.Recipe`)."""
    from .rows import source_path

    spec = recipe.preferences
    return PreferenceSource(spec.name, source_path(recipe, spec), spec.format, dict(spec.columns),
                            spec.eval_fraction, recipe.split_seed(spec), spec.max_rejected_fraction, spec.schema,
                            spec.split)


@dataclass
class BuiltPreferences:
    train: list[PreferencePair] | list[LabelledAnswer]
    eval: list[PreferencePair] | list[LabelledAnswer]
    rejected: list[Rejected]
    stats: dict[str, Any]


FIELDS = ("prompt", "chosen", "rejected")
ANSWER_FIELDS = ("prompt", "completion", "label")  # schema unpaired
LABEL_TEXT = {"true": True, "false": False, "1": True, "0": False}  # a label as text (a CSV cell), lowercased


def validate_pairs(rows: list[tuple[int, dict]], columns: dict[str, Any], task: str, schema: str = "text",
                   unit: str = "line") -> tuple[list[PreferencePair], list[Rejected]]:
    kept, rejected = [], []
    seen: dict[tuple, int] = {}
    for lineno, row in rows:
        if isinstance(row, UnreadableRow):  # over the byte cap or nested too deep: refused by the reader
            rejected.append(Rejected(lineno, row.reason))
            continue
        rid = row_id(row, columns)
        if schema == "messages":
            turns, values, problem = _conversation_pair(row, columns)
        else:
            turns = None
            values, problem = text_fields(row, columns, FIELDS)
        if problem is None and values["chosen"] == values["rejected"]:
            problem = ("rejected", "chosen and rejected are the same text; a pair needs two different answers")
        if problem:
            rejected.append(Rejected(lineno, problem[1], problem[0], rid, stored_row(row)))
            continue
        key = (values["prompt"] if turns is None else json.dumps(turns, ensure_ascii=False),
               values["chosen"], values["rejected"])
        if key in seen:
            rejected.append(Rejected(lineno, f"exact duplicate of {unit} {seen[key]}", None, rid, stored_row(row)))
            continue
        seen[key] = lineno
        kept.append(PreferencePair(rid or _stable_id(*key), values["prompt"], values["chosen"], values["rejected"],
                                   lineno, task, messages=turns))
    return kept, rejected


def _conversation_pair(row: dict, columns: dict[str, Any]
                       ) -> tuple[list[dict] | None, dict[str, str], tuple[str, str] | None]:
    """Schema messages: (prompt turns, {prompt: last user turn, chosen, rejected}, None), or
    (None, {}, (field, reason))."""
    from .chat import conversation

    keys = (columns.get("role") or "role", columns.get("content") or "content", columns.get("roles") or {})
    if columns.get("prompt") is None:  # implicit prompt: two whole conversations sharing all but the last turn
        checked = {fld: conversation(row.get(columns[fld]), columns[fld], *keys) for fld in ("chosen", "rejected")}
        bad = [(fld, reason) for fld, (_, reason) in checked.items() if reason]
        if bad:
            return None, {}, (bad[0][0], f"{bad[0][0]}: {bad[0][1]}")
        whole = {fld: turns for fld, (turns, _) in checked.items()}
        prompt = whole["chosen"][:-1]
        if whole["rejected"][:-1] != prompt:
            return None, {}, ("rejected", "chosen and rejected differ before their last turn; with columns.prompt "
                                          "null the prompt is the turns they share, so only the final assistant "
                                          "turn may differ")
        answers = {f: whole[f][-1]["content"] for f in whole}
    else:
        prompt, problem = _prompt_turns(row.get(columns["prompt"]), columns["prompt"], keys, "chosen and rejected are")
        if problem:
            return None, {}, problem
        answers = {}
        for fld in ("chosen", "rejected"):
            text, reason = _answer_turn(row.get(columns[fld]), columns[fld], *keys)
            if reason:
                return None, {}, (fld, f"{fld} (column {columns[fld]!r}): {reason}")
            answers[fld] = text
    last_user = next(t["content"] for t in reversed(prompt) if t["role"] == "user")
    return prompt, {"prompt": last_user, **answers}, None


def _prompt_turns(value: Any, column: str, keys: tuple, reply: str
                  ) -> tuple[list[dict] | None, tuple[str, str] | None]:
    """A prompt as a conversation ending with a user turn, or as that turn's text (JSON text of the
    turns, a CSV cell, is parsed): (its turns, None) or (None, ("prompt", reason)); `reply` says
    what answers it ("the completion is"). `keys`: the turns' role key, content key, role names."""
    from .chat import conversation

    if isinstance(value, str):  # JSON text of the turns (a CSV cell), or the user turn's text itself
        try:
            parsed = _json_or_none(value)
        except NestedTooDeep:
            return None, ("prompt", f"prompt (column {column!r}): JSON {TOO_DEEP}")
        value = parsed if isinstance(parsed, list) else [{keys[0]: "user", keys[1]: value}]
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], dict):
        last = value[-1].get(keys[0])
        if isinstance(last, str) and keys[2].get(last, last) == "assistant":  # other roles: conversation()
            return None, ("prompt", f"prompt: the last turn (turn {len(value)}) is assistant; the prompt must "
                                    f"end with a user turn ({reply} the assistant's reply)")
        value = [*value, {keys[0]: "assistant", keys[1]: "(the answer)"}]  # checked as awaiting its reply
    turns, reason = conversation(value, column, *keys)
    if reason:
        return None, ("prompt", f"prompt: {reason}")
    return turns[:-1], None


def validate_answers(rows: list[tuple[int, dict]], columns: dict[str, Any], task: str, unit: str = "line"
                     ) -> tuple[list[LabelledAnswer], list[Rejected]]:
    """Schema unpaired: each row a prompt, a completion and its label (TRL's KTO form, text or
    conversational), as LabelledAnswers; the rows that are not, rejected with field and reason."""
    kept, rejected = [], []
    seen: dict[tuple, tuple[int, bool]] = {}
    for lineno, row in rows:
        if isinstance(row, UnreadableRow):  # over the byte cap or nested too deep: refused by the reader
            rejected.append(Rejected(lineno, row.reason))
            continue
        rid = row_id(row, columns)
        turns, values, problem = _labelled_row(row, columns)
        if problem:
            rejected.append(Rejected(lineno, problem[1], problem[0], rid, stored_row(row)))
            continue
        key = (json.dumps(turns, ensure_ascii=False), values["completion"])
        if key in seen:
            line, label = seen[key]
            reason, fld = f"exact duplicate of {unit} {line}", None
            if label != values["label"]:
                reason, fld = (f"same prompt and completion as {unit} {line}, which labels it {str(label).lower()}; "
                               "an answer is desirable or not: keep one of the two rows"), "label"
            rejected.append(Rejected(lineno, reason, fld, rid, stored_row(row)))
            continue
        seen[key] = (lineno, values["label"])
        kept.append(LabelledAnswer(rid or _stable_id(*key), values["prompt"], values["completion"], values["label"],
                                   lineno, task, messages=turns))
    return kept, rejected


def _labelled_row(row: dict, columns: dict[str, Any]) -> tuple[list[dict] | None, dict[str, Any], tuple[str, str] | None]:
    """Schema unpaired: (prompt turns, {prompt: last user turn, completion, label}, None), or
    (None, {}, (field, reason))."""
    keys = (columns.get("role") or "role", columns.get("content") or "content", columns.get("roles") or {})
    col = {f: columns[f] for f in ANSWER_FIELDS}
    value = row.get(col["prompt"])
    if not isinstance(value, (str, list, tuple)):
        got = "is missing or null" if value is None else f"is {type(value).__name__} {shown(value)}"
        return None, {}, ("prompt", f"prompt (column {col['prompt']!r}) {got}; write the user's text, or a list of "
                                    "turns ending with a user turn")
    turns, problem = _prompt_turns(value, col["prompt"], keys, "the completion is")
    if problem:
        return None, {}, problem
    completion, reason = _answer_turn(row.get(col["completion"]), col["completion"], *keys)
    if reason:
        return None, {}, ("completion", f"completion (column {col['completion']!r}): {reason}")
    label, reason = _label(row.get(col["label"]), col["label"])
    if reason:
        return None, {}, ("label", reason)
    last_user = next(t["content"] for t in reversed(turns) if t["role"] == "user")
    return turns, {"prompt": last_user, "completion": completion, "label": label}, None


def _label(value: Any, column: str) -> tuple[bool | None, str | None]:
    """(the label, None) or (None, reason): a bool, 1/0, or the text true/false/1/0 (any case)."""
    if isinstance(value, bool):
        return value, None
    if isinstance(value, int) and value in (0, 1):
        return bool(value), None
    if isinstance(value, str) and value.strip().lower() in LABEL_TEXT:
        return LABEL_TEXT[value.strip().lower()], None
    got = "is missing or null" if value is None else f"is {type(value).__name__} {shown(value)}"
    return None, (f"label (column {column!r}) {got}; write true (a desirable answer) or false (an undesirable "
                  "one): a JSON bool, 1 or 0, or the text true or false")


def _json_or_none(text: str) -> Any:
    """The JSON value of `text`, None when it is not JSON; NestedTooDeep past MAX_ROW_DEPTH."""
    try:
        return loads_shallow(text)
    except json.JSONDecodeError:
        return None


def _answer_turn(value: Any, column: str, role_key: str, content_key: str, role_names: dict[str, str]
                 ) -> tuple[str | None, str | None]:
    """One assistant reply: a list of one turn, one turn, or its text (JSON text of either in a
    CSV cell is parsed). (content, None) or (None, reason)."""
    if value is None:
        return None, "missing or null"
    if isinstance(value, str):
        try:
            parsed = _json_or_none(value)
        except NestedTooDeep:
            return None, f"JSON {TOO_DEEP}"
        if not isinstance(parsed, (list, dict)):
            return (value.strip(), None) if value.strip() else (None, "empty or whitespace")
        value = parsed
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return None, f"is {type(value).__name__}, expected a list of one assistant turn or its text"
    if len(value) != 1 or not isinstance(value[0], dict):
        return None, f"has {len(value)} turns; an answer is one assistant turn"
    raw_role, content = value[0].get(role_key), value[0].get(content_key)
    role = role_names.get(raw_role, raw_role) if isinstance(raw_role, str) else raw_role  # a list role: no lookup
    if role != "assistant":
        return None, f"its turn has role {shown(raw_role)}; an answer is an assistant turn"
    if not isinstance(content, str) or not content.strip():
        return None, f"its turn's content ({content_key!r}) is missing, not text or blank"
    return content.strip(), None


def _completion_ids(tokenizer, messages: list[dict], prompt: list[int], answer: str) -> list[int] | None:
    full = list(tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], return_dict=True)["input_ids"])
    if full[: len(prompt)] != prompt:
        return None
    completion = full[len(prompt):]
    eos = tokenizer.eos_token_id
    return completion[: completion.index(eos) + 1] if eos in completion else completion + [eos]


def _with_system(turns: list[dict], system: str | None) -> list[dict]:
    """The prompt turns after the recipe's system prompt, unless they have their own."""
    own_system = turns[0]["role"] == "system"
    return ([{"role": "system", "content": system}] if system and not own_system else []) + list(turns)


def _length_problem(prompt: int, longest: int, max_length: int) -> str | None:
    if prompt >= max_length:
        return f"prompt alone is {prompt} tokens, max_length is {max_length}; raise prompt.max_length"
    if longest > max_length:
        return (f"prompt+answer is {longest} tokens > max_length {max_length}; truncating would cut an answer; "
                "raise prompt.max_length")
    return None


def format_pair(tokenizer, pair: PreferencePair, system: str | None, max_length: int) -> str | None:
    """Fill the pair's ids and texts. Returns a rejection reason, or None when usable."""
    messages = _with_system(pair.messages or [{"role": "user", "content": pair.prompt}], system)
    p_ids = prompt_ids(tokenizer, messages)
    chosen = _completion_ids(tokenizer, messages, p_ids, pair.chosen)
    rejected = _completion_ids(tokenizer, messages, p_ids, pair.rejected)
    if chosen is None or rejected is None:
        return "chat template renders the prompt differently with and without an answer; cannot split the pair"
    problem = _length_problem(len(p_ids), len(p_ids) + max(len(chosen), len(rejected)), max_length)
    if problem:
        return problem
    pair.prompt_ids, pair.chosen_ids, pair.rejected_ids = p_ids, chosen, rejected
    pair.prompt_text = tokenizer.decode(p_ids)
    pair.chosen_text = tokenizer.decode(chosen)
    pair.rejected_text = tokenizer.decode(rejected)
    return None


def format_answer(tokenizer, answer: LabelledAnswer, system: str | None, max_length: int) -> str | None:
    """Fill a labelled answer's ids and texts (as `format_pair` does a pair's). Returns a rejection
    reason, or None when usable."""
    messages = _with_system(answer.messages or [{"role": "user", "content": answer.prompt}], system)
    p_ids = prompt_ids(tokenizer, messages)
    ids = _completion_ids(tokenizer, messages, p_ids, answer.completion)
    if ids is None:
        return ("chat template renders the prompt differently with and without an answer; cannot split the "
                "completion from its prompt")
    problem = _length_problem(len(p_ids), len(p_ids) + len(ids), max_length)
    if problem:
        return problem
    answer.prompt_ids, answer.completion_ids = p_ids, ids
    answer.prompt_text, answer.completion_text = tokenizer.decode(p_ids), tokenizer.decode(ids)
    return None


def build_preference_dataset(src: PreferenceSource, tokenizer, *, system: str | None, max_length: int,
                             chat_template: str | None = None) -> BuiltPreferences:
    """`chat_template`: Jinja text rendering the pairs instead of the tokenizer's own (as for SFT
    rows, `data.chat.template_override`); without either, `data.chat.ChatTemplateError`."""
    from .chat import template_override

    with template_override(tokenizer, chat_template):
        return _build(src, tokenizer, system, max_length)


def _read(src: PreferenceSource) -> tuple[list[tuple[int, dict]], list, list[Rejected]]:
    rows = read_rows(src.path, src.format, src.split)
    unpaired = src.schema == "unpaired"
    check_columns(src.path, rows, {f: src.columns.get(f) for f in (*(ANSWER_FIELDS if unpaired else FIELDS), "id")})
    if unpaired:
        kept, rejected = validate_answers(rows, src.columns, src.name, row_word(src.format))
    else:
        kept, rejected = validate_pairs(rows, src.columns, src.name, src.schema, row_word(src.format))
    return rows, kept, rejected


def _build(src: PreferenceSource, tokenizer, system: str | None, max_length: int) -> BuiltPreferences:
    rows, kept, rejected = _read(src)
    unit = row_word(src.format)
    fill = format_answer if src.schema == "unpaired" else format_pair
    usable = []
    for item in kept:
        reason = fill(tokenizer, item, system, max_length)
        if reason:
            rejected.append(Rejected(item.line, reason, "prompt", item.id))
        else:
            usable.append(item)
    if not usable:
        first = rejected[0]
        raise DataFileError(src.path, f"every row was rejected ({len(rejected)} rows); first reason: "
                                      f"{unit} {first.line}: {first.reason}")
    frac = len(rejected) / len(rows)
    if frac > src.max_rejected_fraction:
        worst = "; ".join(f"{unit} {r.line}: {r.reason}" for r in sorted(rejected, key=lambda r: r.line)[:5])
        raise DataFileError(src.path, f"{len(rejected)} of {len(rows)} rows rejected ({frac:.0%} > "
                                      f"max_rejected_fraction {src.max_rejected_fraction:.0%}). First: {worst}")
    train, evals = split_examples(usable, src.eval_fraction, src.split_seed)
    lengths = sorted(sequence_tokens(p) for p in usable)
    stats = {
        "source": src.name, "rows": len(rows), "kept": len(usable), "rejected_rows": len(rejected),
        "train_rows": len(train), "eval_rows": len(evals),
        "tokens": {"min": lengths[0], "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
                   "p50": lengths[len(lengths) // 2]},
    }
    if src.schema == "unpaired":  # a paired set's dataset_info keeps its keys
        desirable = sum(a.label for a in train)
        stats.update(form="unpaired", train_desirable=desirable, train_undesirable=len(train) - desirable)
    return BuiltPreferences(train, evals, rejected, stats)


def count_train_pairs(src: PreferenceSource) -> TrainRowCount:
    """`build_preference_dataset`'s training pairs (an unpaired set: labelled answers), bounded
    without a tokenizer (as `data.rows.count_train_rows` does for SFT rows)."""
    rows, _, rejected = _read(src)
    return train_row_bounds(src.path, len(rows), len(rejected), src.eval_fraction, src.max_rejected_fraction)


def save_preferences(ds: BuiltPreferences, out_dir: Path, meta: dict[str, Any]) -> None:
    write_jsonl(out_dir / "train.jsonl", (p.to_json() for p in ds.train))
    write_jsonl(out_dir / "eval.jsonl", (p.to_json() for p in ds.eval))
    write_jsonl(out_dir / "rejected.jsonl", (asdict(r) for r in ds.rejected))
    (out_dir / "dataset_info.json").write_text(json.dumps({**meta, **ds.stats}, indent=2, sort_keys=True) + "\n")


def load_pairs(dataset_dir: str | Path, split: str) -> list[PreferencePair] | list[LabelledAnswer]:
    """A stored split: its pairs, or an unpaired set's labelled answers (the rows with a `label`)."""
    with (Path(dataset_dir) / f"{split}.jsonl").open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [LabelledAnswer(**r) if "label" in r else PreferencePair(**r) for r in rows]
