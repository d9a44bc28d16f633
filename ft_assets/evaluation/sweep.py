"""Choosing among a sweep's trials: the trial with the lowest validation loss wins.

Contract. A sweep (`methods.<m>.sweep` in the recipe, expanded by `recipe.expand_sweep`) is a
set of ordinary methods named `<m>@<key>=<value>...` (a value that is not letters, digits and
`._+-` is written as `h<8 hex>`, a hash of it, and a name over 128 characters ends with
`@rest=h<8 hex>`: see `recipe.trial_name`; the table shows the labels as the name has them, the
trial's method in the recipe the values); each trains as an `adapter` partition,
holding out the same validation rows (same seed and fraction) and ending with the weights of
its best validation measurement. `pick_best` compares those best losses (lower wins; a tie
goes to the first trial in name order) and `SweepResult.save` writes the table of all trials
(`trials.json`) and the winner (`best.json`: trial, adapter version and path). Nothing here
trains or imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.recipe import SWEEP_SEPARATOR


def trial_settings(trial: str) -> dict[str, str]:
    """{"lr": "2e-4", "r": "8"} for `lora@lr=2e-4@r=8`."""
    return dict(part.split("=", 1) for part in trial.split(SWEEP_SEPARATOR)[1:])


@dataclass(frozen=True)
class SweepResult:
    family: str
    trials: list[dict[str, Any]]  # one row per trial, best first
    winner: str

    def save(self, out_dir: Path) -> None:
        (out_dir / "trials.json").write_text(json.dumps(self.trials, indent=2) + "\n")
        best = next(t for t in self.trials if t["trial"] == self.winner)
        (out_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")


def pick_best(family: str, trials: dict[str, dict[str, Any]]) -> SweepResult:
    """`trials`: {trial name: {"version", "path", "train": the adapter manifest's train facts}}."""
    rows = []
    for name, t in sorted(trials.items()):
        train = t["train"]
        if train.get("best_validation_loss") is None:
            raise ValueError(f"adapter[{name}] has no validation loss (trained without validation_fraction); "
                             "re-materialize it: sweep trials hold out validation rows by default")
        rows.append({"trial": name, **trial_settings(name), "best_validation_loss": train["best_validation_loss"],
                     "kept_step": train.get("kept_step"), "stopped_early_at": train.get("stopped_early_at"),
                     "steps": train.get("steps"), "adapter_version": t["version"], "adapter_path": t["path"]})
    rows.sort(key=lambda r: r["best_validation_loss"])  # stable: ties keep name order
    return SweepResult(family, rows, rows[0]["trial"])
