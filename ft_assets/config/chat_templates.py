"""`prompt.chat_template`: the built-in chat templates, and the Jinja text a recipe's value
selects (null: the tokenizer's own; a built-in name; a .jinja file). Data only: the rendering
and masking that use the text live in `data/chat.py`."""

from __future__ import annotations

from pathlib import Path

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
