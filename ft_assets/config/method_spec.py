"""What a method's recipe spec is: the keys every method shares, and the base its class extends.

A recipe's `methods:` maps a name to a mapping of keys; which keys are allowed depends on the
method's `type`. Each method family declares them in its own module (`methods/<family>.py`)
as a pydantic class that extends `MethodSpecBase`, next to the method that reads them, and
registers both with one call, `register(method, spec=TheSpec)` (`methods/__init__.py`).
The recipe (`ft_assets/config/recipe.py`) validates each method against the registered spec class of
its `type`, so adding a method never touches recipe.py.

Contract of a spec class:
- `type: Literal[...]` lists the method types it configures (one class may serve several,
  e.g. `LoraSpec` for lora and qlora); every type in it is registered, with this class.
- Its other fields are the recipe keys under `methods.<name>:`, with their defaults and bounds
  (`Annotated[int, Field(ge=1)]`, `Literal[...]`, validators raising `ValueError("...")`).
  Unknown keys are refused (`extra="forbid"`); the recipe turns pydantic's errors into one
  line per problem naming the dotted key, and for an unknown key the closest valid one.
- Instances are frozen; their dump (and so the recipe hash, which versions every trained
  artifact) is the field values. A key added to an existing spec goes in `_OMIT_WHEN_DEFAULT`
  so recipes that do not set it keep their hashes.
- Optional hooks, overridden by a spec that needs them: `check_in_recipe(name, recipe)` for
  rules that involve other recipe sections (raise `ValueError`), and `training_defaults()`
  for `training:` values the method changes unless the recipe overrides them.

Shared keys (`MethodSpecBase`): `training` (overrides of the recipe's `training:` section),
`continue_from: previous` and `replay_fraction` (continual learning, `training/continual.py`).

`Strict` is the base of every recipe mapping (recipe.py uses it for all its sections); it
lives here so that method modules need not import recipe.py. Nothing here imports torch or
Dagster: recipe.py imports this module and the registry every time it is imported.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from .strict import Strict
from .training import TrainingOverrides

# The method types whose adapter another kind of training may continue (a preference method, a
# policy): peft LoRA adapters on the full-precision base.
PEFT_LORA_TYPES = ("lora", "dora", "rslora")


def lora_source_problem(where: str, source: str, methods: typing.Mapping[str, Any], reader: str) -> str | None:
    """Why method `source` cannot be the adapter a reader starts from (`reader`: what it does with it,
    e.g. "dpo continues"), written at recipe key `where`; None when it can: a method of the recipe
    of a PEFT_LORA_TYPES type."""
    spec = methods.get(source)
    if spec is None:
        return f"{where}: {source!r} is not a method of this recipe (methods: {', '.join(methods)})"
    if spec.type not in PEFT_LORA_TYPES:
        return f"{where}: {source!r} is a {spec.type} method; {reader} one of: {', '.join(PEFT_LORA_TYPES)}"
    return None


class MethodSpecBase(Strict):
    """The keys every method has. `continue_from: previous`: when the data changed, start from
    this method's previous adapter version instead of from scratch, replaying `replay_fraction`
    of the previous train split."""

    _OMIT_WHEN_DEFAULT = ("continue_from", "replay_fraction")

    training: TrainingOverrides = Field(default_factory=dict)  # overrides of the recipe's TrainingSpec
    continue_from: Literal["previous"] | None = None  # previous: continue this method's previous adapter when the data changed
    replay_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # with continue_from: share of the previous train split replayed

    @model_validator(mode="after")
    def _replay_needs_continue(self) -> "MethodSpecBase":
        if self.replay_fraction and self.continue_from is None:
            raise ValueError("replay_fraction needs continue_from: previous")
        return self

    # -- hooks a spec may override -------------------------------------------------------

    def check_in_recipe(self, name: str, recipe: "Recipe") -> None:  # config.recipe.Recipe, passed in
        """Rules that involve the rest of the recipe (called after every section validated, as
        method `name`). Raise ValueError with a message that names the keys to change."""

    def training_defaults(self) -> dict[str, Any]:
        """TrainingSpec values this method uses instead of the recipe's `training:` section;
        the method's own `training:` overrides still win."""
        return {}

    def describe(self) -> str:
        """What `python -m ft_assets validate` adds to this method's line (e.g. what it continues)."""
        return ""


class PreferenceSpecBase(MethodSpecBase):
    """A method trained on the recipe's `preferences:` pairs from the adapter of another method of
    the recipe (its `sft_from: str` field, which every subclass declares): it is a partition of
    `preference_adapter`, not of `adapter`, and trains in the Dagster step (one process): dpo,
    orpo, simpo and kto (`methods/preference.py`). The graph, step estimates and launchers ask
    `isinstance` of this class, never a method type. `trainer_settings()` gives the keys its
    trainer reads; `ROWS_PER_PAIR` how many rows a pair becomes (steps count rows). `pairs` names
    a `generated_preferences:` entry to train on instead of the recipe's `preferences:`."""

    _OMIT_WHEN_DEFAULT = (*MethodSpecBase._OMIT_WHEN_DEFAULT, "pairs")
    ROWS_PER_PAIR: ClassVar[int] = 1
    # the forms of `preferences:` data it trains on (`PreferenceDataSpec.form`; Recipe checks them):
    # "paired" (prompt/chosen/rejected), "unpaired" (prompt/completion/label answers: kto)
    DATA_FORMS: ClassVar[tuple[str, ...]] = ("paired",)

    pairs: str | None = None  # a `generated_preferences:` name to train on; null: the recipe's `preferences:`

    def trainer_settings(self) -> dict[str, Any]:
        raise NotImplementedError


def spec_types(spec: type[MethodSpecBase]) -> tuple[str, ...]:
    """The method types a spec class configures: the values of its `type: Literal[...]`."""
    field = spec.model_fields.get("type")
    types = typing.get_args(field.annotation) if field is not None else ()
    if not types or not all(isinstance(t, str) for t in types):
        raise TypeError(f"{spec.__name__} needs a field `type: Literal[...]` naming the method types it configures")
    return types


SPECS: dict[str, type[MethodSpecBase]] = {}  # type -> the spec class its recipe entries validate against


def register_spec(method_type: str, spec: type[MethodSpecBase]) -> None:
    """Validate recipe entries of `method_type` against `spec` (called by `methods.register`; the
    method families register when `ft_assets` is imported, see its __init__)."""
    if not (isinstance(spec, type) and issubclass(spec, MethodSpecBase)):
        raise TypeError(f"spec for {method_type!r} must be a MethodSpecBase subclass, not {spec!r}")
    types = spec_types(spec)
    if method_type not in types:
        raise ValueError(f"{spec.__name__}.type allows {list(types)}, not {method_type!r}")
    claimed: dict[str, type[MethodSpecBase]] = {}  # the recipe's union needs each type in one class only
    for cls in dict.fromkeys({**SPECS, method_type: spec}.values()):
        for t in spec_types(cls):
            if claimed.setdefault(t, cls) is not cls:
                raise ValueError(f"type {t!r} would be configured by both {claimed[t].__name__} and {cls.__name__}")
    SPECS[method_type] = spec


def spec_classes() -> tuple[type[MethodSpecBase], ...]:
    """The registered spec classes, each once, in registration order (the recipe's union)."""
    return tuple(dict.fromkeys(SPECS.values()))
