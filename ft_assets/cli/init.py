"""`python -m ft_assets init DATA_FILE [-o recipe.yaml]`: a commented recipe sized for a user's file.

1. read the data with the data stage's own reader (`data.rows.read_rows`), so init sees the rows
   the pipeline will: a jsonl, json (one array of records), csv, parquet or arrow file, or a Hugging Face dataset directory
   (format hf; `--split` picks one of several splits, and the recipe keeps it);
2. guess the column mapping from the column names (and, for the id, from the values): every role
   gets exactly one column or a question the user settles with a flag (`--question COL`, ...);
   a required role left open exits 2 and writes nothing. The schema follows the columns: a column
   of conversations (lists of {role, content} or ShareGPT {from, value} turns) makes the recipe
   `schema: messages`, instruction + output columns (input optional) `schema: alpaca`, prompt +
   completion columns `schema: prompt_completion` (TRL's), anything else `schema: qa`;
   `--schema` chooses instead, and a `--question`/`--context`/`--answer` flag means qa;
3. count the rows the data stage keeps (same validation, same seeded eval split) and, with the
   base model's tokenizer, size `prompt.max_length` and `evaluation.max_new_tokens`;
4. show three rows rendered through the chat template exactly as `sft_dataset` formats them
   (plain prompts when the tokenizer cannot be loaded);
5. write the recipe (YAML with comments), check it with `load_recipe`, and refuse to overwrite
   an existing file without `--force`. File and column names go in as quoted values that read
   back exactly (`_q`; in comments, escaped onto one line): a name cannot add a key. `-o` that
   is a symbolic link, dangling or not, is refused; the file appears whole (`write_recipe`).

Torch and transformers are imported only to load the tokenizer (step 3/4), never at import.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..data.rows import (DataFileError, Example, Rejected, build_messages, check_columns, train_row_bounds,
                        validate_rows)
from ..data.rows import json_layout, read_rows as _read_rows
from ..training.steps import StepEstimate, recipe_step_estimates, steps_for
from ..config.recipe import DatasetSpec, RecipeError, TrainingSpec, parse_recipe, read_recipe_yaml

ROLES = ("question", "context", "answer")
# Column names each role is guessed from (compared after lower-casing, `-`/space -> `_`).
ROLE_NAMES = {
    "question": ("question", "prompt", "instruction", "input"),
    "context": ("context", "passage", "document", "text"),
    "answer": ("answer", "output", "response", "label"),
}
ID_NAMES = ("id", "uid", "uuid", "guid", "idx", "row_id", "example_id")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"}
FORMAT_CHOICES = list(typing.get_args(DatasetSpec.model_fields["format"].annotation))  # the recipe's; a directory is hf

# The defaults this command writes, and the evidence for them: the defaults study
# (ft_assets/bench/defaults_study.py; results in ft_assets/bench/results/defaults_study_cpu_*.md,
# summary in docs/results.md) measured them on three shipped tasks against the demo recipe's
# settings and TRL's documented SFT + LoRA setup; first seen on a user's finance QA file (LoRA+
# 0.625 token F1 vs plain LoRA 0.341 with the same settings, the demo recipe 0.247).
EPOCHS = 2.0
LR = 2e-4
BATCH_SIZE = 8
EVAL_FRACTION = 0.15
MAX_REJECTED_FRACTION = 0.05
VALIDATION_FRACTION = 0.1
EARLY_STOPPING_PATIENCE = 3
MAX_LENGTH_CAP = 2048
# The column maps' defaults per schema (keys at their default are left out of a written recipe),
# and each schema's system prompt.
SCHEMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "messages": {"messages": "messages", "role": "role", "content": "content", "roles": {}, "id": None},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "id": None},
    "prompt_completion": {"prompt": "prompt", "completion": "completion", "id": None},
}
SYSTEM = {"messages": "Answer the user's questions.", "alpaca": "Follow the user's instruction.",
          "prompt_completion": "Answer the user's questions."}
EXAMPLES_SHOWN = 3
LENGTH_SAMPLE = 2000  # rows tokenized to size max_length (evenly spaced when the file has more)


class InitError(Exception):
    """A problem that stops `init` before it writes anything (exit 2)."""


# --------------------------------------------------------------------------------------
# guessing the column mapping
# --------------------------------------------------------------------------------------


@dataclass
class ColumnFacts:
    name: str
    present: int = 0  # rows that have the key
    text: int = 0  # rows whose value is a non-blank string
    values: set = field(default_factory=set)
    duplicates: int = 0
    example_duplicate: Any = None
    chars: int = 0

    @property
    def mean_chars(self) -> int:
        return round(self.chars / self.text) if self.text else 0

    def describe(self) -> str:
        kind = "text" if self.text == self.present else f"{self.text} of {self.present} rows text"
        return f"{self.name!r} ({kind}, {self.mean_chars} chars on average)"


def column_facts(rows: list[tuple[int, dict]]) -> dict[str, ColumnFacts]:
    facts: dict[str, ColumnFacts] = {}
    for _, row in rows:
        for key, value in row.items():
            f = facts.setdefault(key, ColumnFacts(key))
            f.present += 1
            if isinstance(value, str) and value.strip():
                f.text += 1
                f.chars += len(value.strip())
            hashable = json.dumps(value, sort_keys=True, default=str)
            if hashable in f.values:
                f.duplicates += 1
                f.example_duplicate = f.example_duplicate if f.example_duplicate is not None else value
            else:
                f.values.add(hashable)
    return facts


CONVERSATION_KEYS = (("role", "content"), ("from", "value"))  # (role key, content key): OpenAI/TRL, ShareGPT
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def detect_conversation(rows: list[tuple[int, dict]]) -> dict[str, Any] | None:
    """The `schema: messages` column map when one column holds conversations in (nearly) every
    row: non-empty lists of mappings with one of CONVERSATION_KEYS; None otherwise."""
    found = None
    for col in dict.fromkeys(k for _, r in rows for k in r):
        values = [r.get(col) for _, r in rows]
        turns = [v for v in values if isinstance(v, list) and v and all(isinstance(t, dict) for t in v)]
        if len(turns) < max(1, 0.9 * len(values)):
            continue
        for role_key, content_key in CONVERSATION_KEYS:
            if all(role_key in t and content_key in t for v in turns for t in v):
                names = {t[role_key] for v in turns for t in v}
                roles = {k: v for k, v in SHAREGPT_ROLES.items() if k in names}
                if found is not None:
                    return None  # two conversation columns: ask nobody, guess nothing
                found = {"messages": col, "role": role_key, "content": content_key, "roles": roles}
    return found


def detect_instruction_schema(facts: dict[str, "ColumnFacts"]) -> tuple[str, dict[str, str | None]] | None:
    """(schema, column map) for Alpaca's instruction/input/output or TRL's prompt/completion
    columns (names compared after `_norm`); None when the file has neither pair."""
    named = {_norm(c): c for c in facts}
    if "instruction" in named and "output" in named:
        return "alpaca", {"instruction": named["instruction"], "input": named.get("input"), "output": named["output"]}
    if "prompt" in named and "completion" in named:
        return "prompt_completion", {"prompt": named["prompt"], "completion": named["completion"]}
    return None


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[_\W]+", _norm(name)) if t}


@dataclass
class Mapping:
    columns: dict[str, str | None]  # question/context/answer/id -> column (None: not used)
    notes: list[str]  # how each role was settled, one line each
    questions: list[str]  # ambiguities the user must settle (each names the flag and recipe key)
    unused: list[str]


@dataclass
class _Guess:
    """`guess_columns` under way: the roles settled so far and what it has to say about them."""
    facts: dict[str, ColumnFacts]
    chosen: dict[str, str] = field(default_factory=dict)  # role -> column
    taken: set[str] = field(default_factory=set)  # columns no further role may be guessed from
    notes: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)

    def free(self) -> list[str]:
        return [c for c in self.facts if c not in self.taken]


def guess_columns(facts: dict[str, ColumnFacts], given: dict[str, str | None], no_context: bool = False,
                  no_id: bool = False) -> Mapping:
    """Settle question/context/answer/id. `given`: columns named by flags (they always win)."""
    guess = _Guess(facts)
    _take_flagged_columns(guess, given)
    if not no_context:
        _take_alpaca_pair(guess)
    for role in ("question", "answer", "context"):  # context last: it may be asked about the columns left
        if role in guess.chosen or (role == "context" and no_context):
            continue
        _guess_role(guess, role)
    if no_context:
        guess.chosen.pop("context", None)
        guess.notes.append("context  <- none (--no-context)")
    if no_id:
        guess.chosen.pop("id", None)
        guess.notes.append("id       <- none (--no-id; rows get ids from a hash of their text)")
    elif "id" not in guess.chosen:
        _guess_id(guess)
    order = ("question", "context", "answer", "id")
    notes = sorted(guess.notes, key=lambda n: order.index(n.split()[0]))
    columns = {role: guess.chosen.get(role) for role in order}
    unused = [c for c in facts if c not in columns.values()]
    return Mapping(columns, notes, guess.questions, unused)


def _flag_hint(role: str) -> str:
    return f"--{role} COL (recipe key datasets[0].columns.{role})"


def _looks_like_id(column: str) -> bool:
    return _norm(column) in ID_NAMES or _norm(column).endswith("_id")


def _take_flagged_columns(guess: _Guess, given: dict[str, str | None]) -> None:
    """The columns named by flags; a name the file lacks is an error."""
    for role, col in given.items():
        if col is None:
            continue
        if col not in guess.facts:
            raise InitError(f"--{role} {col!r}: no such column; the file has {', '.join(map(repr, guess.facts))}")
        guess.chosen[role] = col
        guess.notes.append(f"{role:<8} <- {col!r} (--{role})")
    guess.taken = set(guess.chosen.values())


def _role_candidates(guess: _Guess, role: str) -> tuple[list[str], str]:
    """The free columns `role` could be, and how they were found (for the note)."""
    free = guess.free()
    exact = [c for c in free if _norm(c) in ROLE_NAMES[role]]
    if exact:
        return exact, "named"
    # A name that contains one role's word (`answer_text`, `user_prompt`), and no other role's.
    loose = []
    for c in free:
        hits = {r for r in ROLES if _tokens(c) & set(ROLE_NAMES[r])}
        if hits == {role}:
            loose.append(c)
    return loose, "name contains"


def _take_alpaca_pair(guess: _Guess) -> None:
    """Alpaca's convention: `instruction` is the task (question), `input` the material it applies
    to (context), when neither role is settled and no column is named for the context."""
    alpaca = {_norm(c): c for c in guess.free() if _norm(c) in ("instruction", "input")}
    if (len(alpaca) == 2 and "question" not in guess.chosen and "context" not in guess.chosen
            and not _role_candidates(guess, "context")[0]):
        guess.chosen["question"], guess.chosen["context"] = alpaca["instruction"], alpaca["input"]
        guess.taken |= set(alpaca.values())
        guess.notes.append(f"question <- {alpaca['instruction']!r}, context <- {alpaca['input']!r} (Alpaca's "
                           "instruction/input convention; swap with --question/--context)")


def _guess_role(guess: _Guess, role: str) -> None:
    """Question, answer or context from the column names: one candidate settles it, several are
    a question; none is a question too, except for the context (which may have no column)."""
    found, how = _role_candidates(guess, role)
    words = "/".join(ROLE_NAMES[role])
    if len(found) == 1:
        guess.chosen[role] = found[0]
        guess.taken.add(found[0])
        guess.notes.append(f"{role:<8} <- {found[0]!r} ({how} {_norm(found[0]) if how == 'named' else words})")
    elif len(found) > 1:
        listed = "; ".join(guess.facts[c].describe() for c in found)
        guess.questions.append(f"Which column is the {role}? {len(found)} columns could be: {listed}. "
                               f"Pass {_flag_hint(role)}" + (", or --no-context for none." if role == "context" else "."))
    elif role != "context":
        guess.questions.append(f"Which column is the {role}? No column is named {words} (columns: "
                               f"{', '.join(map(repr, guess.free()))}). Pass {_flag_hint(role)}.")
    elif guess.questions:
        guess.notes.append("context  <- settled once the question and answer are")
    else:
        _ask_about_unclaimed_context(guess, words)


def _ask_about_unclaimed_context(guess: _Guess, words: str) -> None:
    """No context by name; a text column nobody claimed may well be it (a headline, a review)."""
    facts = guess.facts
    left = [c for c in guess.free() if not _looks_like_id(c) and facts[c].text and len(facts[c].values) > 1]
    if left:
        listed = "; ".join(facts[c].describe() for c in left)
        guess.questions.append(f"Is one of the columns left the context (the material the question is about)? "
                               f"No column is named {words}; left: {listed}. Pass {_flag_hint('context')}, or "
                               "--no-context if the question alone is the prompt.")
    else:
        guess.notes.append("context  <- none (no column named " + words + "; prompts use "
                           "prompt.template_without_context)")


def _guess_id(guess: _Guess) -> None:
    """The row id: the one free id-named column whose values are unique, or a question."""
    ids = [c for c in guess.free() if _looks_like_id(c)]
    unique = [c for c in ids if guess.facts[c].duplicates == 0]
    if len(unique) == 1:
        guess.chosen["id"] = unique[0]
        guess.notes.append(f"id       <- {unique[0]!r} (its {len(guess.facts[unique[0]].values)} values are unique)")
    elif len(unique) > 1:
        guess.questions.append(f"Which column is the row id? {', '.join(map(repr, unique))} all hold unique values. "
                               f"Pass {_flag_hint('id')}, or --no-id to derive ids from the row text.")
    elif ids:
        f = guess.facts[ids[0]]
        guess.questions.append(f"Column {ids[0]!r} looks like a row id but repeats values ({f.duplicates} repeats, "
                               f"e.g. {f.example_duplicate!r}); the eval split and reports key rows by id. Pass "
                               f"--no-id to derive ids from the row text, or {_flag_hint('id')} to use it anyway.")
    else:
        guess.notes.append("id       <- none (no unique id column; rows get ids from a hash of their text)")


# --------------------------------------------------------------------------------------
# the tokenizer (only to show examples and size lengths)
# --------------------------------------------------------------------------------------


def load_bundled_tokenizer():
    """The bundled SmolLM2's tokenizer from its GGUF, with the end-of-turn token as eos the way the
    base_model stage leaves it (`models.base_model.fix_special_tokens`)."""
    from ..models.base_model import bundled_gguf_path

    gguf = bundled_gguf_path()
    if not gguf.is_file():
        raise FileNotFoundError(f"bundled GGUF not found at {gguf} (run `make install` or set FT_GGUF)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return end_turn_as_eos(tok)


def end_turn_as_eos(tok):
    """SmolLM2's GGUF says eos=<|im_start|>; the model ends a turn with <|im_end|> (see fix_special_tokens)."""
    if "<|im_end|>" in tok.get_vocab() and tok.eos_token != "<|im_end|>":
        tok.eos_token = "<|im_end|>"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _round_up(n: int, to: int) -> int:
    return int(math.ceil(n / to) * to)


