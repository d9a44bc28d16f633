"""The gate's rule on its own (no Dagster, no models): improve the gate metric by min_delta in its
direction, regress no bounded score beyond its bound, and never pass on a missing number."""

from __future__ import annotations

import pytest

from ft_assets.config.recipe import GateSpec
from ft_assets.evaluation.gate import decide, directions_with_builtins

DIRS = directions_with_builtins({"figures.figure_recall": True, "probe.arithmetic.acc": True})
CHAMP = {"token_f1": 0.50, "eval_loss": 1.20, "figures.figure_recall": 0.70, "probe.arithmetic.acc": 0.60}


def gate(**kw) -> GateSpec:
    return GateSpec(**kw)


def test_an_improvement_of_at_least_min_delta_passes_and_a_smaller_one_does_not():
    g = gate(metric="token_f1", min_delta=0.01)
    assert decide(g, {**CHAMP, "token_f1": 0.52}, CHAMP, DIRS, "base").passed
    d = decide(g, {**CHAMP, "token_f1": 0.505}, CHAMP, DIRS, "champion v1")
    assert not d.passed and d.rows[0]["change"] == pytest.approx(0.005) and not d.rows[0]["ok"]
    assert d.reason.startswith("not promoted against champion v1: token_f1")


def test_lower_is_better_scores_count_a_drop_as_an_improvement():
    g = gate(metric="eval_loss", min_delta=0.1)
    assert decide(g, {**CHAMP, "eval_loss": 1.0}, CHAMP, DIRS, "base").passed
    d = decide(g, {**CHAMP, "eval_loss": 1.3}, CHAMP, DIRS, "base")
    assert not d.passed and d.rows[0]["change"] == pytest.approx(-0.1)


def test_a_bounded_regression_fails_the_gate_even_when_the_metric_improved():
    g = gate(metric="token_f1", max_regression={"probe.arithmetic.acc": 0.02, "figures.figure_recall": 0.1})
    better_but_forgot = {**CHAMP, "token_f1": 0.6, "probe.arithmetic.acc": 0.5}
    d = decide(g, better_but_forgot, CHAMP, DIRS, "base")
    assert not d.passed
    assert [r["score"] for r in d.rows if not r["ok"]] == ["probe.arithmetic.acc"]
    assert "probe.arithmetic.acc got worse by 0.1000, at most 0.02 allowed" in d.reason
    within = {**CHAMP, "token_f1": 0.6, "probe.arithmetic.acc": 0.59}
    assert decide(g, within, CHAMP, DIRS, "base").passed


def test_a_missing_score_never_passes():
    g = gate(metric="token_f1", max_regression={"figures.figure_recall": 0.1})
    no_figures = {k: v for k, v in CHAMP.items() if k != "figures.figure_recall"}
    d = decide(g, {**no_figures, "token_f1": 0.9}, no_figures, DIRS, "champion v1")
    assert not d.passed and "figures.figure_recall is missing (the candidate)" in d.reason
    assert not decide(g, {**CHAMP, "token_f1": float("nan")}, CHAMP, DIRS, "base").passed
