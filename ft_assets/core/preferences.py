"""Preference pairs (prompt, chosen, rejected) for DPO: the same four steps as SFT data.

1. read:     `core.data.read_rows` (file + line errors, nothing written on failure);
2. validate: prompt/chosen/rejected exist, are text, are not blank; chosen differs from
             rejected; exact duplicate pairs are rejected with the line they repeat;
3. format:   the prompt becomes a user turn (after the recipe's system prompt) rendered with
             the base model's chat template (or `prompt.chat_template`) and generation prompt; each answer is the
             assistant turn up to and including end-of-turn (as SFT labels are); a pair whose
             prompt + longer answer exceeds `max_length` is rejected, never truncated;
4. split:    the seeded per-id hash of `core.data.split_examples` (stable under edits).

Each stored pair keeps both the token ids (for our own log-probability metrics) and the same
sequences as text (`prompt_text`, `chosen_text`, `rejected_text`), which is what TRL's
DPOTrainer consumes; `core.dpo` checks that TRL re-tokenizes them to the same ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data import (
    DataFileError, Rejected, TrainRowCount, _stable_id, check_columns, prompt_ids, read_rows, row_id, split_examples,
    text_fields, train_row_bounds, write_jsonl,
)


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreferenceSource:
    name: str
    path: Path
    format: str
    columns: dict[str, str | None]
    eval_fraction: float
    split_seed: int
    max_rejected_fraction: float


def preference_source(recipe) -> PreferenceSource:
    """The recipe's `preferences:` section as a build input (`recipe`: a `ft_assets.recipe.Recipe`)."""
    spec = recipe.preferences
    return PreferenceSource(spec.name, recipe.dataset_path(spec), spec.format, spec.columns.model_dump(),
                            spec.eval_fraction, recipe.split_seed(spec), spec.max_rejected_fraction)


@dataclass
class BuiltPreferences:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    rejected: list[Rejected]
    stats: dict[str, Any]


FIELDS = ("prompt", "chosen", "rejected")


def validate_pairs(rows: list[tuple[int, dict]], columns: dict[str, str | None], task: str
                   ) -> tuple[list[PreferencePair], list[Rejected]]:
    kept, rejected = [], []
    seen: dict[tuple, int] = {}
    for lineno, row in rows:
        values, problem = text_fields(row, columns, FIELDS)
        rid = row_id(row, columns)
        if problem is None and values["chosen"] == values["rejected"]:
            problem = ("rejected", "chosen and rejected are the same text; a pair needs two different answers")
        if problem:
            rejected.append(Rejected(lineno, problem[1], problem[0], rid, row))
            continue
        key = (values["prompt"], values["chosen"], values["rejected"])
        if key in seen:
            rejected.append(Rejected(lineno, f"exact duplicate of line {seen[key]}", None, rid, row))
            continue
        seen[key] = lineno
        kept.append(PreferencePair(rid or _stable_id(*key), *key, lineno, task))
    return kept, rejected


def _completion_ids(tokenizer, messages: list[dict], prompt: list[int], answer: str) -> list[int] | None:
    full = list(tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], return_dict=True)["input_ids"])
    if full[: len(prompt)] != prompt:
        return None
    completion = full[len(prompt):]
    eos = tokenizer.eos_token_id
    return completion[: completion.index(eos) + 1] if eos in completion else completion + [eos]