def size_lengths(tok, examples: list[Example], prompt: dict, schema: str = "qa") -> tuple[int, int, str]:
    """(max_length, max_new_tokens, how) from the token lengths of (a sample of) the rows."""
    from ..data.chat import mask_conversation
    from ..data.rows import prompt_ids

    step = max(1, math.ceil(len(examples) / LENGTH_SAMPLE))
    sample = examples[::step]
    full, answers = [], []
    for ex in sample:
        msgs = build_messages(ex, prompt["system"], prompt["template"], prompt["template_without_context"], schema)
        if schema == "messages":  # the whole conversation; the answer evaluation generates is the last reply
            masked = mask_conversation(tok, msgs, "all_assistant", sys.maxsize)
            if isinstance(masked, str):
                raise ValueError(masked)
            ids, _, start = masked
            full.append(len(ids))
            answers.append(len(ids) - start)
            continue
        p = len(prompt_ids(tok, msgs))
        a = len(tok(ex.answer, add_special_tokens=False)["input_ids"]) + 1  # + end of turn
        full.append(p + a + 1)
        answers.append(a)
    longest = max(full)
    max_length = min(MAX_LENGTH_CAP, max(64, _round_up(longest * 1.1, 32)))
    over = sum(1 for n in full if n > max_length)
    max_new = min(1024, max(8, _round_up(max(answers) * 1.25, 8)))
    how = (f"longest row {longest} tokens" + (f" in a sample of {len(sample)} rows" if step > 1 else "")
           + (f"; {over} sampled rows are longer than the cap {MAX_LENGTH_CAP} and will be rejected" if over else "")
           + f"; longest answer {max(answers)} tokens")
    return max_length, max_new, how


