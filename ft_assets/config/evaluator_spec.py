"""What an evaluator's recipe entry is, and the registry the recipe validates `evaluation.evaluators:` with.

`evaluation.evaluators:` is a list; each entry is a mapping whose `type` picks an evaluator kind
and whose other keys are that kind's. Each kind declares its keys in its own module
(`evaluation/evaluators/<kind>.py`) as a class extending `EvaluatorSpecBase`, next to the code
that reads them, and registers it with `register_spec` on import (the composition root,
`ft_assets/__init__.py`, imports `evaluation.evaluators`), so adding a kind never touches recipe.py.

Contract of a spec class:
- `type: Literal["<kind>"]`, one kind per class; `name` (default: the kind) prefixes every score
  the evaluator reports (`<name>.<score>`) and names its files, so two entries of one kind
  differ by name; names are unique in a recipe and safe as file names.
- Its other fields are the kind's recipe keys, with defaults and bounds; unknown keys are refused.
- `files(resolve, where)`: the local files the evaluator reads (a metric module, task configs,
  a probe set), each through `resolve(path, key)` (the recipe's `resolve_path`: relative to the
  recipe root, refused outside it) with `key` the dotted recipe key (`where` + `.path`): their
  content hashes join the code version of `base_eval` and `eval_report`, so editing one
  re-evaluates, as editing a raw data file re-formats.
Nothing here imports torch or Dagster.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Callable

from pydantic import Field

from .strict import Strict

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"  # becomes file names and score prefixes


class EvaluatorSpecBase(Strict):
    """The keys every evaluator has."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None  # prefix of its scores and files; default: its type

    @property
    def label(self) -> str:
        return self.name or self.kind()

    @classmethod
    def kind(cls) -> str:
        field = cls.model_fields.get("type")
        kinds = typing.get_args(field.annotation) if field is not None else ()
        if len(kinds) != 1 or not isinstance(kinds[0], str):
            raise TypeError(f"{cls.__name__} needs a field `type: Literal['<kind>']` naming its one kind")
        return kinds[0]

    def files(self, resolve: Callable[[str, str], Path], where: str) -> list[Path]:
        """The local files this evaluator reads (hashed into the evaluation's code version)."""
        return []


EVALUATOR_SPECS: dict[str, type[EvaluatorSpecBase]] = {}  # kind -> its spec class


def register_spec(spec: type[EvaluatorSpecBase]) -> type[EvaluatorSpecBase]:
    """Validate recipe entries of `spec.kind()` against `spec` (usable as a class decorator)."""
    if not (isinstance(spec, type) and issubclass(spec, EvaluatorSpecBase)):
        raise TypeError(f"{spec!r} is not an EvaluatorSpecBase subclass")
    kind = spec.kind()
    if EVALUATOR_SPECS.get(kind, spec) is not spec:
        raise ValueError(f"evaluator type {kind!r} is registered twice ({EVALUATOR_SPECS[kind].__name__}, {spec.__name__})")
    EVALUATOR_SPECS[kind] = spec
    return spec


def spec_classes() -> tuple[type[EvaluatorSpecBase], ...]:
    return tuple(EVALUATOR_SPECS.values())
