"""Conversations (`schema: messages`) and chat templates.

Contract:
- `conversation(value, ...)` turns one row's cell into a checked list of `{role, content}`
  turns (roles system/user/assistant; an optional system turn first, then user and assistant
  alternating from user, ending with assistant; no blank content), or a reason naming the turn.
- `mask_conversation` renders the conversation with the tokenizer's chat template and labels
  only the content + end-of-turn token of the selected assistant turns (`all_assistant` or
  `last_assistant`); every other token is IGNORE_INDEX. The positions come from rendering
  prefixes (up to turn k with and without its assistant reply); a template whose rendering of
  a prefix is not a prefix of the whole conversation is refused for that row, with a reason.
- `chat_template_text` resolves `prompt.chat_template` (null, a built-in name, a .jinja file);
  `template_override` applies it to a tokenizer for the duration of a block only.
Nothing here imports torch or Dagster.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant", "last_assistant")

# Built-in templates for bases without one (written for this project). Each ends an assistant
# turn with a token the masking can find: ChatML's <|im_end|>, Llama 3's <|eot_id|>, Alpaca's eos.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
    ),
    "alpaca": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{- m['content'] + '\n\n' -}}"
        "{%- elif m['role'] == 'user' -%}{{- '### Instruction:\n' + m['content'] + '\n\n' -}}"
        "{%- else -%}{{- '### Response:\n' + m['content'] + eos_token + '\n\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"
    ),
}
TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")


class ChatTemplateError(ValueError):
    """No usable chat template (the tokenizer has none and the recipe names none, or a bad file)."""


def is_template_file(value: str) -> bool:
    return value.endswith(TEMPLATE_SUFFIXES)


def chat_template_text(value: str | None, path: Path | None = None) -> str | None:
    """The Jinja text `prompt.chat_template` selects; None keeps the tokenizer's own.
    `path`: the resolved file when `value` names a .jinja file."""
    if value is None:
        return None
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if path is None or not path.is_file():
        raise ChatTemplateError(f"prompt.chat_template: file {value!r} not found (resolved: {path})")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ChatTemplateError(f"prompt.chat_template: {path} is empty; it must hold a Jinja chat template")
    return text


@contextlib.contextmanager
def template_override(tokenizer, text: str | None) -> Iterator[None]:
    """`tokenizer` renders with `text` inside the block (its own template afterwards, so its
    fingerprint and every other user see it unchanged). Refuses to go on without any template."""
    if text is None and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the base model's tokenizer has no chat template; set prompt.chat_template in the recipe to a "
            f"built-in ({', '.join(BUILTIN_TEMPLATES)}) or to a .jinja file with one")
    if text is None:
        yield
        return
    before = tokenizer.chat_template
    tokenizer.chat_template = text
    try:
        yield
    finally:
        tokenizer.chat_template = before


# --------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------


def conversation(value: Any, column: str, role_key: str = "role", content_key: str = "content",
                 role_names: dict[str, str] | None = None) -> tuple[list[dict[str, str]] | None, str | None]:
    """(turns, None) or (None, reason). `role_names` maps the file's role names to ours
    (ShareGPT: {human: user, gpt: assistant}); a JSON string cell (CSV) is parsed first."""
    role_names = role_names or {}
    where = f"messages (column {column!r})"
    if value is None:
        return None, f"{where} is missing or null"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"{where} is text that is not a JSON list of turns"
    if not isinstance(value, (list, tuple)):
        return None, f"{where} is {type(value).__name__}, expected a list of {{{role_key}, {content_key}}} turns"
    if not value:
        return None, f"{where} is an empty conversation"
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            return None, f"turn {i} is {type(turn).__name__}, expected a mapping with {role_key!r} and {content_key!r}"
        raw_role, content = turn.get(role_key), turn.get(content_key)
        if raw_role is None:
            return None, f"turn {i} has no {role_key!r} key (keys: {sorted(turn)}); set columns.role"
        if not isinstance(raw_role, str):
            return None, f"turn {i}: role ({role_key!r}) is {type(raw_role).__name__}, expected text"
        role = role_names.get(raw_role, raw_role)
        if role not in ROLES:
            return None, (f"turn {i}: unknown role {raw_role!r}; expected system, user or assistant "
                          "(map other names with columns.roles)")
        if not isinstance(content, str):
            got = "missing" if content is None else type(content).__name__
            return None, f"turn {i} ({role}): content ({content_key!r}) is {got}, expected text"
        if not content.strip():
            return None, f"turn {i} ({role}): content is empty or whitespace"
        turns.append({"role": role, "content": content.strip()})
    start = 1 if turns[0]["role"] == "system" else 0
    for i, turn in enumerate(turns[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if turn["role"] != expected:
            after = f"after {turns[i - 1]['role']}" if i else "first"
            return None, (f"turn {i + 1}: {turn['role']} {after}; expected {expected} (an optional system turn "
                          "first, then user and assistant alternating)")
    if len(turns) == start:
        return None, "the conversation has only a system turn; it needs a user and an assistant turn"
    if turns[-1]["role"] != "assistant":
        return None, f"the last turn (turn {len(turns)}) is user; a conversation must end with an assistant turn"
    return turns, None


# --------------------------------------------------------------------------------------
# format and mask
# --------------------------------------------------------------------------------------


def render_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                              return_dict=True)["input_ids"])


def mask_conversation(tokenizer, turns: list[dict[str, str]], train_on: str, max_length: int
                      ) -> tuple[list[int], list[int], int] | str:
    """(input_ids, labels, answer_start) or a rejection reason. `answer_start`: where the last
    assistant turn begins (its prompt is everything before: what evaluation generates from).
    The ids end with the last assistant turn's end-of-turn token (the template's trailing
    newline is dropped, as for single-turn rows)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    eos = tokenizer.eos_token_id
    assistant_at = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
    full = render_ids(tokenizer, turns, generation_prompt=False)
    spans: list[tuple[int, list[int]]] = []  # (start, labelled tokens) per assistant turn
    for k in assistant_at:
        prompt = render_ids(tokenizer, turns[:k], generation_prompt=True)
        with_reply = render_ids(tokenizer, turns[: k + 1], generation_prompt=False)
        reply = with_reply[len(prompt):]
        if with_reply[: len(prompt)] != prompt:
            return f"chat template renders turn {k + 1} differently with and without the reply; cannot mask it"
        reply = reply[: reply.index(eos) + 1] if eos in reply else reply
        if full[: len(prompt) + len(reply)] != prompt + reply:
            return (f"chat template is not prefix-stable: the conversation up to turn {k + 1} is not a prefix of "
                    "the whole conversation's rendering; cannot mask it (use another prompt.chat_template)")
        spans.append((len(prompt), reply))
    last_start, last_reply = spans[-1]
    ids = full[: last_start + len(last_reply)]
    if eos not in last_reply:  # a template without an end-of-turn token: teach the model to stop
        ids, last_reply = ids + [eos], last_reply + [eos]
        spans[-1] = (last_start, last_reply)
    if len(ids) > max_length:
        for k, (start, reply) in zip(assistant_at, spans):
            if start + len(reply) > max_length:
                return (f"conversation is {len(ids)} tokens > max_length {max_length} (turn {k + 1}, assistant, "
                        f"ends at token {start + len(reply)}); truncating would cut a reply; shorten it or raise "
                        "prompt.max_length")
    labels = [IGNORE_INDEX] * len(ids)
    chosen = spans if train_on == "all_assistant" else spans[-1:]
    for start, reply in chosen:
        labels[start: start + len(reply)] = reply
    return ids, labels, last_start