def render_examples(tok, examples: list[Example], prompt: dict, schema: str = "qa") -> list[str]:
    out = []
    for ex in examples[:EXAMPLES_SHOWN]:
        msgs = build_messages(ex, prompt["system"], prompt["template"], prompt["template_without_context"], schema)
        if schema != "messages":  # a conversation already ends with its reply
            msgs = msgs + [{"role": "assistant", "content": ex.answer}]
        if tok is not None:
            text = tok.apply_chat_template(msgs, tokenize=False)
        else:
            text = "".join(f"[{m['role']}]\n{m['content']}\n" for m in msgs)
        out.append(f"--- row {ex.id} (line {ex.line}) ---\n" + _elide(text.rstrip("\n")))
    return out


def _elide(text: str, width: int = 300) -> str:
    lines = []
    for line in text.split("\n"):
        if len(line) > width:
            line = f"{line[:width - 60]} … [{len(line) - (width - 60)} more characters]"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the recipe text
# --------------------------------------------------------------------------------------


def _q(s: Any) -> str:
    """A YAML scalar on one line that reads back as exactly `s`, whatever a file or column name
    holds: a string double-quoted by PyYAML's own emitter, which escapes every line break (also
    NEL, U+2028/9 that JSON's quoting leaves raw) and non-printable character; a mapping (the
    fixed role names) as JSON, which is YAML."""
    if not isinstance(s, str):
        return json.dumps(s, ensure_ascii=False)
    out = yaml.safe_dump(s, default_style='"', allow_unicode=True, width=math.inf).rstrip("\n")
    if "\n" in out or yaml.safe_load(out) != s:  # never seen; refuse rather than write another value
        raise InitError(f"{s!r} cannot be written as one YAML value; rename it")
    return out


