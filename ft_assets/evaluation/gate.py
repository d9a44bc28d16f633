"""The gate: does a newly evaluated model replace its method's champion? One pure function.

    decide(gate, candidate, incumbent, directions, against) -> Decision

`candidate` and `incumbent` are flat scores on the same held-out rows: the built-ins
(exact_match, token_f1, rouge_l, eval_loss, perplexity) and evaluators' `<name>.<score>`.
`directions` says which are higher-is-better. The candidate passes when `gate.metric` changed by
at least `gate.min_delta` in its good direction and no score of `gate.max_regression` got worse
by more than its bound. A score the gate names that either side lacks fails the gate, saying
which (a gate never passes on a missing number). `Decision.rows` is the table the `gate` check
shows: per score, both values, the change (positive = better), what was required, and whether
it held. No Dagster, no store, no torch: `defs/champion.py` gathers the scores and records the outcome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config.recipe import BUILTIN_SCORES, GateSpec

GATE_COLUMNS = ["score", "candidate", "incumbent", "change", "required", "ok"]


@dataclass(frozen=True)
class Decision:
    passed: bool
    against: str  # what the candidate was compared with: "base" or "champion <version>"
    reason: str  # one line: why it passed or which rules failed
    rows: list[dict[str, Any]]  # GATE_COLUMNS, the gate metric first


def directions_with_builtins(evaluator_directions: dict[str, bool]) -> dict[str, bool]:
    return {**BUILTIN_SCORES, **evaluator_directions}


def decide(gate: GateSpec, candidate: dict[str, float], incumbent: dict[str, float],
           directions: dict[str, bool], against: str) -> Decision:
    rules = [(gate.metric, "improve", gate.min_delta)] + [(s, "regress", b) for s, b in gate.max_regression.items()]
    rows, failed = [], []
    for score, kind, bound in rules:
        new, old = candidate.get(score), incumbent.get(score)
        if not _number(new) or not _number(old) or score not in directions:
            side = "the candidate" if not _number(new) else against if not _number(old) else "no evaluator's direction"
            rows.append({"score": score, "candidate": new, "incumbent": old, "change": None,
                         "required": _required(kind, bound), "ok": False})
            failed.append(f"{score} is missing ({side})")
            continue
        change = round((new - old) if directions[score] else (old - new), 6)  # positive = better
        ok = change >= bound if kind == "improve" else change >= -bound
        rows.append({"score": score, "candidate": new, "incumbent": old, "change": change,
                     "required": _required(kind, bound), "ok": ok})
        if not ok:
            failed.append(f"{score} {'improved' if change > 0 else 'changed'} by {change:+.4f}, needs {_required(kind, bound)}"
                          if kind == "improve" else f"{score} got worse by {-change:.4f}, at most {bound} allowed")
    reason = (f"passed against {against}" if not failed else f"not promoted against {against}: " + "; ".join(failed))
    return Decision(not failed, against, reason, rows)


def _required(kind: str, bound: float) -> str:
    return f">= {bound:+g}" if kind == "improve" else f">= {-bound:+g}"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
