"""`TrainResult`: what one run of the training loop did, and how it travels.

Three views, each with its own audience: `summary()` (the adapter manifest: includes timings,
memory, a resume), `log()` (the artifact's train_log.json: only what the run computed, so the
artifact's bytes do not depend on how fast it ran or whether it resumed), and `progress()` /
`restore_progress()` (a checkpoint's progress.json: what a resumed run must carry on from).
`from_dict` reads it back from `dataclasses.asdict` through JSON (another process's result).
Plain data; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _pairs(curve) -> list[tuple]:
    return [tuple(x) for x in curve]


@dataclass
class TrainResult:
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of that step)
    steps: int = 0
    tokens_seen: int = 0  # non-padding input tokens
    tokens_trained: int = 0  # tokens that carry a label (answers + end-of-turn)
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    resumed_from_step: int = 0
    # the objective's extra terms, per step: name -> [(step, term sum / labels of that step)]
    terms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    validation_rows: int = 0
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss on held-out rows)
    kept_step: int | None = None  # the step whose weights the run ends with (best validation loss)
    stopped_early_at: int | None = None  # the step early stopping ended the run at

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.wall_s if self.wall_s else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainResult":
        return cls(**{**d, "losses": _pairs(d["losses"]), "validation_losses": _pairs(d["validation_losses"]),
                      "terms": {k: _pairs(v) for k, v in d["terms"].items()}})

    def progress(self, step: int) -> dict[str, Any]:
        """A checkpoint's progress.json at `step`."""
        return {"step": step, "losses": self.losses, "terms": self.terms, "tokens_seen": self.tokens_seen,
                "tokens_trained": self.tokens_trained, "wall_s": self.wall_s,
                "validation_losses": self.validation_losses, "kept_step": self.kept_step}

    def restore_progress(self, progress: dict[str, Any]) -> int:
        """Carry on from a checkpoint's progress.json; returns its step."""
        self.losses = _pairs(progress["losses"])
        self.terms = {name: _pairs(curve) for name, curve in progress.get("terms", {}).items()}
        self.tokens_seen = progress["tokens_seen"]
        self.tokens_trained = progress["tokens_trained"]
        self.wall_s = progress["wall_s"]
        self.validation_losses = _pairs(progress.get("validation_losses", []))
        self.kept_step = progress.get("kept_step")
        return progress["step"]

    def record_step(self, step: int, mean_loss: float, mean_terms: dict[str, float], labels: int) -> None:
        """Step `step` (1-based) is done: its mean loss and terms, its labelled tokens."""
        self.tokens_trained += labels
        self.steps = step
        self.losses.append((step, round(mean_loss, 6)))
        for name, value in mean_terms.items():
            self.terms.setdefault(name, []).append((step, round(value, 6)))

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "tokens_trained": self.tokens_trained,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "wall_s": round(self.wall_s, 2),
            "peak_memory_bytes": self.peak_memory_bytes,
            "first_loss": self.losses[0][1] if self.losses else None,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "resumed_from_step": self.resumed_from_step,
            **({"validation_rows": self.validation_rows, "kept_step": self.kept_step,
                "stopped_early_at": self.stopped_early_at,
                "best_validation_loss": min(v for _, v in self.validation_losses)} if self.validation_losses else {}),
        }

    def log(self) -> dict[str, Any]:
        """What the run computed (losses, steps, tokens), for the artifact's train_log.json."""
        keep = ("steps", "tokens_seen", "tokens_trained", "first_loss", "final_loss", "validation_rows", "kept_step",
                "stopped_early_at", "best_validation_loss")
        curves = {"validation_losses": self.validation_losses} if self.validation_losses else {}
        return {"losses": self.losses, **self.terms, **curves,
                **{k: v for k, v in self.summary().items() if k in keep}}