def _shown(s: str) -> str:
    """`s` in a comment line: as it is when printable, else JSON-escaped, so it stays one line."""
    return s if s.isprintable() else json.dumps(s)


def _ident(stem: str, pattern: str, fallback: str) -> str:
    s = re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_")
    return s if s and re.fullmatch(pattern, s) else fallback


def recipe_paths(data: Path, out: Path) -> tuple[str, str, bool, str]:
    """(root, dataset path, allow_paths_outside_root, why) for a recipe written at `out`.

    `root` is the nearest directory holding both the recipe and the data file, relative to the
    recipe; only when that is the filesystem root is the path absolute and outside the root."""
    data, out_dir = data.resolve(), out.resolve().parent
    common = Path(os.path.commonpath([data, out_dir]))
    if common == Path(common.anchor):
        return ".", str(data), True, (f"the data file and the recipe share no directory but {common}: the path is "
                                      "absolute and outside `root`")
    root = os.path.relpath(common, out_dir)
    return Path(root).as_posix(), data.relative_to(common).as_posix(), False, ""


def format_lines(fmt: str, split: str | None) -> list[str]:
    """The dataset's `format` line, and its `split` for a dataset directory of several splits."""
    lines = [f"    format: {fmt}                 # {' | '.join(FORMAT_CHOICES)}"]
    return lines + [f"    split: {_q(split)}"] if split is not None else lines


def recipe_text(*, data_arg: str, name: str, ds_name: str, root: str, path: str, outside: bool, outside_why: str, fmt: str,
                split: str | None = None,
                columns: dict, n_rows: int, system: str, template: str, template_without_context: str,
                max_length: int, max_length_how: str, max_new_tokens: int, train_rows: int,
                trained_rows: int | None = None,
                early_stopping: bool, schema: str = "qa") -> str:
    """The recipe as commented YAML. `train_rows`: the training split; `trained_rows`: what the
    training loop trains on (the split less the validation rows, when validation is on)."""
    trained_rows = train_rows if trained_rows is None else trained_rows
    lines = [
        *_header_lines(data_arg, name, root, outside, outside_why),
        "",
        *_dataset_lines(schema, n_rows, ds_name, path, fmt, split, _columns_value(columns, schema)),
        "",
        *_prompt_lines(schema, system, template, template_without_context, max_length, max_length_how),
        "",
        *_model_lines(),
        *_training_lines(train_rows, trained_rows, early_stopping),
        "",
        *_method_lines(),
        "",
        *_evaluation_lines(max_length_how, max_new_tokens),
    ]
    return "\n".join(lines)


def _header_lines(data_arg: str, name: str, root: str, outside: bool, outside_why: str) -> list[str]:
    """What wrote the recipe, its name and seed, and where its paths resolve from."""
    lines = [
        f"# Written by `python -m ft_assets init {_shown(data_arg)}`: a starting point sized for this file. Edit freely,",
        "# then check it with `python -m ft_assets validate THIS_FILE` (it prints the steps each method runs).",
        f"name: {name}",
        "seed: 42",
        f"root: {_q(root)}" + "               # relative paths below resolve against this (itself relative to this file)",
    ]
    if outside:
        lines += [f"# {outside_why}; so allow_paths_outside_root is on. Move the file next to",
                  "# the recipe (or the recipe next to it) to turn it off.",
                  "allow_paths_outside_root: true"]
    return lines


def _columns_value(columns: dict, schema: str) -> str:
    """The `columns:` mapping on one line; for the non-qa schemas without the keys at their defaults
    (they say nothing), or, when every key is, the schema's named columns."""
    if schema != "qa":
        defaults = SCHEMA_DEFAULTS[schema]
        columns = ({k: v for k, v in columns.items() if v != defaults.get(k)} or (
            {"messages": "messages"} if schema == "messages" else {k: v for k, v in defaults.items() if v is not None}))
    return ", ".join(f"{k}: {_q(v) if v is not None else 'null'}" for k, v in columns.items())


