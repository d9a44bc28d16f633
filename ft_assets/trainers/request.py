"""What every trainer's request dataclass shares: it travels as JSON (the torchrun / Ray spec file,
`jobs.train.TrainJob`) and comes back as the same object. `NamedRequest`: a request for a recipe
entry named `name` (a reward model, a policy) goes by that name where a method's goes by `method`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


class JsonRequest:
    """Mixed into a request dataclass: `to_json` / `from_json` round-trip it."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]):
        return cls(**d)


class NamedRequest(JsonRequest):
    @property
    def method(self) -> str:
        """The name its launch and log lines go by (as a method's request names its method)."""
        return self.name
