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
    judge_lower_mlp,
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


@pytest.mark.parametrize(("where", "verdict"), [("mlp", REPRODUCED), ("attn", NOT_REPRODUCED)])
def test_the_lower_mlp_verdict_is_the_ablation_rule_on_the_saved_files(tmp_path, where, verdict):
    """The report recomputes `ablate`'s verdict from ablation.json and likelihood.csv (a planted grid)."""
    import json
    from dataclasses import asdict

    from test_ablate_verdict import entries, planted_grid

    values = planted_grid(where, 1.0)
    rows = [
        {"variant": name, "source": "trained", "environment": i, "role": "format", "nll_sum": -float(v),
         "top1_sum": 0.0, "tokens": 10}
        for name, per_env in values.items() for i, v in enumerate(per_env)
    ]  # fmt: skip
    (tmp_path / "ablate").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "ablate" / "likelihood.csv", index=False)
    summary = {"grid_entries": [asdict(e) for e in entries()], "model": {"blocks": 28},
               "analysis_environments": 120}  # fmt: skip
    (tmp_path / "ablate" / "ablation.json").write_text(json.dumps({"summary": summary}))
    found = judge_lower_mlp(tmp_path)
    assert found.verdict == verdict
    assert "blocks 0-8" in found.evidence and "20 matched controls" in found.evidence
    assert "E = " in found.evidence and found.rule.startswith("`ablate --grid paper`'s rule")
    assert judge_lower_mlp(tmp_path / "missing").verdict == INCONCLUSIVE


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
