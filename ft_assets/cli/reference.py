"""The recipe reference (docs/recipe_reference.md), generated from the schema itself.

`python -m ft_assets reference [-o PATH]` walks the pydantic classes of `ft_assets/config/recipe.py`
and the spec class registered for every method type (`methods/`, `register(..., spec=...)`)
and writes every key with its type, default, allowed values and description. A key's
description is its `Field(description=...)` or else the comment at the end of its line in the
class body; a section's is its class docstring. `ft_assets_tests/cli/test_reference.py` fails
when the committed file differs from what this writes, and when a key has no description.
Imports neither torch nor Dagster (like `validate`).
"""

from __future__ import annotations

import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ..config import generated_preferences as G, policy as P, recipe as R
from ..config.evaluator_spec import EvaluatorSpecBase, spec_classes as evaluator_spec_classes
from ..config.method_spec import spec_classes
from ..config.method_spec import MethodSpecBase, spec_types

REFERENCE_FILE = Path(__file__).resolve().parents[2] / "docs" / "recipe_reference.md"

# The recipe's sections in the order of the file, with the key path a user writes.
SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("datasets[]", R.DatasetSpec),
    ("datasets[].columns", R.ColumnMap),
    ("datasets[].columns (schema messages)", R.MessagesColumns),
    ("datasets[].columns (schema prompt_completion)", R.PromptCompletionColumns),
    ("datasets[].columns (schema alpaca)", R.AlpacaColumns),
    ("prompt", R.PromptSpec),
    ("base_model", R.BaseModelSpec),
    ("quantization", R.QuantizationSpec),
    ("training", R.TrainingSpec),
    ("preferences", R.PreferenceDataSpec),
    ("preferences.columns", R.PreferenceColumns),
    ("reward_models.<name>", R.RewardModelSpec),
    ("policies.<name>", P.PolicySpec),
    ("policies.<name>.rewards[]", P.RewardSpec),
    ("generated_preferences.<name>", G.GeneratedPreferencesSpec),
    ("distillation", R.DistillationSpec),
    ("evaluation", R.EvaluationSpec),
    ("evaluation.gate", R.GateSpec),
    ("publish", R.PublishSpec),
    ("export", R.ExportSpec),
    ("compute", R.ComputeSpec),
    ("compute.ray", R.RaySpec),
    ("automation", R.AutomationSpec),
]
SHARED_METHOD_KEYS = tuple(k for k in MethodSpecBase.model_fields)  # training, continue_from, replay_fraction


class MissingDescription(ValueError):
    """A recipe key with neither `Field(description=...)` nor a comment on its line."""