def format_pair(tokenizer, pair: PreferencePair, system: str | None, max_length: int) -> str | None:
    """Fill the pair's ids and texts. Returns a rejection reason, or None when usable."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": pair.prompt}]
    p_ids = prompt_ids(tokenizer, messages)
    chosen = _completion_ids(tokenizer, messages, p_ids, pair.chosen)
    rejected = _completion_ids(tokenizer, messages, p_ids, pair.rejected)
    if chosen is None or rejected is None:
        return "chat template renders the prompt differently with and without an answer; cannot split the pair"
    longest = len(p_ids) + max(len(chosen), len(rejected))
    if len(p_ids) >= max_length:
        return f"prompt alone is {len(p_ids)} tokens, max_length is {max_length}; raise prompt.max_length"
    if longest > max_length:
        return (f"prompt+answer is {longest} tokens > max_length {max_length}; truncating would cut an answer; "
                "raise prompt.max_length")
    pair.prompt_ids, pair.chosen_ids, pair.rejected_ids = p_ids, chosen, rejected
    pair.prompt_text = tokenizer.decode(p_ids)
    pair.chosen_text = tokenizer.decode(chosen)
    pair.rejected_text = tokenizer.decode(rejected)
    return None


def build_preference_dataset(src: PreferenceSource, tokenizer, *, system: str | None, max_length: int,
                             chat_template: str | None = None) -> BuiltPreferences:
    """`chat_template`: Jinja text rendering the pairs instead of the tokenizer's own (as for SFT
    rows, `core.chat.template_override`); without either, `core.chat.ChatTemplateError`."""
    from .chat import template_override

    with template_override(tokenizer, chat_template):
        return _build(src, tokenizer, system, max_length)


def _build(src: PreferenceSource, tokenizer, system: str | None, max_length: int) -> BuiltPreferences:
    rows = read_rows(src.path, src.format)
    check_columns(src.path, rows, src.columns)
    kept, rejected = validate_pairs(rows, src.columns, src.name)
    usable = []
    for pair in kept:
        reason = format_pair(tokenizer, pair, system, max_length)
        if reason:
            rejected.append(Rejected(pair.line, reason, "prompt", pair.id))
        else:
            usable.append(pair)
    if not usable:
        first = rejected[0]
        raise DataFileError(src.path, f"every row was rejected ({len(rejected)} rows); first reason: "
                                      f"line {first.line}: {first.reason}")
    frac = len(rejected) / len(rows)
    if frac > src.max_rejected_fraction:
        worst = "; ".join(f"line {r.line}: {r.reason}" for r in sorted(rejected, key=lambda r: r.line)[:5])
        raise DataFileError(src.path, f"{len(rejected)} of {len(rows)} rows rejected ({frac:.0%} > "
                                      f"max_rejected_fraction {src.max_rejected_fraction:.0%}). First: {worst}")
    train, evals = split_examples(usable, src.eval_fraction, src.split_seed)
    lengths = sorted(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in usable)
    stats = {
        "source": src.name, "rows": len(rows), "kept": len(usable), "rejected_rows": len(rejected),
        "train_rows": len(train), "eval_rows": len(evals),
        "tokens": {"min": lengths[0], "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
                   "p50": lengths[len(lengths) // 2]},
    }
    return BuiltPreferences(train, evals, rejected, stats)


def count_train_pairs(src: PreferenceSource) -> TrainRowCount:
    """`build_preference_dataset`'s training pairs, bounded without a tokenizer (as
    `core.data.count_train_rows` does for SFT rows)."""
    rows = read_rows(src.path, src.format)
    check_columns(src.path, rows, src.columns)
    _, rejected = validate_pairs(rows, src.columns, src.name)
    return train_row_bounds(src.path, len(rows), len(rejected), src.eval_fraction, src.max_rejected_fraction)


def save_preferences(ds: BuiltPreferences, out_dir: Path, meta: dict[str, Any]) -> None:
    write_jsonl(out_dir / "train.jsonl", (p.to_json() for p in ds.train))
    write_jsonl(out_dir / "eval.jsonl", (p.to_json() for p in ds.eval))
    write_jsonl(out_dir / "rejected.jsonl", (asdict(r) for r in ds.rejected))
    (out_dir / "dataset_info.json").write_text(json.dumps({**meta, **ds.stats}, indent=2, sort_keys=True) + "\n")


def load_pairs(dataset_dir: str | Path, split: str) -> list[PreferencePair]:
    with (Path(dataset_dir) / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [PreferencePair(**json.loads(line)) for line in fh if line.strip()]
