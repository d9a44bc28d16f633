"""How many optimizer steps a run takes, and (for `python -m ft_assets validate`) an honest
estimate of it before any data is built.

`steps_for` is the one rule every trainer uses (`training.loop`, `trainers.preference`, `trainers.distill`):
min(max_steps, ceil(epochs * rows / (batch_size * grad_accum))), at least 1. Nothing here
imports torch, so validating a recipe stays fast.

`recipe_step_estimates` counts the rows the training split will have the way the data stages
do, minus what needs the tokenizer: read, validate (blank fields, duplicates) and split are
exact; the chat-template/`max_length` step can only reject more rows, at most as many as
`max_rejected_fraction` lets through before the stage fails. So a run's steps lie between
`StepEstimate.steps_low` and `StepEstimate.steps` (rows replayed by `continue_from` aside).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ..data.rows import DataFileError, TrainRowCount, count_train_rows, sft_sources, source_path


def validation_rows(n_examples: int, cfg: Any) -> int:
    """Rows `training.loop` holds out of `n_examples` training rows to measure validation loss:
    round(validation_fraction * n), at least 1 when the fraction is set; 0 when it is not."""
    fraction = getattr(cfg, "validation_fraction", 0.0) or 0.0
    return max(1, round(fraction * n_examples)) if fraction > 0 else 0


def steps_for(n_examples: int, training: Any, world_size: int = 1) -> int:
    """Optimizer steps over `n_examples` rows. `training` has max_steps, epochs, batch_size and
    grad_accum (a recipe `TrainingSpec`); data parallel, `world_size` processes share each step."""
    per_step = training.batch_size * training.grad_accum * world_size
    return max(1, min(training.max_steps, math.ceil(training.epochs * n_examples / per_step)))


@dataclass(frozen=True)
class StepEstimate:
    """The steps one training run will take. `rows` None: the data could not be counted
    (`unknown` says why) and `steps` is max_steps, an upper bound."""

    steps: int  # with `rows.high` training rows (tokenization rejects none)
    steps_low: int  # with `rows.low` (tokenization rejects as many as max_rejected_fraction allows)
    max_steps: int
    epochs: float
    batch_size: int
    grad_accum: int
    rows: TrainRowCount | None = None
    unit: str = "rows"  # "rows" or "pairs"
    unknown: str | None = None  # why rows is None
    uncounted: str | None = None  # rows the run adds that were not counted (replay)

    @property
    def binding(self) -> str | None:
        """"max_steps" when max_steps stops the run before `epochs` is done, else "epochs"."""
        if self.rows is None:
            return None
        return "max_steps" if self.epoch_steps > self.max_steps else "epochs"

    @property
    def epoch_steps(self) -> int:
        """Steps `epochs` would take over `rows.high` rows if max_steps did not stop it."""
        unbounded = SimpleNamespace(max_steps=sys.maxsize, epochs=self.epochs, batch_size=self.batch_size,
                                    grad_accum=self.grad_accum)
        return steps_for(self.rows.high, unbounded) if self.rows else self.max_steps

    @property
    def exact(self) -> bool:
        """The run takes exactly `steps`: the same at both row bounds, and rows not counted
        (replay) can only add rows, which changes nothing once max_steps binds."""
        if self.rows is None or self.steps != self.steps_low:
            return False
        return self.uncounted is None or self.steps_low == self.max_steps

    def describe(self) -> str:
        """E.g. "16 steps (max_steps; 0.36 epoch of ~357 train rows)" or
        "45 steps (1.0 epoch of ~360 train rows; max_steps 90 not reached)"."""
        if self.rows is None:
            return f"at most {self.max_steps} steps (max_steps is an upper bound; {self.unknown})"
        r = self.rows
        rows = f"{'' if r.low == r.high else '~'}{r.high} train {self.unit}"
        if self.binding == "max_steps":
            seen = self.steps * self.batch_size * self.grad_accum / r.high
            why = f"max_steps; {_epochs(seen)} of {rows}"
        else:
            why = f"{_epochs(self.epochs)} of {rows}; max_steps {self.max_steps} not reached"
        if self.steps_low != self.steps:
            why += (f"; {self.steps_low} if tokenization rejects as many {self.unit} as "
                    "max_rejected_fraction allows")
        if self.uncounted:
            why += f"; {self.uncounted} not counted" if self.exact else f"; more with {self.uncounted}"
        return f"{'' if self.exact else 'about '}{self.steps} steps ({why})"


def _epochs(x: float) -> str:
    s = f"{x:.2f}".rstrip("0") if x >= 0.01 else f"{x:.1g}"
    s = s + "0" if s.endswith(".") else s
    return f"{s} epoch{'' if x <= 1 else 's'}"


def estimate_steps(cfg: Any, rows: TrainRowCount | None, *, unit: str = "rows", unknown: str | None = None,
                   uncounted: str | None = None) -> StepEstimate:
    """The StepEstimate of a run with training settings `cfg` over `rows` (None: not countable)."""
    if rows is None:
        return StepEstimate(cfg.max_steps, cfg.max_steps, cfg.max_steps, cfg.epochs, cfg.batch_size, cfg.grad_accum,
                            unit=unit, unknown=unknown or "rows not counted")
    if validation_rows(rows.high, cfg):  # the loop trains on what validation leaves
        rows = dataclasses.replace(rows, low=rows.low - validation_rows(rows.low, cfg),
                                   high=rows.high - validation_rows(rows.high, cfg))
    return StepEstimate(steps_for(rows.high, cfg), steps_for(rows.low, cfg), cfg.max_steps, cfg.epochs,
                        cfg.batch_size, cfg.grad_accum, rows, unit, None, uncounted)


@dataclass(frozen=True)
class RecipeSteps:
    methods: dict[str, StepEstimate]
    distillation: StepEstimate | None


def recipe_step_estimates(recipe) -> RecipeSteps:
    """Steps of every method (and of distillation) of `recipe`, a `ft_assets.config.recipe.Recipe`:
    SFT-style methods and distillation over the `sft_dataset` training split, preference methods over
    the `preference_dataset` training pairs. Each data file is read once."""
    sft, sft_unknown = _count(lambda: count_train_rows(sft_sources(recipe)),
                              [source_path(recipe, ds) for ds in recipe.datasets])
    prefs, prefs_unknown = None, None
    generated = {d for g, readers in recipe.pairs_readers().items() if g is not None for d in readers}
    if recipe.preferences is not None and set(recipe.preference_methods()) - generated:
        from ..data.preferences import count_train_pairs, preference_source

        prefs, prefs_unknown = _count(lambda: count_train_pairs(preference_source(recipe)),
                                      [recipe.dataset_path(recipe.preferences)])
    methods = {}
    for name, spec in recipe.methods.items():
        cfg = recipe.training_for(name)
        if name in generated:
            methods[name] = estimate_steps(cfg, None, unit="pairs", unknown=f"pairs made by generated_preferences"
                                           f"[{spec.pairs}] when it runs, not counted")
        elif name in recipe.preference_methods():
            unpaired = recipe.preferences.form == "unpaired"  # rows of labelled answers (kto), one row each
            per_pair = 1 if unpaired else spec.ROWS_PER_PAIR  # kto: each pair is two labelled answers
            rows = prefs if prefs is None or per_pair == 1 else dataclasses.replace(
                prefs, low=prefs.low * per_pair, high=prefs.high * per_pair)
            methods[name] = estimate_steps(cfg, rows, unit="pairs" if per_pair == 1 and not unpaired
                                           else "labelled answers", unknown=prefs_unknown)
        else:
            replay = (f"rows replayed when continuing ({spec.replay_fraction:.0%} of the previous train split)"
                      if spec.continue_from and spec.replay_fraction else None)
            methods[name] = estimate_steps(cfg, sft, unknown=sft_unknown, uncounted=replay)
    distillation = None
    if recipe.distillation is not None:
        distillation = estimate_steps(recipe.training_for_distillation(), sft, unknown=sft_unknown)
    return RecipeSteps(methods, distillation)


def _count(count, paths) -> tuple[TrainRowCount | None, str | None]:
    # a relative path is a dataset id (format hf): the reader looks it up in the local HF cache
    missing = [str(p) for p in paths if p.is_absolute() and not p.exists()]
    if missing:
        return None, f"{', '.join(missing)} not found yet, rows not counted"
    try:
        return count(), None
    except DataFileError as exc:
        return None, f"rows not counted, the data stage would fail: {exc}"
