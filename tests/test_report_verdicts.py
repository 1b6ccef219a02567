"""The verdict rules, each outcome reached from numbers whose intervals are known, and the report's tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from toolrl_analysis.analysis.ablate.bootstrap import Estimate
from toolrl_analysis.report.tables import exact_match_change, tool_use_table
from toolrl_analysis.report.verdicts import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    context_rule,
    general_rule,
    lower_mlp_rule,
    retained_fraction,
    tool_use_rule,
)


def spread(value: float, low: float, high: float) -> Estimate:
    """An estimate whose 95% percentile interval is (about) [low, high]."""
    replicates = np.linspace(low, high, 9501)
    pad = (high - low) * 0.0263  # 2.5% of the mass beyond each end
    replicates = np.concatenate([replicates, np.full(250, low - pad), np.full(250, high + pad)])
    return Estimate(value, replicates)


@pytest.mark.parametrize(
    "low, high, verdict",
    [
        (0.05, 0.30, REPRODUCED),  # the gain is positive at 95%
        (-0.03, 0.015, NOT_REPRODUCED),  # a gain of 2 points is excluded
        (-0.20, -0.05, NOT_REPRODUCED),  # RL made it worse
        (-0.02, 0.25, INCONCLUSIVE),  # could be nothing, could be large
        (0.0, 0.0, NOT_REPRODUCED),  # nothing moved at all
    ],
)
def test_tool_use_rule(low, high, verdict):
    assert tool_use_rule(spread((low + high) / 2, low, high)) == verdict


def test_general_rule():
    kept = {"value": 0.01, "low": -0.06, "high": 0.08}
    assert general_rule(0.01, kept) == REPRODUCED
    assert general_rule(0.03, kept) == NOT_REPRODUCED  # the text loss rose by more than 2%
    assert general_rule(0.0, {"value": -0.2, "low": -0.3, "high": -0.1}) == NOT_REPRODUCED  # a real drop
    assert general_rule(0.0, {"value": -0.05, "low": -0.15, "high": 0.05}) == INCONCLUSIVE  # too wide to tell


def test_exact_match_change_is_a_difference_of_two_proportions():
    change = exact_match_change(
        {"tasks.exact_match": 0.5, "tasks.tasks": 100}, {"tasks.exact_match": 0.6, "tasks.tasks": 100}
    )
    half = 1.96 * np.sqrt(0.25 / 100 + 0.24 / 100)
    assert change["value"] == pytest.approx(0.1)
    assert (change["low"], change["high"]) == pytest.approx((0.1 - half, 0.1 + half), abs=1e-3)


def paired(values: dict[str, float], noise: float = 0.01, n: int = 2000) -> dict[str, Estimate]:
    """Estimates sharing one source of noise (the same resampled environments), as the ablation's are."""
    shared = np.random.default_rng(0).normal(0, noise, n)
    return {name: Estimate(value, value + shared * (1 + value)) for name, value in values.items()}


def test_lower_mlp_rule():
    found = paired({"base": 0.2, "trained": 0.5, "revert": 0.23, "control": 0.49})
    gain = found["trained"] - found["base"]
    retained = retained_fraction(found["revert"], found["base"], found["trained"])
    control = retained_fraction(found["control"], found["base"], found["trained"])
    assert retained.value == pytest.approx(0.1) and control.value == pytest.approx(0.29 / 0.3)
    assert lower_mlp_rule(gain, retained, control) == REPRODUCED
    assert lower_mlp_rule(gain, control, retained) == NOT_REPRODUCED  # removing them costs nothing
    # less than half may be left, or more: the interval straddles 0.5, so the rule cannot tell
    assert lower_mlp_rule(gain, spread(0.45, 0.3, 0.6), spread(0.55, 0.4, 0.7)) == INCONCLUSIVE
    no_gain = spread(0.0, -0.05, 0.05)
    assert lower_mlp_rule(no_gain, retained, control) == INCONCLUSIVE  # nothing to attribute


def test_context_rule():
    up, flat, down = spread(0.2, 0.1, 0.3), spread(0.0, -0.1, 0.1), spread(-0.2, -0.3, -0.1)
    assert context_rule(REPRODUCED, up, probe_losses=0) == REPRODUCED
    assert context_rule(REPRODUCED, up, probe_losses=2) == INCONCLUSIVE  # the probes disagree
    assert context_rule(REPRODUCED, down, probe_losses=0) == NOT_REPRODUCED
    assert context_rule(REPRODUCED, flat, probe_losses=0) == INCONCLUSIVE
    assert context_rule(NOT_REPRODUCED, up, probe_losses=0) == INCONCLUSIVE  # no gain to explain
    assert context_rule(REPRODUCED, None, probe_losses=0) == INCONCLUSIVE  # not measured


def test_tool_use_table_shows_each_policy_with_its_interval():
    estimates = {
        "base": {("overall", "solve_f1"): spread(0.25, 0.2, 0.3)},
        "grpo": {("overall", "solve_f1"): spread(0.45, 0.4, 0.5)},
    }
    table = tool_use_table(estimates, "solve_f1")
    assert table.to_dict(orient="records") == [
        {"scenario": "overall", "base": "0.250 [0.200, 0.300]", "GRPO": "0.450 [0.400, 0.500]"}
    ]
    assert isinstance(table, pd.DataFrame)