def _dataset_lines(schema: str, n_rows: int, ds_name: str, path: str, fmt: str, split: str | None,
                   cols: str) -> list[str]:
    """The `datasets:` section, its comment saying what a row of this schema is."""
    if schema == "messages":
        what = [
            f"# The data: {n_rows} conversations (schema messages). `columns` names the column holding each",
            "# row's turns (and the turns' keys and role names when they differ from role/content and",
            "# system/user/assistant). eval_fraction is held out (by a seeded hash of each row id) for the",
            "# eval report, which generates each held-out conversation's last assistant turn.",
        ]
    elif schema in ("alpaca", "prompt_completion"):
        rows = ("Alpaca rows: the user turn is the instruction, then the input (when the row has one)\n"
                "# after a blank line; the output is the trained reply" if schema == "alpaca" else
                "prompt/completion pairs (TRL's form): the prompt is the user turn as written, the\n"
                "# completion the trained reply")
        what = [
            f"# The data: {n_rows} {rows}. `columns` names the file's column for each field. eval_fraction is",
            "# held out (by a seeded hash of each row id) for the eval report and never trained on.",
        ]
    else:
        what = [
            f"# The data: {n_rows} rows. `columns` maps each field of an example to a column of the file;",
            "# context: null builds prompts from template_without_context. eval_fraction is held out (by a",
            "# seeded hash of each row id) for the eval report and never trained on.",
        ]
    return [
        *what,
        "datasets:",
        f"  - name: {ds_name}",
        f"    path: {_q(path)}",
        *format_lines(fmt, split),
        *([f"    schema: {schema}"] if schema != "qa" else []),
        f"    columns: {{{cols}}}",
        *(["    train_on: all_assistant    # or last_assistant: only the final reply carries loss"]
          if schema == "messages" else []),
        f"    eval_fraction: {EVAL_FRACTION}",
        f"    max_rejected_fraction: {MAX_REJECTED_FRACTION}   # more bad rows (blank, too long) fail the data stage",
    ]


def _prompt_lines(schema: str, system: str, template: str, template_without_context: str, max_length: int,
                  max_length_how: str) -> list[str]:
    """The `prompt:` section: how a row becomes a chat, and max_length sized for the file."""
    if schema == "messages":
        how = [
            "# The conversations are rendered by the base model's chat template; system is added to those",
            "# without a system turn. max_length is sized for this file (" + max_length_how + ");",
            "# a conversation longer than max_length is rejected, never cut.",
        ]
    elif schema in ("alpaca", "prompt_completion"):
        how = [
            "# The rows are rendered by the base model's chat template after the system prompt (no template:",
            "# the user turn is the row's own text). max_length is sized for this file (" + max_length_how + ");",
            "# a row longer than max_length is rejected, never cut.",
        ]
    else:
        how = [
            "# How a row becomes a chat: the system prompt and the user turn (the answer is the assistant turn).",
            "# max_length is sized for this file (" + max_length_how + ");",
            "# a row longer than max_length is rejected, never cut.",
        ]
    templates = [f"  template: {_q(template)}", f"  template_without_context: {_q(template_without_context)}"]
    return [
        *how,
        "prompt:",
        f"  system: {_q(system)}",
        *(templates if schema == "qa" else []),
        f"  max_length: {max_length}",
    ]


def _model_lines() -> list[str]:
    """The `base_model:` and `quantization:` sections (the same for every file)."""
    return [
        "base_model:",
        "  source: bundled        # SmolLM2-135M-Instruct, offline; or hub (id: ...) / local (path: ...)",
        "",
        "quantization:",
        "  method: none           # nf4 only matters for qlora methods; none skips the 4-bit copy",
        "",
    ]


def _epoch_steps(n_rows: int) -> int:
    """Optimizer steps for EPOCHS over `n_rows` rows at BATCH_SIZE (as the training loop counts them)."""
    return steps_for(n_rows, argparse.Namespace(max_steps=sys.maxsize, epochs=EPOCHS, batch_size=BATCH_SIZE,
                                                grad_accum=1))


def _training_lines(train_rows: int, trained_rows: int, early_stopping: bool) -> list[str]:
    """The `training:` section: steps that follow the rows, and validation-based stopping (commented
    out where this version's schema lacks it)."""
    epoch_steps = _epoch_steps(trained_rows)
    max_steps = 2 * _epoch_steps(train_rows)
    less = "" if trained_rows == train_rows else f" ({train_rows} less the validation rows)"
    validation_every = max(1, math.ceil(epoch_steps / 4))
    checkpoint_every = validation_every
    lines = [
        "# Training length follows the data: epochs stops the run at",
        f"#   ceil({EPOCHS:g} epochs * {trained_rows} train rows{less} / (batch_size {BATCH_SIZE} * grad_accum 1))",
        f"#   = {epoch_steps} steps;",
        "# max_steps is only a ceiling (twice that, so the file may grow): add rows and the steps follow.",
        "# Why epochs 2, lr 2e-4 and lora_plus below: the defaults study in the ft_assets repository",
        "# (docs/results.md, \"Defaults that generalize\") measured them on three tasks against the demo",
        "# recipe's settings and TRL's documented SFT + LoRA setup.",
        "training:",
        f"  epochs: {EPOCHS:g}",
        f"  max_steps: {max_steps}",
        f"  batch_size: {BATCH_SIZE}",
        "  grad_accum: 1",
        f"  lr: {LR:.1e}".replace("e-0", "e-"),
        "  warmup_ratio: 0.1",
        "  lr_scheduler: cosine",
        f"  checkpoint_every: {checkpoint_every}",
    ]
    stop = [
        f"validation_fraction: {VALIDATION_FRACTION}   # carved from the training rows (never the eval split)",
        f"validation_every: {validation_every}        # steps between validation-loss measurements",
        f"early_stopping_patience: {EARLY_STOPPING_PATIENCE}   # stop after this many checks without improvement",
    ]
    if early_stopping:
        lines += ["  # Keep the checkpoint with the lowest validation loss; stop when it stops improving."]
        lines += [f"  {s}" for s in stop]
    else:
        lines += ["  # Validation-based stopping (issue 17) is not in this version's schema yet; when it is,",
                  "  # uncomment these to keep the best checkpoint and stop when validation loss stops improving:"]
        lines += [f"  # {s}" for s in stop]
    return lines


