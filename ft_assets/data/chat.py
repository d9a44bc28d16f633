"""Conversations (`schema: messages`) and chat templates.

Contract:
- `conversation(value, ...)` turns one row's cell into a checked list of `{role, content}`
  turns (roles system/user/assistant; an optional system turn first, then user and assistant
  alternating from user, ending with assistant; no blank content), or a reason naming the turn
  (values it quotes cut to `data.SHOWN_CHARS`; JSON text nested deeper than `data.MAX_ROW_DEPTH`
  refused).
- `mask_conversation` renders the conversation with the tokenizer's chat template and labels
  only the content + end-of-turn token of the selected assistant turns (`all_assistant` or
  `last_assistant`); every other token is IGNORE_INDEX. The positions come from rendering
  prefixes (up to turn k with and without its assistant reply); a template whose rendering of
  a prefix is not a prefix of the whole conversation is refused for that row, with a reason.
  A conversation of over MANY_TURNS turns rendered over max_length is refused as too long (the
  same reason) from O(log turns) prefix renderings, not one per turn (quadratic).
- `chat_template_text` resolves `prompt.chat_template` (null, a built-in name, a .jinja file);
  `template_override` applies it to a tokenizer for the duration of a block only.
Nothing here imports torch or Dagster.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

from ..config.chat_templates import BUILTIN_TEMPLATES, ChatTemplateError
from .types import TOO_DEEP, NestedTooDeep, loads_shallow, shown

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant", "last_assistant")

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
            value = loads_shallow(value)
        except json.JSONDecodeError:
            return None, f"{where} is text that is not a JSON list of turns"
        except NestedTooDeep:
            return None, f"{where} is JSON {TOO_DEEP}"
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
            return None, f"turn {i} has no {role_key!r} key (keys: {shown(sorted(turn))}); set columns.role"
        if not isinstance(raw_role, str):
            return None, f"turn {i}: role ({role_key!r}) is {type(raw_role).__name__}, expected text"
        role = role_names.get(raw_role, raw_role)
        if role not in ROLES:
            return None, (f"turn {i}: unknown role {shown(raw_role)}; expected system, user or assistant "
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


MANY_TURNS = 64  # a conversation longer than this, and over max_length, is measured by bisection


def mask_conversation(tokenizer, turns: list[dict[str, str]], train_on: str, max_length: int
                      ) -> tuple[list[int], list[int], int] | str:
    """(input_ids, labels, answer_start) or a rejection reason. `answer_start`: where the last
    assistant turn begins (its prompt is everything before: what evaluation generates from).
    The ids end with the last assistant turn's end-of-turn token (the template's trailing
    newline is dropped, as for single-turn rows). A conversation of over MANY_TURNS turns whose
    rendering is over max_length is refused without rendering every prefix (`_over_length`)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    eos = tokenizer.eos_token_id
    assistant_at = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
    full = render_ids(tokenizer, turns, generation_prompt=False)
    if len(full) > max_length and len(turns) > MANY_TURNS:
        reason = _over_length(tokenizer, turns, assistant_at, full, max_length)
        if reason is not None:
            return reason
    spans: list[tuple[int, list[int]]] = []  # (start, labelled tokens) per assistant turn
    for k in assistant_at:
        span = _reply_span(tokenizer, turns, full, k)
        if isinstance(span, str):
            return span
        spans.append(span)
    last_start, last_reply = spans[-1]
    ids = full[: last_start + len(last_reply)]
    if eos not in last_reply:  # a template without an end-of-turn token: teach the model to stop
        ids, last_reply = ids + [eos], last_reply + [eos]
        spans[-1] = (last_start, last_reply)
    if len(ids) > max_length:
        for k, (start, reply) in zip(assistant_at, spans):
            if start + len(reply) > max_length:
                return _too_long(len(ids), max_length, k, start + len(reply))
    labels = [IGNORE_INDEX] * len(ids)
    chosen = spans if train_on == "all_assistant" else spans[-1:]
    for start, reply in chosen:
        labels[start: start + len(reply)] = reply
    return ids, labels, last_start


def _reply_span(tokenizer, turns: list[dict[str, str]], full: list[int], k: int) -> tuple[int, list[int]] | str:
    """(start, labelled tokens) of assistant turn k, from rendering the turns before it with and
    without its reply; or why the template's rendering cannot be masked."""
    eos = tokenizer.eos_token_id
    prompt = render_ids(tokenizer, turns[:k], generation_prompt=True)
    with_reply = render_ids(tokenizer, turns[: k + 1], generation_prompt=False)
    reply = with_reply[len(prompt):]
    if with_reply[: len(prompt)] != prompt:
        return f"chat template renders turn {k + 1} differently with and without the reply; cannot mask it"
    reply = reply[: reply.index(eos) + 1] if eos in reply else reply
    if full[: len(prompt) + len(reply)] != prompt + reply:
        return (f"chat template is not prefix-stable: the conversation up to turn {k + 1} is not a prefix of "
                "the whole conversation's rendering; cannot mask it (use another prompt.chat_template)")
    return len(prompt), reply


def _too_long(n_ids: int, max_length: int, k: int, end: int) -> str:
    return (f"conversation is {n_ids} tokens > max_length {max_length} (turn {k + 1}, assistant, ends at token "
            f"{end}); truncating would cut a reply; shorten it or raise prompt.max_length")


def _over_length(tokenizer, turns: list[dict[str, str]], assistant_at: list[int], full: list[int],
                 max_length: int) -> str | None:
    """The turn-by-turn pass's reason for a conversation rendered over max_length (too long, at
    the first reply ending past it), from O(log n) prefix renderings: a bisection over the
    assistant turns, whose reply ends grow with the turn in a prefix-stable template (the pass
    renders every prefix, each as long as the conversation: quadratic). None when the
    conversation fits after all (tokens after the last end-of-turn are dropped). Only the turns
    rendered (the first, as the pass starts there, the last, the bisection's) are checked for
    prefix stability, and refused as the pass refuses them."""
    first, last = (_reply_span(tokenizer, turns, full, assistant_at[i]) for i in (0, -1))
    if isinstance(first, str) or isinstance(last, str):
        return first if isinstance(first, str) else last
    n_ids = last[0] + len(last[1]) + (tokenizer.eos_token_id not in last[1])
    if n_ids <= max_length:
        return None
    lo, hi, hi_end = 0, len(assistant_at) - 1, n_ids  # the reply of assistant_at[hi] ends at hi_end > max_length
    while lo < hi:
        mid = (lo + hi) // 2
        span = _reply_span(tokenizer, turns, full, assistant_at[mid])
        if isinstance(span, str):
            return span
        if span[0] + len(span[1]) > max_length:
            hi, hi_end = mid, span[0] + len(span[1])
        else:
            lo = mid + 1
    return _too_long(n_ids, max_length, assistant_at[hi], hi_end)