def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    """key -> the comment ending its line in the body of `cls` or of a class it extends."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = src.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                m = re.match(r"^    (\w+)\s*:", lines[tok.start[0] - 1])
                if m and m.group(1) in klass.model_fields:
                    out[m.group(1)] = tok.string.lstrip("#").strip()
    return out


def _constraints(metadata: list[Any], unit: str) -> list[str]:
    """Bounds from pydantic/annotated_types metadata, as `>= 1`, `at least 1 item`, ..."""
    out = []
    for m in metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{op} {getattr(m, attr)}")
        for attr, word in (("min_length", "at least"), ("max_length", "at most")):
            if getattr(m, attr, None) is not None:
                n = getattr(m, attr)
                out.append(f"{word} {n} {unit}{'' if n == 1 else 's'}")
        if getattr(m, "pattern", None) is not None:
            out.append(f"matches `{m.pattern}`")
        out += _constraints(getattr(m, "metadata", []) if isinstance(m, FieldInfo) else [], unit)
    return out


def describe_type(tp: Any) -> tuple[str, list[str]]:
    """(type as a recipe writer reads it, allowed values and bounds)."""
    if typing.get_origin(tp) is Annotated:
        inner, *meta = typing.get_args(tp)
        t, allowed = describe_type(inner)
        unit = {list: "item", dict: "entry", str: "character"}.get(typing.get_origin(inner) or inner, "")
        bounds = _constraints(meta, unit)
        return t, allowed + ([" and ".join(bounds)] if bounds else [])
    if typing.get_origin(tp) in (Union, types.UnionType):
        parts = [describe_type(a) for a in typing.get_args(tp)]
        return " or ".join(dict.fromkeys(p[0] for p in parts)), [a for p in parts for a in p[1]]
    if typing.get_origin(tp) is Literal:
        vals = typing.get_args(tp)
        return ("string" if all(isinstance(v, str) for v in vals) else "value"), [" \\| ".join(f"`{v}`" for v in vals)]
    if typing.get_origin(tp) is list:
        t, allowed = describe_type(typing.get_args(tp)[0])
        return f"list of {t}", [f"each item {a}" for a in allowed]
    if typing.get_origin(tp) is dict:
        return "mapping", []
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        path = next((p for p, c in SECTIONS if c is tp), None)
        return (f"mapping (`{path}`)" if path else "mapping"), []
    return {type(None): "null", str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        tp, getattr(tp, "__name__", str(tp))), []


def describe_default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "its section's defaults"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def rows(cls: type[BaseModel], skip: tuple[str, ...] = (), descriptions: dict[str, str] | None = None) -> list[str]:
    """One markdown table row per key of `cls` (an unknown key is an error in every section)."""
    comments = field_comments(cls)
    out = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for key, field in cls.model_fields.items():
        if field.exclude or key in skip:
            continue
        desc = field.description or (descriptions or {}).get(key) or comments.get(key)
        if not desc and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            desc = _first_sentence(field.annotation.__doc__)
        if not desc:
            raise MissingDescription(f"{cls.__name__}.{key} has no description: add `# ...` at the end of its line")
        t, allowed = describe_type(field.annotation if not field.metadata else Annotated[(field.annotation, *field.metadata)])
        out.append(f"| `{key}` | {t} | {describe_default(field)} | {'; '.join(allowed)} | {_cell(desc)} |")
    return out


def _first_sentence(doc: str | None) -> str:
    return inspect.cleandoc(doc or "").split("\n\n")[0].replace("\n", " ")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    out = [
        "# Recipe reference",
        "",
        "<!-- Generated by `python -m ft_assets reference` from ft_assets/config/recipe.py and the method specs",
        "     in ft_assets/methods/; do not edit: change the schema and run it again. -->",
        "",
        "Every key a recipe may hold, generated from the schema the recipe is validated against. A key",
        "not listed is an error (`python -m ft_assets validate` names the closest valid key). Relative",
        "paths resolve against `root`, which is itself relative to the recipe file's directory; paths",
        "that leave `root` are refused unless `allow_paths_outside_root: true`.",
        "",
        "## Top level",
        "",
        *rows(R.Recipe),
        "",
    ]
    for path, cls in SECTIONS:
        out += [f"## `{path}`", "", _first_sentence(cls.__doc__) if cls.__doc__ else "", "", *rows(cls), ""]
    out += [
        "## `methods.<name>`",
        "",
        "Each key of `methods:` names a method and is a partition of `adapter` (preference methods: of",
        "`preference_adapter`). Its `type` defaults to the name, so `lora: {r: 8}` is a lora method; give",
        "`type` explicitly to use a type twice (`lora_small: {type: lora, r: 4}`). Keys every method takes:",
        "",
        *rows(MethodSpecBase),
        "",
        "`sweep: {key: [values, ...]}` (any of the keys above, of the method's type, or of `training`,",
        "except `validation_fraction`, `validation_every`, `seed`) turns the method into one method per",
        "combination, named `<name>@key=value@...`, scored by `best_adapter[<name>]` (see `recipe.expand_sweep`).",
        "",
        "The keys of each method type (besides the ones above):",
        "",
    ]
    for spec in spec_classes():
        names = ", ".join(f"`{t}`" for t in spec_types(spec))
        out += [f"### {names}", "", f"{_first_sentence(spec.__doc__)} (`{spec.__module__}.{spec.__qualname__}`)", ""]
        own = [k for k in spec.model_fields if k not in SHARED_METHOD_KEYS and k != "type"]
        if own:
            out += rows(spec, skip=(*SHARED_METHOD_KEYS, "type"))
        else:
            out.append("No keys of its own.")
        out.append("")
    return "\n".join(out + _evaluator_sections()).rstrip("\n") + "\n"


def _evaluator_sections() -> list[str]:
    out = ["## `evaluation.evaluators[]`", "",
           "Each entry adds scores to `base_eval` and every `eval_report`, named `<name>.<score>` (the gate and",
           "the leaderboard use that name). Its `type` picks the kind; keys every evaluator takes:", "",
           *rows(EvaluatorSpecBase), "", "The keys of each kind (besides the ones above):", ""]
    for spec in evaluator_spec_classes():
        out += [f"### `{spec.kind()}`", "", f"{_first_sentence(spec.__doc__)} (`{spec.__module__}.{spec.__qualname__}`)", "",
                *rows(spec, skip=(*EvaluatorSpecBase.model_fields, "type")), ""]
    return out


def write(path: Path = REFERENCE_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path