def _method_lines() -> list[str]:
    """The `methods:` section: lora_plus, the method the defaults study chose."""
    return [
        "# Each key under methods is a partition of the `adapter` asset (type defaults to the key).",
        "# lora_plus: LoRA with B learning `ratio` times faster than A (Hayou et al. 2024). To compare,",
        "# add e.g. `lora: {r: 16, alpha: 32, dropout: 0.05}`; each method may override training keys",
        "# under its own `training:`.",
        "methods:",
        "  lora_plus:",
        "    r: 16",
        "    alpha: 32",
        "    dropout: 0.05",
        "    ratio: 16",
    ]


def _evaluation_lines(max_length_how: str, max_new_tokens: int) -> list[str]:
    """The `evaluation:` and `compute:` sections; the recipe ends with a newline."""
    return [
        f"# max_new_tokens is sized for this file's answers ({max_length_how.rpartition('; ')[2] or 'default'}).",
        "evaluation:",
        f"  max_new_tokens: {max_new_tokens}",
        "  batch_size: 16",
        "",
        "compute:",
        "  device: auto           # auto | cpu | cuda",
        "",
    ]


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="the data: a jsonl, json (one array of records), csv, parquet or arrow file, or a Hugging Face dataset "
                                           "directory (save_to_disk or Hub layout; format hf)")
    p.add_argument("-o", "--output", type=Path, default=Path("recipe.yaml"), help="recipe to write (default: recipe.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--format", choices=FORMAT_CHOICES, help="default: from the file's extension; a directory is hf")
    p.add_argument("--split", help="format hf: the split to read, when the dataset has several")
    for role in (*ROLES, "id"):
        p.add_argument(f"--{role}", metavar="COL", help=f"the column holding the {role} (default: guessed)")
    p.add_argument("--no-context", action="store_true", help="use no context column")
    p.add_argument("--no-id", action="store_true", help="use no id column (ids are hashed from the row text)")
    p.add_argument("--schema", choices=list(SCHEMA_DEFAULTS) + ["qa"],
                   help="what a row is (default: from the columns; see the recipe's datasets[].schema)")


def main(argv: list[str], load_tokenizer: Callable[[], Any] = load_bundled_tokenizer, out=None, err=None) -> int:
    """`init` with argv (without the `init` word); tests pass their own tokenizer loader."""
    p = argparse.ArgumentParser(prog="python -m ft_assets init")
    add_arguments(p)
    return run(p.parse_args(argv), load_tokenizer, out or sys.stdout, err or sys.stderr)


def run(args: argparse.Namespace, load_tokenizer: Callable[[], Any] = load_bundled_tokenizer,
        out=sys.stdout, err=sys.stderr) -> int:
    try:
        return _run(args, load_tokenizer, out, err)
    except (InitError, DataFileError) as exc:
        print(f"error: {exc}", file=err)
        return 2


def _run(args, load_tokenizer, out, err) -> int:
    def say(*lines: str) -> None:
        for line in lines:
            print(line, file=out)

    data, dest = Path(args.data), Path(args.output)
    fmt = _input_format(args, data, dest)
    rows = _read_rows(data, fmt, args.split)
    facts = column_facts(rows)
    say(f"{data}: {len(rows)} rows, {fmt}, columns: {', '.join(facts)}")

    schema, m = _column_mapping(args, rows, facts)
    say("", "Column mapping (datasets[0].columns):", *[f"  {n}" for n in m.notes])
    if m.unused:
        say(f"  not used: {', '.join(map(repr, m.unused))}")
    if m.questions:
        say("", "To settle before a recipe can be written:", *[f"  ? {q}" for q in m.questions],
            "", f"nothing written; rerun with the flags above (python -m ft_assets init {data} ...)")
        return 2

    columns = m.columns
    kept, rejected = _kept_rows(data, rows, columns, schema)
    if rejected:
        say(f"  {len(rejected)} of {len(rows)} rows will be rejected (first: line {rejected[0].line}: "
            f"{rejected[0].reason})")
    prompt = _prompt_for(schema, columns)
    tok, tok_error, (max_length, max_new, how) = _measure_lengths(load_tokenizer, kept, prompt, schema)
    say("", f"{EXAMPLES_SHOWN} rows as sft_dataset will format them"
        + (" (the bundled SmolLM2 chat template):" if tok is not None else ":"))
    if tok is None:
        say(f"  (the tokenizer could not be loaded or used: {tok_error}; "
            "showing the plain prompt instead of the chat template)")
    say(*render_examples(tok, kept, prompt, schema))

    names = _recipe_names(data, dest)
    early = "validation_fraction" in TrainingSpec.model_fields
    # The training split's rows, counted as the data stage splits them (and as `validate` counts them).
    train_rows = train_row_bounds(data, len(rows), len(rejected), EVAL_FRACTION, MAX_REJECTED_FRACTION).high
    kwargs = dict(data_arg=str(args.data), **names, fmt=fmt, split=args.split, columns=columns,
                  n_rows=len(rows), **prompt, max_length=max_length, max_length_how=how, max_new_tokens=max_new,
                  train_rows=train_rows, early_stopping=early, schema=schema)
    text, est = _checked_recipe(kwargs, train_rows, dest)
    write_recipe(dest, text, args.force)
    say("", f"wrote {dest}: method lora_plus, lr {LR:g}, {est.describe()}, batch {BATCH_SIZE}, "
        f"max_length {max_length}" + (", early stopping on validation loss" if early else ""),
        f"next: edit it, check it with `python -m ft_assets validate {dest}`, then materialize with FT_RECIPE={dest}")
    return 0


