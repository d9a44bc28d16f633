"""What a method's recipe spec is: the keys every method shares, and the base its class extends.

A recipe's `methods:` maps a name to a mapping of keys; which keys are allowed depends on the
method's `type`. Each method family declares them in its own module (`core/methods/<family>.py`)
as a pydantic class that extends `MethodSpecBase`, next to the method that reads them, and
registers both with one call, `register(method, spec=TheSpec)` (`core/methods/__init__.py`).
The recipe (`ft_assets/recipe.py`) validates each method against the registered spec class of
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
`continue_from: previous` and `replay_fraction` (continual learning, `core/continual.py`).

`Strict` is the base of every recipe mapping (recipe.py uses it for all its sections); it
lives here so that method modules need not import recipe.py. Nothing here imports torch or
Dagster: recipe.py imports this module and the registry every time it is imported.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

if TYPE_CHECKING:
    from ...recipe import Recipe


class Strict(BaseModel):
    """A recipe mapping: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keys added after recipes were first hashed: left out of dumps (and so of every hash) while
    # they hold their default, so adding them re-versions nothing for recipes that do not use them.
    _OMIT_WHEN_DEFAULT: typing.ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler):
        data = handler(self)
        for key in self._OMIT_WHEN_DEFAULT:
            if isinstance(data, dict) and key in data and getattr(self, key) == type(self).model_fields[key].get_default(call_default_factory=True):
                del data[key]
        return data


class MethodSpecBase(Strict):
    """The keys every method has. `continue_from: previous`: when the data changed, start from
    this method's previous adapter version instead of from scratch, replaying `replay_fraction`
    of the previous train split."""

    _OMIT_WHEN_DEFAULT = ("continue_from", "replay_fraction")

    training: dict[str, Any] = Field(default_factory=dict)  # overrides of the recipe's TrainingSpec
    continue_from: Literal["previous"] | None = None  # previous: continue this method's previous adapter when the data changed
    replay_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # with continue_from: share of the previous train split replayed

    @field_validator("training")
    @classmethod
    def _known_training_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ...recipe import TrainingSpec  # recipe.py imports this module, so not at the top

        TrainingSpec(**v)  # raises with the usual messages for unknown keys / bad values
        return v

    @model_validator(mode="after")
    def _replay_needs_continue(self) -> "MethodSpecBase":
        if self.replay_fraction and self.continue_from is None:
            raise ValueError("replay_fraction needs continue_from: previous")
        return self

    # -- hooks a spec may override -------------------------------------------------------

    def check_in_recipe(self, name: str, recipe: Recipe) -> None:
        """Rules that involve the rest of the recipe (called after every section validated, as
        method `name`). Raise ValueError with a message that names the keys to change."""

    def training_defaults(self) -> dict[str, Any]:
        """TrainingSpec values this method uses instead of the recipe's `training:` section;
        the method's own `training:` overrides still win."""
        return {}


def spec_types(spec: type[MethodSpecBase]) -> tuple[str, ...]:
    """The method types a spec class configures: the values of its `type: Literal[...]`."""
    field = spec.model_fields.get("type")
    types = typing.get_args(field.annotation) if field is not None else ()
    if not types or not all(isinstance(t, str) for t in types):
        raise TypeError(f"{spec.__name__} needs a field `type: Literal[...]` naming the method types it configures")
    return types
