"""`Strict`: the base of every recipe mapping (each section of config/recipe.py, each method's
spec). Unknown keys are errors, instances are frozen, and keys added after recipes were first
hashed stay out of dumps while they hold their default, so adding one re-versions nothing."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, model_serializer


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