def _input_format(args: argparse.Namespace, data: Path, dest: Path) -> str:
    """The data's format (from `--format`, or the extension; a directory is hf), once the flags,
    the output path and the data's existence are checked (in that order)."""
    fmt = args.format or ("hf" if data.is_dir() else FORMATS.get(data.suffix.lower()))
    if fmt == "json" and not args.format and data.is_file():
        fmt = json_layout(data)  # a .json file may hold JSON Lines too
    if fmt is None:
        raise InitError(f"{data}: cannot tell the format from {data.suffix!r}; pass --format {'|'.join(FORMAT_CHOICES)}")
    if args.split is not None and fmt != "hf":
        raise InitError(f"--split applies to format hf (a dataset directory) only; {data} is {fmt}")
    check_output(dest, args.force)
    if not (data.is_dir() if fmt == "hf" else data.is_file()):
        raise InitError(f"{data}: no such {'dataset directory' if fmt == 'hf' else 'file'}")
    return fmt


def _column_mapping(args: argparse.Namespace, rows: list[tuple[int, dict]],
                    facts: dict[str, ColumnFacts]) -> tuple[str, Mapping]:
    """(schema, column mapping) from the flags and the columns."""
    given = {r: getattr(args, r) for r in (*ROLES, "id")}
    schema, found = _schema_of(args, rows, facts, given)
    if schema == "messages":
        return schema, _conversation_mapping(found, facts, given, args.no_id)
    if schema != "qa":
        return schema, _instruction_mapping(schema, found, facts, given, args.no_id)
    return schema, guess_columns(facts, given, no_context=args.no_context, no_id=args.no_id)


def _kept_rows(data: Path, rows: list[tuple[int, dict]], columns: dict,
               schema: str) -> tuple[list[Example], list[Rejected]]:
    """(kept, rejected) rows as the data stage validates them; an error where the data stage would
    fail (no row kept, or more rejected than MAX_REJECTED_FRACTION)."""
    check_columns(data, rows, columns, schema)
    kept, rejected = validate_rows(rows, columns, schema=schema)
    if not kept:
        raise InitError(f"{data}: every row is rejected with this mapping; first: line {rejected[0].line}: "
                        f"{rejected[0].reason}")
    if len(rejected) / len(rows) > MAX_REJECTED_FRACTION:
        worst = "; ".join(f"line {r.line}: {r.reason}" for r in rejected[:3])
        raise InitError(f"{data}: {len(rejected)} of {len(rows)} rows would be rejected "
                        f"(> max_rejected_fraction {MAX_REJECTED_FRACTION}), so the data stage would fail. "
                        f"First: {worst}. Fix the file or the mapping")
    return kept, rejected


def _prompt_for(schema: str, columns: dict) -> dict[str, str]:
    """The recipe's prompt keys: the schema's system prompt (qa's says whether there is a context)."""
    system = SYSTEM[schema] if schema != "qa" else (
        "Answer the question from the context." if columns["context"] else "Answer the question.")
    return {"system": system,
            "template": "Context:\n{context}\n\nQuestion: {question}", "template_without_context": "{question}"}


def _measure_lengths(load_tokenizer: Callable[[], Any], kept: list[Example], prompt: dict,
                     schema: str) -> tuple[Any, str | None, tuple[int, int, str]]:
    """(tokenizer, why it is None, (max_length, max_new_tokens, how)): lengths measured on the rows,
    or the schema defaults when the tokenizer cannot be loaded or used on them."""
    try:
        tok = load_tokenizer()
        lengths = size_lengths(tok, kept, prompt, schema)
        render_examples(tok, kept[:1], prompt, schema)
        return tok, None, lengths
    except Exception as exc:  # a missing GGUF, no transformers, no chat template: show plain prompts
        return None, f"{type(exc).__name__}: {exc}", (
            384, 48, "schema defaults: the tokenizer could not be loaded to measure rows")


def _recipe_names(data: Path, dest: Path) -> dict[str, Any]:
    """recipe_text's name, dataset name and path arguments for `data` in a recipe at `dest`."""
    stem = data.stem
    ds_name = _ident(stem, r"[a-z][a-z0-9_]*", "")
    ds_name = ds_name if ds_name[:1].isalpha() else f"data_{ds_name}".rstrip("_")
    name = _ident(stem, r"[a-z0-9][a-z0-9_]*", "my").replace("_", "-") + "-lora-plus"
    root, path, outside, why = recipe_paths(data, dest)
    return dict(name=name, ds_name=ds_name, root=root, path=path, outside=outside, outside_why=why)


def _checked_recipe(kwargs: dict[str, Any], train_rows: int, dest: Path) -> tuple[str, StepEstimate]:
    """(text, lora_plus step estimate) of the recipe, checked by `load_recipe`'s parser; written
    again with the rows the loop trains on (the split less validation rows) where they differ."""
    text = recipe_text(**kwargs)
    recipe = _parse(text, dest)
    est = recipe_step_estimates(recipe).methods["lora_plus"]
    if est.rows is not None and est.rows.high != train_rows:  # the loop trains on the split less validation rows
        text = recipe_text(**{**kwargs, "trained_rows": est.rows.high})
        recipe = _parse(text, dest)
        est = recipe_step_estimates(recipe).methods["lora_plus"]
    return text, est


def _schema_of(args, rows, facts, given) -> tuple[str, dict[str, Any] | None]:
    """(schema, the columns found for it) from `--schema`, the qa flags or the columns."""
    if args.schema == "qa" or any(given[r] for r in ROLES) or args.no_context:
        if args.schema not in (None, "qa"):
            raise InitError(f"--schema {args.schema} cannot take --question/--context/--answer/--no-context "
                            "(those name qa columns); drop them or the --schema flag")
        return "qa", None
    conversation = detect_conversation(rows)
    instruction = detect_instruction_schema(facts)
    if args.schema == "messages" or (args.schema is None and conversation is not None):
        if conversation is None:
            raise InitError("--schema messages: no column holds conversations (lists of {role, content} or "
                            f"{{from, value}} turns in nearly every row); columns: {', '.join(map(repr, facts))}")
        return "messages", conversation
    if args.schema is None:
        return (instruction[0], instruction[1]) if instruction else ("qa", None)
    if instruction is None or instruction[0] != args.schema:
        need = "instruction and output" if args.schema == "alpaca" else "prompt and completion"
        raise InitError(f"--schema {args.schema}: the file has no {need} columns (columns: "
                        f"{', '.join(map(repr, facts))}); rename them, or use --schema qa with --question/--answer")
    return instruction


def _instruction_mapping(schema: str, found: dict[str, str | None], facts: dict[str, ColumnFacts],
                         given: dict[str, str | None], no_id: bool) -> Mapping:
    """`schema: alpaca | prompt_completion`: the columns found by name, and an id guessed as for qa."""
    others = {c: f for c, f in facts.items() if c not in found.values()}
    ids = guess_columns(others, {"id": given["id"]}, no_context=True, no_id=no_id)
    named = ", ".join(f"{k} <- {v!r}" for k, v in found.items() if v is not None)
    convention = "Alpaca's columns" if schema == "alpaca" else "TRL's prompt/completion columns"
    notes = [f"{named} ({convention}): schema {schema}", *[n for n in ids.notes if n.startswith("id ")]]
    if schema == "alpaca" and found["input"] is None:
        notes.append("input    <- none (no input column; the instruction alone is the user turn)")
    questions = [q for q in ids.questions if "row id" in q or "looks like a row id" in q]
    columns = {**found, "id": ids.columns["id"]}
    unused = [c for c in facts if c not in columns.values()]
    return Mapping(columns, notes, questions, unused)


def _conversation_mapping(conversation: dict[str, Any], facts: dict[str, ColumnFacts], given: dict[str, str | None],
                          no_id: bool) -> Mapping:
    """`schema: messages`: the conversation column found, and an id column guessed as for qa."""
    col = conversation["messages"]
    how = f"lists of {{{conversation['role']}, {conversation['content']}}} turns"
    if conversation["roles"]:
        how += ", roles " + ", ".join(f"{k} -> {v}" for k, v in conversation["roles"].items())
    others = {c: f for c, f in facts.items() if c != col}
    ids = guess_columns(others, {"id": given["id"]}, no_context=True, no_id=no_id)
    notes = [f"messages <- {col!r} ({how}): schema messages", *[n for n in ids.notes if n.startswith("id ")]]
    questions = [q for q in ids.questions if "row id" in q or "looks like a row id" in q]
    columns = {**conversation, "id": ids.columns["id"]}
    unused = [c for c in facts if c not in (col, columns["id"])]
    return Mapping(columns, notes, questions, unused)


def check_output(dest: Path, force: bool) -> None:
    """Refuse `-o` that is a symbolic link (dangling or not: init never writes through one) or,
    without --force, a path that exists."""
    if dest.is_symlink():
        raise InitError(f"{dest} is a symbolic link (to {os.readlink(dest)}); init writes a file of its own, never "
                        "through a link: remove the link, or pass -o another path")
    if dest.exists() and not force:
        raise InitError(f"{dest} exists; pass --force to overwrite it, or -o another file")
    if dest.is_dir():
        raise InitError(f"{dest} is a directory; pass -o a file path")


def _link_or_create(tmp: Path, dest: Path, text: str) -> None:
    """Hard-link `tmp` to `dest`; where the file system has no hard links (FAT, some network
    mounts), create `dest` exclusively (O_EXCL, O_NOFOLLOW: still never over or through anything)."""
    try:
        os.link(tmp, dest, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)


def write_recipe(dest: Path, text: str, force: bool) -> None:
    """Write `dest` whole or not at all, never through a link: a new file beside it (O_EXCL,
    O_NOFOLLOW), then hard-linked into place (which fails when anything, a dangling link
    included, appeared at `dest` meanwhile) or, with --force, renamed over it (which replaces a
    link, never follows it)."""
    check_output(dest, force)  # again: something may have appeared meanwhile
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        if force:
            os.replace(tmp, dest)
        else:
            _link_or_create(tmp, dest, text)
    except FileExistsError:
        raise InitError(f"{dest} appeared while init ran; pass --force to overwrite it, or -o another file") from None
    finally:
        tmp.unlink(missing_ok=True)


def _parse(text: str, dest: Path):
    try:
        return parse_recipe(read_recipe_yaml(text, dest), dest.resolve())
    except RecipeError as exc:  # a bug here, not the user's: say so plainly
        raise InitError(f"the recipe init built does not validate (please report): {exc}") from None
